"""Seeded sampling does not depend on the batch: a request's numbers are the same alone or batched.

A row's logits must match its solo run bit for bit, whatever else shares its steps: prompts of other
lengths prefilled in the same step, rows joining and leaving, the batch's size and the row's place
in it. Sampling over the whole vocabulary turns any last-bit difference into another token, so the
models here are fresh (near-uniform logits, nothing sharpened) and every sampling setting is tried.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model import GPT, Engine, GPTConfig, SamplingParams, native
from model.decode_linear import DecodeLinear, use_native
from model.generation import ANY_ROW_COUNT, PLAIN_FP32_ROW_RANGE, ROW_RANGE, decode_groups, row_range
from model.packing import PackedLinear, pack
from model.quantize import Int8Linear, quantize
from modelkit import sharpen
from tolerance import logits_bound

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


@pytest.fixture(scope="module")
def mini() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("mini")).eval()


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 50257, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def kernel_path(request):
    """Our kernels forced onto one path for the test (every path the C++ source has: this CPU must run it)."""
    if not native.available():
        pytest.skip(f"the decode kernels are not built here: {native.status()}")
    if request.param not in native.supported_paths():
        pytest.skip(f"path {request.param} needs {native.NEEDS[request.param]}, which this CPU lacks")
    native.use_path(request.param)
    yield request.param
    native.use_path(None)


@pytest.fixture(scope="module")
def draft(mini) -> GPT:
    """A draft model whose distributions are near the target's, as a trained draft's are: its proposals,
    sampled with each request's own random numbers, are mostly kept and sometimes not."""
    model = copy.deepcopy(mini)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)) * 0.002)
    return model


SPECULATION = ["off", "lookup", "draft"]


def speculation(mode: str, draft: GPT) -> dict:
    """Engine options: none, or drafts from one source, as many tokens wherever a request can take them
    (prompt lookup finds drafts where greedy text loops; the draft model, run once per draft token, drafts
    two at a time for the tests' time)."""
    return {"off": {}, "lookup": dict(prompt_lookup=True, draft_length=4), "draft": dict(draft_model=draft, draft_length=2)}[mode]


@pytest.mark.parametrize("mode", SPECULATION)
@pytest.mark.parametrize("dtype,weights", LAYOUTS, ids=[f"{d}-{w}" for d, w in LAYOUTS])
def test_seeded_requests_joining_a_running_batch_draw_from_their_solo_numbers(mini, draft, dtype, weights, mode):
    check_joining_requests(layout(mini, dtype, weights), speculation(mode, draft))


@pytest.mark.parametrize("mode", SPECULATION)
@pytest.mark.parametrize("dtype,weights,kernel_path", ENGINE_CASES, ids=["-".join(c) for c in ENGINE_CASES],
                         indirect=["kernel_path"])  # fmt: skip
def test_on_our_kernels_requests_joining_a_running_batch_draw_from_their_solo_numbers(
    mini, draft, dtype, weights, kernel_path, mode
):
    model = layout(mini, dtype, weights)
    assert row_range(model) == ANY_ROW_COUNT  # no padding, no row-count groups
    check_joining_requests(model, speculation(mode, draft))


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
    # are padded to 16) and shrinks again, moving rows around the cache as they leave.
    fillers = {
        f"filler {i}": (prompt(2 + 5 * i, 100 + i), SamplingParams(max_new_tokens=3 + 2 * i, seed=i, stop_at_eot=False), i % 5)
        for i in range(14)
    }  # fmt: skip
    batched = RecordingEngine(model, max_batch_size=20, max_seq_len=256, **speculating)
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


@pytest.mark.parametrize("dtype,weights,kernel_path", NATIVE_CASES, ids=["-".join(c) for c in NATIVE_CASES],
                         indirect=["kernel_path"])  # fmt: skip
