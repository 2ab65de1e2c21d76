"""The invariance tests' shared pieces: weight layouts, an engine that records the logits each token was
drawn from, and the check that requests joining a running batch draw exactly their solo numbers."""

from __future__ import annotations

import copy

import torch

from model import GPT, Engine, SamplingParams, native
from model.decode_linear import DecodeLinear, use_native
from model.generation import PLAIN_FP32_ROW_RANGE
from model.packing import PackedLinear, pack
from model.quantize import Int8Linear, quantize

SETTINGS = {
    "whole vocabulary": dict(top_k=None),
    "top_k 50257": dict(top_k=50257),
    "top_k 1000": dict(top_k=1000),
    "top_k 50": dict(top_k=50),
    "top_p 0.95": dict(top_k=None, top_p=0.95),
    "greedy": dict(temperature=0.0),
}
LAYOUTS = [("fp32", "plain"), ("fp32", "packed"), ("bf16", "plain"), ("bf16", "packed"), ("fp32", "int8"),
           ("bf16", "int8")]  # fmt: skip
# Our decode kernels (model.decode_linear), each layout on every path the kernels dispatch to.
NATIVE_LAYOUTS = [("fp32", "native"), ("bf16", "native"), ("fp32", "native-int8")]
NATIVE_CASES = [(d, w, path) for d, w in NATIVE_LAYOUTS for path in native.PATHS]
# Whole engines cost more: every path in fp32, the fastest path for bf16 and int8 weights.
ENGINE_CASES = [c for c in NATIVE_CASES if c[:2] == ("fp32", "native") or c[2] == native.PATHS[-1]]
# Any row count is invariant on our kernels: each is checked from 1 to beyond the tests' batch of 20.
NATIVE_ROW_LIMIT = 24
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The layers of the gpt2 shape: attention in and out, MLP in and out, the LM head.
GPT2_LINEARS = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)]


def layout(model: GPT, dtype: str, weights: str) -> GPT:
    copied = copy.deepcopy(model).to(DTYPES[dtype]).eval()
    if weights == "packed":
        return pack(copied)
    if weights == "int8":
        return quantize(copied, "int8")
    if weights == "native":
        return use_native(copied)
    if weights == "native-int8":
        return use_native(quantize(copied, "int8"))
    return copied


def linear_layer(linear: torch.nn.Linear, dtype: str, weights: str) -> torch.nn.Module:
    if weights == "packed":
        return PackedLinear(linear)
    if weights == "int8":
        return Int8Linear(linear, DTYPES[dtype])
    if weights == "native":
        return DecodeLinear(linear)
    if weights == "native-int8":
        return DecodeLinear(Int8Linear(linear, DTYPES[dtype]))
    return linear


class RecordingEngine(Engine):
    """The engine, keeping the logits each request's tokens were drawn from: `logits[request][i]` for new
    token i. A draft position checked and dropped is sampled again at a later step, which overwrites it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits: dict = {}

    def _pick(self, seqs, logits, params, indices):
        for seq, row, index in zip(seqs, logits, indices):
            self.logits.setdefault(seq.request_id, {})[index] = row.clone()
        return super()._pick(seqs, logits, params, indices)

    def drawn_from(self, request_id, count: int) -> list[torch.Tensor]:
        """The logits of the first `count` new tokens (a check may have looked past the last)."""
        return [self.logits[request_id][i] for i in range(count)]


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 50257, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def speculation(source: str, draft: GPT) -> dict:
    """Engine options that draft from one source, as many tokens wherever a request can take them (prompt
    lookup finds drafts where greedy text loops; the draft model, run once per draft token, drafts two at a
    time for the tests' time)."""
    return dict(prompt_lookup=True, draft_length=4) if source == "lookup" else dict(draft_model=draft, draft_length=2)


def repeating(ids: list[int]) -> list[int]:
    """A prompt whose second half repeats its first, so that prompt lookup finds drafts."""
    return ids + ids[: len(ids) // 2]


def check_joining_requests(model: GPT, speculating: dict) -> None:
    """Every compared request's tokens and logits, batched with others as they join and leave (and checked
    against drafts when `speculating` holds engine options for it), equal plain decoding's alone."""
    # Compared requests: every sampling setting, prompts from 1 to 150 tokens, joining at staggered steps.
    compared = {
        name: (repeating(prompt(length, seed)), SamplingParams(max_new_tokens=10, seed=seed, stop_at_eot=False, **setting), join)
        for (name, setting), length, seed, join in zip(
            SETTINGS.items(), (1, 100, 7, 40, 22, 2), range(1, 7), (0, 0, 2, 3, 5, 9)
        )
    }  # fmt: skip
    # Fillers of other lengths come and go, so the batch grows past 16 rows (below, plain fp32 rows
    # are padded to 16) and shrinks again, moving rows around the cache as they leave. They alone run 17
    # rows at step 4, however soon the compared requests finish on kept drafts. They draft nothing: the
    # compared requests' checks still share passes with plain rows, at a third of the draft model's work.
    fillers = {
        f"filler {i}": (prompt(2 + 5 * i, 100 + i), SamplingParams(max_new_tokens=3 + 2 * i, seed=i, stop_at_eot=False, speculate=False), i % 5)
        for i in range(18)
    }  # fmt: skip
    batched = RecordingEngine(model, max_batch_size=24, max_seq_len=256, **speculating)
    requests = compared | fillers
    tokens: dict = {}
    last_join = max(join for _, _, join in requests.values())
    step = widest = 0
    while step <= last_join or batched.has_work():
        for name, (ids, params, join) in requests.items():
            if join == step:
                batched.add(ids, params, request_id=name)
        for event in batched.step():
            tokens.setdefault(event.request_id, []).append(event.token)
        widest = max(widest, batched.num_running)
        step += 1
    assert widest > PLAIN_FP32_ROW_RANGE[0]
    if speculating:  # drafts were checked, and some were kept and some not
        [(source, proposed)] = batched.planner.stats.proposed.items()
        assert 0 < batched.planner.stats.accepted[source] < proposed, batched.planner.stats
    for name, (ids, params, _) in compared.items():
        alone = RecordingEngine(model, max_batch_size=1, max_seq_len=256)
        solo_tokens = alone.generate_tokens([ids], params)[0]
        runs = {"batched": (batched, name, tokens[name])}
        if speculating:
            drafting = RecordingEngine(model, max_batch_size=1, max_seq_len=256, **speculating)
            runs["alone, speculating"] = (drafting, 0, drafting.generate_tokens([ids], params)[0])
        for run, (engine, request, run_tokens) in runs.items():
            drawn = zip(alone.drawn_from(0, len(solo_tokens)), engine.drawn_from(request, len(solo_tokens)), strict=True)
            for step, (solo, row) in enumerate(drawn):
                assert torch.equal(solo, row), f"{name} {run}: logits differ at step {step}"
            assert solo_tokens == run_tokens, f"{name} {run}"
