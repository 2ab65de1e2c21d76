"""Batched generation over a preallocated KV cache, with requests joining and leaving between steps.

`Engine.step()` admits waiting requests (a prefill of each prompt, which yields its first token)
and advances every running request by one token (one decode pass over the batch). Per-request
state lives in `Sequence` objects beside the batched tensors in `Batch`, the way Text Generation
Inference keeps its batches: finished rows are filtered out and new ones concatenated in.

Batch invariance: the numbers a request's tokens are drawn from do not depend on which requests
share its steps. Prompts are prefilled one by one (padding would change the kernels' shapes),
decode attention spans exactly each row's prefix (`model.gpt.decode_runs`), and the decode batch's
matrix products see only row counts whose per-row results their kernels keep (`decode_groups`).
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from model.decode_linear import DecodeLinear
from model.gpt import GPT, KVCache
from model.quantize import Int8Linear
from model.sampling import sample
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
    """What one step produced for one request. `text` may be empty while characters are incomplete."""

    request_id: Hashable
    token: int
    text: str
    finish_reason: str | None = None

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

    @property
    def position(self) -> int:
        """Where the most recent token sits (and is written to the cache by the next decode)."""
        return len(self.prompt) + len(self.tokens) - 1

    def draw(self) -> float:
        return float(torch.rand((), generator=self.generator))


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

    def filter(self, cache: KVCache, done: set[int]) -> None:
        """Drop rows in `done`, filling each hole with the last row so rows stay 0..B-1."""
        span = max(s.position for s in self.sequences) + 1
        for hole in sorted(done, reverse=True):
            last = len(self.sequences) - 1
            if hole != last:
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
        """Advance every request by one token; return one event per request that produced one."""
        self._drop_cancelled()
        events = self._decode() if self.batch.sequences else []
        events += self._prefill()
        # Decode events come in row order and admitted sequences were appended after them.
        finished = {i for i, e in enumerate(events) if e.finished}
        if finished:
            self.batch.filter(self.cache, finished)
        return events

    def _drop_cancelled(self) -> None:
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        cancelled = {i for i, s in enumerate(self.batch.sequences) if s.cancelled}
        if cancelled:
            self.batch.filter(self.cache, cancelled)

    def _decode(self) -> list[TokenEvent]:
        seqs = self.batch.sequences
        fewest, most = self.row_range
        logits = []
        for group in decode_groups(len(seqs), fewest, most):
            tokens = [seqs[i].tokens[-1] for i in group] + [EOT_TOKEN] * (fewest - len(group))
            idx = torch.tensor(tokens, device=self.device)
            positions = [seqs[i].position for i in group]
            decoded = self.model.decode(idx, list(group), positions, self.cache, self.batch_invariant)
            logits.append(decoded[: len(group)])
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        return self._sample(seqs, logits, self.batch.sampling_tensors())

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
        return self._sample(admitted, logits, sampling_tensors(admitted, self.device))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, params) -> list[TokenEvent]:
        uniform = torch.tensor([s.draw() for s in seqs], device=self.device)
        tokens = sample(logits, *params, uniform).tolist()
        return [self._advance(s, t) for s, t in zip(seqs, tokens)]

    def _advance(self, seq: Sequence, token: int) -> TokenEvent:
        seq.tokens.append(token)
        params = seq.params
        if params.stop_at_eot and token == EOT_TOKEN:
            return TokenEvent(seq.request_id, token, seq.text.finish() if seq.text else "", FINISH_STOP)
        text = seq.text.push(token) if seq.text else ""
        if seq.text and seq.text.stopped:
            return TokenEvent(seq.request_id, token, text, FINISH_STOP)
        if len(seq.tokens) >= params.max_new_tokens:
            return TokenEvent(seq.request_id, token, text + (seq.text.finish() if seq.text else ""), FINISH_LENGTH)
        return TokenEvent(seq.request_id, token, text)

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
