"""Speculative decoding's edges: drafts never change a token, wherever they end and whatever happens
between checks; prompt lookup finds what it should; the planner drafts only where it pays.

The invariance matrix (test_model_invariance.py) proves the tokens and logits over every sampling
setting and layout. Here the draft model is mostly the target itself, whose drafts are always kept, so
that drafts reach past every limit a request has.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model import EOT_TOKEN, GPT, Engine, GPTConfig, SamplingParams
from model.generation import Sequence
from model.speculation import DRAFT, LOOKUP, MAX_DRAFT, PROBE_EVERY, Planner, PromptLookup

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
SEEDED = dict(top_k=None, seed=11)


def run(engine: Engine, requests: dict) -> dict:
    """Every request to its end: its events by request id."""
    for request_id, (prompt, params) in requests.items():
        engine.add(prompt, params, request_id)
    events: dict = {request_id: [] for request_id in requests}
    for event in engine.stream():
        events[event.request_id].append(event)
    return events


def plain(model: GPT, prompt: list[int], params: SamplingParams, tokenizer=None) -> list:
    return run(Engine(model, tokenizer, max_batch_size=1), {0: (prompt, params)})[0]


def drafting(model: GPT, draft: GPT | None = None, tokenizer=None, **options) -> Engine:
    return Engine(model, tokenizer, max_batch_size=4, draft_model=draft or model, draft_length=MAX_DRAFT, **options)


@pytest.mark.parametrize("max_new_tokens", range(1, 7))
def test_drafts_that_reach_past_max_new_tokens_are_cut(sharp_model, max_new_tokens):
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_at_eot=False)
    engine = drafting(sharp_model)
    [events] = run(engine, {0: (PROMPT, params)}).values()
    assert [e.token for e in events] == [e.token for e in plain(sharp_model, PROMPT, params)]
    assert [e.finish_reason for e in events] == [None] * (max_new_tokens - 1) + ["length"]
    # The first token comes from the prompt's pass; every later one but the last of a check was drafted.
    assert sum(e.drafted for e in events) == max(max_new_tokens - 2, 0)


def test_a_stop_string_inside_a_draft_ends_the_text_where_plain_decoding_does(sharp_model, tokenizer):
    free = plain(sharp_model, PROMPT, SamplingParams(max_new_tokens=20, stop_at_eot=False, **SEEDED), tokenizer)
    text = "".join(e.text for e in free)
    # Three characters from the start of a token inside the first draft (tokens 1 to 8 of the text, the
    # target drafting for itself), where they first occur, and not only blanks.
    starts = [sum(len(e.text) for e in free[:i]) for i in range(3, 7)]
    stop = next(s for s in (text[i : i + 3] for i in starts) if s.strip() and text.index(s) in starts)
    params = SamplingParams(max_new_tokens=20, stop=(stop,), stop_at_eot=False, **SEEDED)
    expected = plain(sharp_model, PROMPT, params, tokenizer)
    [events] = run(drafting(sharp_model, tokenizer=tokenizer), {0: (PROMPT, params)}).values()
    assert expected[-1].finish_reason == "stop" and len(expected) < 20
    assert [(e.token, e.text, e.finish_reason) for e in events] == [(e.token, e.text, e.finish_reason) for e in expected]
    assert events[-1].drafted  # the stop string ended the text inside a draft


def test_end_of_text_inside_a_draft_ends_the_request_there(sharp_model):
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    tokens = [e.token for e in plain(sharp_model, PROMPT, params)]
    # A model whose greedy text reaches end-of-text within a few tokens: the embedding row of end-of-text
    # made a scaled copy of a later token's, so that its logit beats that token's (and, first, others').
    model = copy.deepcopy(sharp_model)
    with torch.no_grad():
        model.transformer.wte.weight[EOT_TOKEN] = model.transformer.wte.weight[tokens[7]] * 1.5
    expected = plain(model, PROMPT, params)
    assert [e.token for e in expected][-1] == EOT_TOKEN and expected[-1].finish_reason == "stop"
    assert 2 < len(expected) < 12
    [events] = run(drafting(model), {0: (PROMPT, params)}).values()
    assert [(e.token, e.finish_reason) for e in events] == [(e.token, e.finish_reason) for e in expected]
    assert events[-1].drafted
    # Told to ignore end-of-text, both go on past it alike.
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eot=False)
    [events] = run(drafting(model), {0: (PROMPT, params)}).values()
    assert [e.token for e in events] == [e.token for e in plain(model, PROMPT, params)]
    assert EOT_TOKEN in [e.token for e in events[:-1]]


def test_a_request_cancelled_between_checks_frees_its_row_and_the_others_keep_their_tokens(sharp_model):
    params = SamplingParams(max_new_tokens=40, stop_at_eot=False, **SEEDED)
    other = SamplingParams(max_new_tokens=40, stop_at_eot=False, top_k=50, seed=3)
    engine = drafting(sharp_model)
    engine.add(PROMPT, params, "cancelled")
    engine.add(PROMPT[:4], other, "kept")
    seen: dict = {"cancelled": [], "kept": []}
    while len(seen["cancelled"]) < 5:
        for event in engine.step():
            seen[event.request_id].append(event.token)
    assert engine.planner.stats.accepted[DRAFT] > 0
    engine.cancel("cancelled")
    cancelled_at = len(seen["cancelled"])
    after = engine.step()
    assert engine.num_running == 1 and {e.request_id for e in after} == {"kept"}  # freed, without another token
    for event in [*after, *engine.stream()]:
        seen[event.request_id].append(event.token)
    assert len(seen["cancelled"]) == cancelled_at
    assert seen["cancelled"] == [e.token for e in plain(sharp_model, PROMPT, params)][: len(seen["cancelled"])]
    assert seen["kept"] == [e.token for e in plain(sharp_model, PROMPT[:4], other)]


def test_a_draft_model_swapped_mid_stream_changes_no_token(sharp_model, tiny_config):
    params = {
        "greedy": SamplingParams(max_new_tokens=40, temperature=0.0, stop_at_eot=False),
        "seeded": SamplingParams(max_new_tokens=40, stop_at_eot=False, **SEEDED),
        "top_p": SamplingParams(max_new_tokens=40, stop_at_eot=False, top_k=None, top_p=0.9, seed=5),
    }
    torch.manual_seed(7)
    stranger = GPT(tiny_config).eval()  # another model entirely: its drafts are mostly dropped
    engine = drafting(sharp_model, prompt_lookup=True)
    for name, p in params.items():
        engine.add(PROMPT + PROMPT, p, name)
    tokens: dict = {name: [] for name in params}
    for step, draft in enumerate([None, stranger, sharp_model, None, stranger] * 20):
        if not engine.has_work():
            break
        if step % 3 == 0:
            engine.set_draft(draft)
        for event in engine.step():
            tokens[event.request_id].append(event.token)
    assert not engine.has_work()
    for name, p in params.items():
        assert tokens[name] == [e.token for e in plain(sharp_model, PROMPT + PROMPT, p)], name
    assert engine.planner.stats.accepted[DRAFT] > 0


def test_a_request_that_turns_speculation_off_is_never_drafted_for(sharp_model):
    off = SamplingParams(max_new_tokens=20, temperature=0.0, speculate=False, stop_at_eot=False)
    on = SamplingParams(max_new_tokens=20, temperature=0.0, stop_at_eot=False)
    engine = drafting(sharp_model)
    events = run(engine, {"off": (PROMPT, off), "on": (PROMPT, on)})
    assert not any(e.drafted for e in events["off"]) and any(e.drafted for e in events["on"])
    assert [e.token for e in events["off"]] == [e.token for e in events["on"]]


def test_speculation_is_refused_where_it_could_change_tokens(sharp_model, tiny_config):
    with pytest.raises(ValueError, match="batch invariance"):
        Engine(sharp_model, batch_invariant=False, prompt_lookup=True)
    engine = Engine(sharp_model, prompt_lookup=True)
    with pytest.raises(ValueError, match="share a tokenizer"):
        engine.set_draft(GPT(GPTConfig.from_preset("tiny", vocab_size=1000)))
    with pytest.raises(ValueError, match="without speculation"):
        Engine(sharp_model).set_draft(sharp_model)
    for length in (0, MAX_DRAFT + 1):
        with pytest.raises(ValueError, match="fixed draft length"):
            Engine(sharp_model, prompt_lookup=True, draft_length=length)


def test_prompt_lookup_takes_the_latest_token_aligned_occurrence():
    lookup = PromptLookup()
    assert lookup.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3], 2) == [7, 8]  # the latest, not the first
    # [5, 7] occurs in the bytes of [0x500, 0x700, 0x100] one byte in, across tokens: not an occurrence.
    assert lookup.propose([0x500, 0x700, 0x100, 9, 5, 7], 3) == []


def sequences(count: int, generated: int = 0, **params) -> list[Sequence]:
    """Running requests whose prompt repeats, so that prompt lookup has MAX_DRAFT tokens to propose."""
    prompt = list(range(100, 120)) * 3
    made = []
    for i in range(count):
        seq = Sequence(i, prompt, SamplingParams(max_new_tokens=64, **params), torch.Generator(), None)
        seq.tokens = prompt[: generated + 1]
        made.append(seq)
    return made


def timed(planner: Planner, fixed: float, per_entry: float) -> Planner:
    for entries in (1, 8, 16, 40):
        planner.cost.observe(entries, fixed + per_entry * entries)
    return planner


def kept(planner: Planner, seqs: list[Sequence], proposed: int, accepted: int, times: int) -> None:
    for seq in seqs:
        for _ in range(times):
            planner.acceptance(seq, LOOKUP).update(proposed, accepted)


def test_the_planner_drafts_long_where_an_entry_is_cheap_and_drafts_are_kept():
    planner = timed(Planner(lookup=True, draft=None), fixed=0.010, per_entry=0.0001)
    [seq] = sequences(1, temperature=0.0)
    kept(planner, [seq], 4, 4, times=5)
    sources, found, depth = planner.plan([seq])
    assert sources == [LOOKUP] and depth == [MAX_DRAFT] and len(found[0]) == MAX_DRAFT


def test_the_planner_stops_drafting_where_passes_are_compute_bound():
    planner = timed(Planner(lookup=True, draft=None), fixed=0.0, per_entry=0.001)
    seqs = sequences(16, temperature=0.0)
    kept(planner, seqs, 4, 4, times=5)
    assert planner.plan(seqs)[2] == [0] * 16


def test_the_planner_stops_drafting_for_a_request_whose_drafts_miss_and_probes_it_again_later():
    planner = timed(Planner(lookup=True, draft=None), fixed=0.010, per_entry=0.0005)
    [seq] = sequences(1, temperature=0.0)
    kept(planner, [seq], 4, 0, times=30)
    depths = [planner.plan([seq])[2][0] for _ in range(PROBE_EVERY)]
    assert depths == [0] * (PROBE_EVERY - 1) + [1]
    assert planner.plan([seq])[2] == [0]
