"""Batched generation over a preallocated KV cache, with requests joining and leaving between steps.

`Engine.step()` admits waiting requests (a prefill of each prompt, which yields its first token)
and advances every running request by one token (one decode pass over the batch). Per-request
state lives in `Sequence` objects beside the batched tensors in `Batch`, the way Text Generation
Inference keeps its batches: finished rows are filtered out and new ones concatenated in.

Batch invariance: the numbers a request's tokens are drawn from do not depend on which requests
share its steps. Prompts are prefilled one by one (padding would change the kernels' shapes),
decode attention spans exactly each row's prefix (`model.gpt.decode_runs`), and the decode batch's
matrix products see only row counts whose per-row results their kernels keep (`decode_groups`).

Speculative decoding (model/speculation.py) rides on the same invariance: a decode pass may hold
several entries of one request, its last token and draft tokens at the following positions, and each
entry's logits are those of a one-token step there. Random keys are indexed by token position
(`Sequence.key`), so the tokens are plain decoding's, whichever drafts were checked.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from model.decode_linear import DecodeLinear
from model.gpt import GPT, KVCache
from model.quantize import Int8Linear
from model.sampling import KEY_BITS, sample
from model.speculation import DraftModel, DraftState, Planner, sampled
from model.tokenizer import EOT_TOKEN, TextStream, Tokenizer

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


# Row counts, from fewest to most, within which the CPU matrix kernels give every row the same bits
# whatever the count (measured per layout by tests/model/test_model_invariance.py). oneDNN computes
# one row differently from two (fp32, 3072-wide inputs) and changes kernels again at 33 rows (bf16);
# MKL's plain fp32 product has three regimes, one row, a few (up to 2 to 15, by width) and more.
# Our own kernels (model.decode_linear) have one: these ranges, the padding of a small batch and the
# decode groups apply only where they do not run.
ROW_RANGE = (2, 32)
PLAIN_FP32_ROW_RANGE = (16, 64)
ANY_ROW_COUNT = (1, 1 << 30)


def row_range(model: nn.Module) -> tuple[int, int]:
    """The decode row counts whose per-row results `model`'s linear layers keep (see ROW_RANGE);
    on a GPU, whose kernels make no such promise, any count."""
    if next(itertools.chain(model.parameters(), model.buffers())).device.type != "cpu":
        return ANY_ROW_COUNT
    if any(isinstance(m, DecodeLinear) for m in model.modules()):
        return ANY_ROW_COUNT  # our kernels reduce every row alike, whatever the count
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return ANY_ROW_COUNT  # integer products are exact, whatever the kernel
    plain_fp32 = any(isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 for m in model.modules())
    return PLAIN_FP32_ROW_RANGE if plain_fp32 else ROW_RANGE


def decode_groups(rows: int, fewest: int, most: int) -> list[range]:
    """Split `rows` batch entries into near-equal groups of at most `most` (a group under `fewest`
    rows, only ever the one group of a small batch, is padded up to it)."""
    count = -(-rows // most)
    bounds = [rows * i // count for i in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class ContextLengthError(ValueError):
    """A prompt plus the tokens asked for does not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eot: bool = True
    speculate: bool = True  # check drafts where the engine has a source (it never changes the tokens)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class TokenEvent:
    """One token a step produced for one request (a step may produce several when drafts are kept).
    `text` may be empty while characters are incomplete; `drafted` says the token was a kept draft."""

    request_id: Hashable
    token: int
    text: str
    finish_reason: str | None = None
    drafted: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Sequence:
    """One request's state while it is generated."""

    request_id: Hashable
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    text: TextStream | None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    keys: list[int] = field(default_factory=list)
    draft: DraftState = field(default_factory=DraftState)

    @property
    def position(self) -> int:
        """Where the most recent token sits (and is written to the cache by the next decode)."""
        return len(self.prompt) + len(self.tokens) - 1

    def key(self, index: int) -> int:
        """The random key that new token `index` is sampled with (model.sampling): the index-th draw of the
        request's seeded generator, the same whenever and however often it is asked for."""
        while len(self.keys) <= index:
            self.keys.append(int(torch.randint(2**KEY_BITS, (), generator=self.generator)))
        return self.keys[index]


