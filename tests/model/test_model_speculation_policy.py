"""Speculation's policy parts (model/speculation.py): what prompt lookup proposes and how pass timings are
kept. They decide only how soon tokens come; test_model_invariance.py proves they never change one."""

from __future__ import annotations

import pytest
import torch
from modelkit import sharpen

from model import GPT, Engine, GPTConfig, SamplingParams
from model.speculation import TIMING_RISE, PassCost, PromptLookup


@pytest.mark.parametrize(
    ("context", "most", "proposed"),
    [
        ([1, 2, 3, 4, 5, 1, 2], 3, [3, 4, 5]),  # what followed the earlier occurrence
        ([1, 2, 3, 4, 5, 1, 2], 8, [3, 4, 5, 1, 2, 3, 4, 5]),  # a copy running on into its own proposal
        ([5, 5, 5, 5], 4, [5, 5, 5, 5]),  # a token repeated: the repetition goes on, not one token a pass
        ([1, 2, 3, 9, 1, 2, 3, 9, 1, 2], 5, [3, 9, 1, 2, 3]),
        ([1, 2, 3], 3, []),  # no earlier occurrence
    ],
)
def test_prompt_lookup_proposes_what_followed_and_continues_a_repetition(context, most, proposed):
    assert PromptLookup().propose(context, most) == proposed


def test_pass_timings_follow_the_fastest_passes():
    cost = PassCost()
    cost.observe(1, 0.010)
    cost.observe(1, 0.110)  # slowed down by another process: the estimate rises by a share of the difference
    assert cost.timed[False][1] == pytest.approx(0.010 + TIMING_RISE * 0.100)
    cost.observe(1, 0.009)  # a faster pass replaces it
    assert cost.timed[False][1] == 0.009
    for _ in range(200):  # a machine that stays slower is followed, pass by pass
        cost.observe(1, 0.020)
    assert cost.timed[False][1] == pytest.approx(0.020, rel=1e-3)


def test_one_slow_longer_pass_does_not_price_drafting_out():
    cost = PassCost()
    for _ in range(10):
        cost.observe(1, 0.010)
    cost.observe(3, 0.011)
    cost.observe(3, 0.060)  # a three-entry pass that waited for the core
    fixed, per_entry = cost.fit()
    # (Averaging the two three-entry timings as before put an entry above the whole fixed cost: 1.2x.)
    assert per_entry < 0.25 * fixed
    cost.observe_draft(2, 0.004)
    cost.observe_draft(2, 0.040)
    assert cost.draft_pass == pytest.approx(0.002 + TIMING_RISE * 0.018)


def test_a_new_request_starts_from_the_acceptance_of_the_requests_before_it():
    torch.manual_seed(0)
    target = sharpen(GPT(GPTConfig.from_preset("tiny"))).eval()
    torch.manual_seed(1)
    misleading = sharpen(GPT(GPTConfig.from_preset("tiny"))).eval()  # other random weights: drafts that miss
    engine = Engine(target, max_batch_size=1, draft_model=misleading)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, stop_at_eot=False)

    def first_decode_proposes(prompt: list[int]) -> bool:
        engine.add(prompt, params)
        engine.step()  # the prefill
        before = engine.planner.stats.proposed["draft"]
        engine.step()
        proposed = engine.planner.stats.proposed["draft"] > before
        while engine.has_work():
            engine.step()
        return proposed

    assert first_decode_proposes([1, 2, 3, 4])  # no checks yet: even odds, worth a draft
    stats = engine.planner.stats
    assert stats.proposed["draft"] > 0 and stats.accepted["draft"] < stats.proposed["draft"] / 4
    assert engine.planner.recent["draft", False].rate < 0.5  # below the even odds it started from
    assert not first_decode_proposes([5, 6, 7, 8])  # starts where the first left off: not worth one
    # The first request's probe after 32 idle steps missed too: the next requests wait twice as long,
    # past their 40 tokens, and check no draft at all.
    assert engine.planner.missed_probes["draft", False] == 1
    proposed = stats.proposed["draft"]
    for prompt in ([9, 10, 11], [12, 13, 14]):
        first_decode_proposes(prompt)
    assert stats.proposed["draft"] == proposed
    # A request that samples would start from even odds: greedy text's acceptance says nothing of sampled text's.
    assert engine.planner.recent["draft", True].rate == 0.5 and not engine.planner.missed_probes["draft", True]


def test_sampled_passes_are_priced_apart_from_greedy_ones():
    cost = PassCost()
    cost.observe(1, 0.0050)
    cost.observe(2, 0.0053)
    assert cost.fit(True) == cost.fit(False)  # until a sampled pass is timed, the greedy timings stand in
    cost.observe(1, 0.0060, sampling=True)
    cost.observe(2, 0.0072, sampling=True)  # a top-k draw per entry costs more than the entry's pass
    assert cost.fit(False) == pytest.approx((0.0047, 0.0003))
    assert cost.fit(True) == pytest.approx((0.0048, 0.0012))