def test_our_kernels_keep_each_row_at_every_row_count(dtype, weights, kernel_path):
    """Each row's product has the same bits at every row count from 1 to NATIVE_ROW_LIMIT, on every path.
    The LM head is cut to 1041 outputs: its partial last block of 17 (50257 = 785 * 64 + 17) at a
    fraction of the scalar path's time."""
    torch.manual_seed(0)
    for inputs, outputs in GPT2_LINEARS[:-1] + [(768, 1041)]:
        layer = linear_layer(torch.nn.Linear(inputs, outputs).to(DTYPES[dtype]), dtype, weights)
        x = torch.randn(NATIVE_ROW_LIMIT, inputs).to(DTYPES[dtype])
        with torch.no_grad():
            full = layer(x)
            for rows in range(1, NATIVE_ROW_LIMIT):
                assert torch.equal(layer(x[:rows]), full[:rows]), f"{inputs}->{outputs}: {rows} rows"
            for start in range(1, 4):  # and wherever a row sits among the others
                assert torch.equal(layer(x[start : start + 5]), full[start : start + 5]), f"{inputs}->{outputs}"


@pytest.mark.parametrize("dtype,weights", LAYOUTS, ids=[f"{d}-{w}" for d, w in LAYOUTS])
def test_linear_kernels_keep_each_row_over_the_engines_row_counts(dtype, weights):
    """Within the row range the engine decodes in, each row's product is the same for every count."""
    torch.manual_seed(0)
    for inputs, outputs in GPT2_LINEARS:
        linear = torch.nn.Linear(inputs, outputs).to(DTYPES[dtype])
        layer = linear_layer(linear, dtype, weights)
        fewest, most = row_range(layer)
        most = min(most, 64)  # int8's range is unbounded
        x = torch.randn(most, inputs).to(DTYPES[dtype])
        with torch.no_grad():
            full = layer(x)
            for rows in range(fewest, most):
                assert torch.equal(layer(x[:rows]), full[:rows]), f"{inputs}->{outputs}: {rows} rows"


def test_decode_groups_stay_within_the_row_range():
    for fewest, most in (ROW_RANGE, PLAIN_FP32_ROW_RANGE):
        assert decode_groups(1, fewest, most) == [range(0, 1)]
        for rows in range(fewest, 300):
            groups = decode_groups(rows, fewest, most)
            assert [i for g in groups for i in g] == list(range(rows))
            assert all(fewest <= len(g) <= most for g in groups), rows


@pytest.mark.parametrize("weights", ["plain", "packed"])
def test_without_batch_invariance_the_batched_path_computes_each_request_as_alone(mini, weights):
    """--no-batch-invariant's path (padded prefill, masked attention, any row count) is the same
    computation up to rounding: every row's logits within rounding of its solo run's, and the same
    greedy tokens from weights sharpened so that tokens are decided by real margins."""
    model = layout(sharpen(copy.deepcopy(mini)), "fp32", weights)
    requests = {
        f"r{i}": (prompt(length, i), SamplingParams(max_new_tokens=6 + i, temperature=0.0, stop_at_eot=False), join)
        for i, (length, join) in enumerate(zip((1, 90, 7, 33, 150, 2, 64), (0, 0, 0, 2, 2, 3, 5)))
    }
    batched = RecordingEngine(model, max_batch_size=8, max_seq_len=256, batch_invariant=False)
    tokens: dict = {}
    step = 0
    while step <= 5 or batched.has_work():
        for name, (ids, params, join) in requests.items():
            if join == step:
                batched.add(ids, params, request_id=name)
        for event in batched.step():
            tokens.setdefault(event.request_id, []).append(event.token)
        step += 1
    for name, (ids, params, _) in requests.items():
        alone = RecordingEngine(model, max_batch_size=1, max_seq_len=256)
        assert alone.generate_tokens([ids], params)[0] == tokens[name], name
        bound = logits_bound(model, torch.tensor([ids + tokens[name]]))
        drawn = zip(alone.drawn_from(0, len(tokens[name])), batched.drawn_from(name, len(tokens[name])), strict=True)
        for step, (solo, row) in enumerate(drawn):
            assert (row - solo).abs().max().item() <= bound, f"{name}: logits at step {step}"