class Batch:
    """The running sequences: `sequences[i]` owns KV-cache row i and `tokens[i]`, `positions[i]`."""

    def __init__(self, device):
        self.device = device
        self.sequences: list[Sequence] = []
        self._params: tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def extend(self, sequences: list[Sequence]) -> None:
        self.sequences.extend(sequences)
        self._params = None

    def filter(self, caches: list[KVCache], done: set[int]) -> None:
        """Drop rows in `done`, filling each hole with the last row so rows stay 0..B-1."""
        span = max(s.position for s in self.sequences) + 1
        for hole in sorted(done, reverse=True):
            last = len(self.sequences) - 1
            if hole != last:
                for cache in caches:
                    cache.k[:, hole, :, :span] = cache.k[:, last, :, :span]
                    cache.v[:, hole, :, :span] = cache.v[:, last, :, :span]
                self.sequences[hole] = self.sequences[last]
            self.sequences.pop()
        self._params = None

    def sampling_tensors(self) -> tuple[torch.Tensor, ...]:
        if self._params is None:
            self._params = sampling_tensors(self.sequences, self.device)
        return self._params


def sampling_tensors(sequences: list[Sequence], device) -> tuple[torch.Tensor, ...]:
    params = [s.params for s in sequences]
    return (
        torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        torch.tensor([p.top_k or 0 for p in params], dtype=torch.long, device=device),
        torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
    )


