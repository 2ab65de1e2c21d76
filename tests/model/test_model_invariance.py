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
from invariancekit import (
    DTYPES, ENGINE_CASES, GPT2_LINEARS, LAYOUTS, NATIVE_CASES, NATIVE_ROW_LIMIT, RecordingEngine,
    check_joining_requests, layout, linear_layer, prompt,
)  # fmt: skip
from modelkit import sharpen
from tolerance import logits_bound

from model import SamplingParams
from model.generation import ANY_ROW_COUNT, PLAIN_FP32_ROW_RANGE, ROW_RANGE, decode_groups, row_range


@pytest.mark.parametrize("dtype,weights", LAYOUTS, ids=[f"{d}-{w}" for d, w in LAYOUTS])
def test_seeded_requests_joining_a_running_batch_draw_from_their_solo_numbers(mini, dtype, weights):
    check_joining_requests(layout(mini, dtype, weights), {})


@pytest.mark.parametrize("dtype,weights,kernel_path", ENGINE_CASES, ids=["-".join(c) for c in ENGINE_CASES],
                         indirect=["kernel_path"])  # fmt: skip
def test_on_our_kernels_requests_joining_a_running_batch_draw_from_their_solo_numbers(mini, dtype, weights, kernel_path):
    model = layout(mini, dtype, weights)
    assert row_range(model) == ANY_ROW_COUNT  # no padding, no row-count groups
    check_joining_requests(model, {})


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