class Engine:
    """Continuous-batching generation for one model.

    Not thread-safe: one thread calls `add`, `cancel` and `step` (the service's scheduler does).
    Without a tokenizer the engine works on tokens only and stop strings are unavailable.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        batch_invariant: bool = True,
        prompt_lookup: bool = False,
        draft_model: GPT | None = None,
        draft_length: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_seq_len = min(max_seq_len or self.config.block_size, self.config.block_size)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache(self.config, max_batch_size, self.max_seq_len, self.dtype, self.device)
        # Without batch invariance (a benchmark's "before", or a service that promises no seeded
        # reproducibility): prompts that arrive together are prefilled padded in one pass, decode
        # attention is one masked call, and the matrix products see whatever row count the batch has.
        self.batch_invariant = batch_invariant
        self.row_range = row_range(model) if batch_invariant else ANY_ROW_COUNT
        self.batch = Batch(self.device)
        self.waiting: deque[Sequence] = deque()
        self._auto_ids = itertools.count()
        self.planner: Planner | None = None
        if prompt_lookup or draft_model is not None:
            if not batch_invariant:
                raise ValueError("speculative decoding keeps tokens identical only with batch invariance")
            self.planner = Planner(prompt_lookup, None, draft_length)
            self.set_draft(draft_model)

    def fresh(self) -> Engine:
        """An engine like this one, over the same weights, with nothing running."""
        planner = self.planner
        speculation = {}
        if planner is not None:
            draft = planner.draft.model if planner.draft else None
            speculation = dict(prompt_lookup=planner.lookup is not None, draft_model=draft,
                               draft_length=planner.fixed_length)  # fmt: skip
        return Engine(self.model, self.tokenizer, self.max_batch_size, self.max_seq_len, self.batch_invariant,
                      **speculation)  # fmt: skip

    def set_draft(self, model: GPT | None) -> None:
        """Draft with `model` from the next step on (None: no draft model). Running requests keep their
        tokens: drafts only decide how soon they come."""
        if self.planner is None:
            raise ValueError("this engine was built without speculation")
        if model is not None and model.config.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"a draft model's vocabulary of {model.config.vocab_size} tokens is not the target's "
                f"{self.config.vocab_size}: they must share a tokenizer"
            )
        self.planner.draft = None if model is None else DraftModel(model, self.max_batch_size, self.max_seq_len)

    def _caches(self) -> list[KVCache]:
        draft = self.planner.draft if self.planner else None
        return [self.cache] if draft is None else [self.cache, draft.cache]

    @property
    def max_batch_size(self) -> int:
        return self.cache.max_batch

    @property
    def num_running(self) -> int:
        return len(self.batch)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.batch.sequences or self.waiting)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens < 1:
            raise ValueError("the prompt must hold at least one token")
        if prompt_tokens + max_new_tokens > self.max_seq_len:
            raise ContextLengthError(
                f"the prompt's {prompt_tokens} tokens plus max_new_tokens {max_new_tokens} exceed "
                f"the context of {self.max_seq_len} tokens"
            )

    def add(self, prompt: list[int], params: SamplingParams, request_id: Hashable | None = None) -> Hashable:
        """Queue a request; it joins the batch at the next step with a free row."""
        self.check_fits(len(prompt), params.max_new_tokens)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        if request_id is None:
            request_id = next(self._auto_ids)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        text = TextStream(self.tokenizer, params.stop) if self.tokenizer else None
        self.waiting.append(Sequence(request_id, list(prompt), params, generator, text))
        return request_id

    def cancel(self, request_id: Hashable) -> None:
        """Forget a request; a running one frees its row at the next step without another token."""
        for seq in itertools.chain(self.waiting, self.batch.sequences):
            if seq.request_id == request_id:
                seq.cancelled = True

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Advance every request by a token, or by several where drafts were kept; return one event per token."""
        self._drop_cancelled()
        events = self._decode() if self.batch.sequences else []
        events += self._prefill()
        finished = {i for i, s in enumerate(self.batch.sequences) if s.finished}
        if finished:
            self.batch.filter(self._caches(), finished)
        return events

    def _drop_cancelled(self) -> None:
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        cancelled = {i for i, s in enumerate(self.batch.sequences) if s.cancelled}
        if cancelled:
            self.batch.filter(self._caches(), cancelled)

    def _decode(self) -> list[TokenEvent]:
        seqs = self.batch.sequences
        params = self.batch.sampling_tensors()
        drafts: list[list[int]] = [[] for _ in seqs]
        if self.planner is not None:
            sources, found, depth = self.planner.plan(seqs)
            if any(depth):
                drafts = self.planner.drafts(list(range(len(seqs))), seqs, sources, found, depth, params)
                # Never an entry past the tokens asked for (nor, therefore, past the cache).
                drafts = [d[: s.params.max_new_tokens - len(s.tokens) - 1] for s, d in zip(seqs, drafts)]
        # One entry for each sequence's last token, then one for each of its draft tokens.
        owners = [i for i, d in enumerate(drafts) for _ in range(1 + len(d))]
        tokens = [t for s, d in zip(seqs, drafts) for t in (s.tokens[-1], *d)]
        positions = [s.position + j for s, d in zip(seqs, drafts) for j in range(1 + len(d))]
        # The pass's cost with its sampling, whatever else holds the machine (PassCost).
        started = time.thread_time()
        logits = self._target_pass(tokens, owners, positions)
        if len(tokens) == len(seqs):
            picked = self._pick(seqs, logits, params, [len(s.tokens) for s in seqs])
            self._timed(seqs, len(tokens), started)
            return [self._advance(s, t) for s, t in zip(seqs, picked)]
        counts = torch.tensor([1 + len(d) for d in drafts], device=self.device)
        entries = [seqs[i] for i in owners]
        indices = [len(s.tokens) + j for s, d in zip(seqs, drafts) for j in range(1 + len(d))]
        picked = self._pick(entries, logits, [p.repeat_interleave(counts) for p in params], indices)
        self._timed(seqs, len(tokens), started)
        events, first = [], 0
        for seq, draft, source in zip(seqs, drafts, sources):
            context = len(seq.prompt) + len(seq.tokens)
            kept = 0
            for j, token in enumerate(picked[first : first + 1 + len(draft)]):
                drafted = j < len(draft) and token == draft[j]
                events.append(self._advance(seq, token, drafted))
                if not drafted or events[-1].finished:
                    break
                kept += 1
            if draft:
                self.planner.checked(seq, source, context, len(draft), kept)
            first += 1 + len(draft)
        return events

    def _timed(self, seqs: list[Sequence], entries: int, started: float) -> None:
        if self.planner is not None:
            self.planner.cost.observe(entries, time.thread_time() - started, sampled(seqs))

    def _target_pass(self, tokens: list[int], rows: list[int], positions: list[int]) -> torch.Tensor:
        """Logits of every entry, the matrix products seeing only row counts their kernels keep."""
        fewest, most = self.row_range
        logits = []
        for group in decode_groups(len(tokens), fewest, most):
            idx = torch.tensor([tokens[i] for i in group] + [EOT_TOKEN] * (fewest - len(group)), device=self.device)
            decoded = self.model.decode(idx, [rows[i] for i in group], [positions[i] for i in group], self.cache,
                                        self.batch_invariant)  # fmt: skip
            logits.append(decoded[: len(group)])
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def _prefill(self) -> list[TokenEvent]:
        free = self.max_batch_size - len(self.batch)
        admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if not admitted:
            return []
        first = len(self.batch)
        if self.batch_invariant:
            logits = torch.cat([
                self.model.prefill(torch.tensor([s.prompt], device=self.device), self.cache, first + i)
                for i, s in enumerate(admitted)
            ])  # fmt: skip
        else:
            lengths = [len(s.prompt) for s in admitted]
            padded = [s.prompt + [EOT_TOKEN] * (max(lengths) - len(s.prompt)) for s in admitted]
            logits = self.model.prefill(torch.tensor(padded, device=self.device), self.cache, first, lengths)
        self.batch.extend(admitted)
        return self._sample(admitted, logits, sampling_tensors(admitted, self.device), [0] * len(admitted))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, params, indices: list[int]) -> list[TokenEvent]:
        tokens = self._pick(seqs, logits, params, indices)
        return [self._advance(s, t) for s, t in zip(seqs, tokens)]

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor, params, indices: list[int]) -> list[int]:
        """The token of each row of `logits`: row i is new token `indices[i]` of `seqs[i]`."""
        keys = torch.tensor([s.key(i) for s, i in zip(seqs, indices)], device=self.device)
        return sample(logits, *params, keys).tolist()

    def _advance(self, seq: Sequence, token: int, drafted: bool = False) -> TokenEvent:
        seq.tokens.append(token)
        params = seq.params
        if params.stop_at_eot and token == EOT_TOKEN:
            text, finish = seq.text.finish() if seq.text else "", FINISH_STOP
        else:
            text, finish = seq.text.push(token) if seq.text else "", None
            if seq.text and seq.text.stopped:
                finish = FINISH_STOP
            elif len(seq.tokens) >= params.max_new_tokens:
                text, finish = text + (seq.text.finish() if seq.text else ""), FINISH_LENGTH
        seq.finished = finish is not None
        return TokenEvent(seq.request_id, token, text, finish, drafted)

    def stream(self) -> Iterator[TokenEvent]:
        """Step until every queued request has finished, yielding events as they are produced."""
        while self.has_work():
            yield from self.step()

    def generate_tokens(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Generate for every prompt (batched as capacity allows); return each prompt's new tokens."""
        ids = [self.add(p, params) for p in prompts]
        out: dict[Hashable, list[int]] = {i: [] for i in ids}
        for event in self.stream():
            out[event.request_id].append(event.token)
        return [out[i] for i in ids]
