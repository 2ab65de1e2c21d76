import math

import pytest
import torch

from model import EOT_TOKEN, ContextLengthError, Engine, GPT, SamplingParams
from model.sampling import KEY_BITS, sample

PROMPTS = [[464, 2068, 7586, 21831], [15496], [40, 1101, 257, 1310, 3797, 11, 290, 314, 588, 284, 467], [50, 51]]
SAMPLED = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_at_eot=False)
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, stop_at_eot=False)


def recompute_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    idx = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx)
            token = int(logits[0, -1].argmax())
            out.append(token)
            idx = torch.cat([idx, torch.tensor([[token]])], dim=1)
    return out


def test_kv_cache_decoding_equals_full_recomputation(sharp_model):
    engine = Engine(sharp_model, max_batch_size=4)
    generated = engine.generate_tokens(PROMPTS, GREEDY)
    for prompt, tokens in zip(PROMPTS, generated):
        assert tokens == recompute_greedy(sharp_model, prompt, GREEDY.max_new_tokens)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_a_request_gives_the_same_tokens_alone_or_batched(sharp_model, params):
    alone = [Engine(sharp_model, max_batch_size=1).generate_tokens([p], params)[0] for p in PROMPTS]
    batched = Engine(sharp_model, max_batch_size=4).generate_tokens(PROMPTS, params)
    assert batched == alone


def test_requests_joining_a_running_batch_are_unaffected(sharp_model):
    alone = [Engine(sharp_model, max_batch_size=1).generate_tokens([p], SAMPLED)[0] for p in PROMPTS]
    engine = Engine(sharp_model, max_batch_size=4)
    out = {}
    engine.add(PROMPTS[0], SAMPLED, request_id=0)
    for step in range(1, 40):
        if step < len(PROMPTS):
            engine.add(PROMPTS[step], SAMPLED, request_id=step)  # joins mid-flight, one per step
        for event in engine.step():
            out.setdefault(event.request_id, []).append(event.token)
    assert [out[i] for i in range(len(PROMPTS))] == alone


def test_short_requests_leave_the_batch_as_soon_as_they_finish(sharp_model):
    engine = Engine(sharp_model, max_batch_size=2)
    engine.add(PROMPTS[0], SamplingParams(max_new_tokens=3, temperature=0), request_id="short")
    engine.add(PROMPTS[1], SamplingParams(max_new_tokens=30, temperature=0, stop_at_eot=False), request_id="long")
    engine.add(PROMPTS[2], SamplingParams(max_new_tokens=3, temperature=0), request_id="next")
    finished_at = {}
    for step, events in enumerate(iter(engine.step, None)):
        for e in events:
            if e.finished:
                finished_at[e.request_id] = step
        if not engine.has_work():
            break
    assert finished_at["short"] == 2
    assert finished_at["next"] == 5  # took the freed row at step 3, while "long" kept going
    assert finished_at["long"] == 29


def test_seed_reproduces_and_different_seeds_differ(sharp_model):
    engine = Engine(sharp_model, max_batch_size=4)
    first = engine.generate_tokens([PROMPTS[0]], SAMPLED)
    assert engine.generate_tokens([PROMPTS[0]], SAMPLED) == first
    other = SamplingParams(**{**SAMPLED.__dict__, "seed": 8})
    assert engine.generate_tokens([PROMPTS[0]], other) != first


def test_finish_reasons_length_stop_string_and_end_of_text(sharp_model, tokenizer):
    engine = Engine(sharp_model, tokenizer, max_batch_size=2)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    events = list(engine.stream()) if engine.add(PROMPTS[0], params) is not None else []
    assert [e.finish_reason for e in events] == [None] * 11 + ["length"]
    text = "".join(e.text for e in events)
    assert text == tokenizer.decode([e.token for e in events])

    stop = text[len(text) // 2 : len(text) // 2 + 3]
    engine.add(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,)))
    stopped = list(engine.stream())
    assert stopped[-1].finish_reason == "stop"
    assert "".join(e.text for e in stopped) == text[: text.index(stop)]

    with torch.no_grad():
        eot = sharp_model.transformer.wte.weight[EOT_TOKEN]
        eot.copy_(torch.randn_like(eot) * 10)
        sharp_model.transformer.ln_f.weight.zero_()
        sharp_model.transformer.ln_f.bias.copy_(eot)
    engine = Engine(sharp_model, tokenizer, max_batch_size=1)
    engine.add(PROMPTS[0], params)
    (event,) = list(engine.stream())
    assert (event.token, event.text, event.finish_reason) == (EOT_TOKEN, "", "stop")


def test_context_overflow_and_empty_prompts_are_refused(sharp_model):
    engine = Engine(sharp_model, max_batch_size=1)
    with pytest.raises(ContextLengthError, match="prompt's 120 tokens plus max_new_tokens 9 exceed the context of 128"):
        engine.add([1] * 120, SamplingParams(max_new_tokens=9))
    with pytest.raises(ValueError, match="at least one token"):
        engine.add([], SamplingParams())
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)


def test_cancelled_requests_stop_and_free_their_row(sharp_model):
    engine = Engine(sharp_model, max_batch_size=1)
    engine.add(PROMPTS[0], GREEDY, request_id="gone")
    engine.add(PROMPTS[1], GREEDY, request_id="waiting")
    assert [e.request_id for e in engine.step()] == ["gone"]
    engine.cancel("gone")
    ids = {e.request_id for e in engine.stream()}
    assert ids == {"waiting"}


def keys(n: int, seed: int = 0) -> torch.Tensor:
    """n random keys, the same on every run: the sampling checks below have one fixed outcome."""
    return torch.randint(2**KEY_BITS, (n,), generator=torch.Generator().manual_seed(seed))


def share_bound(p: float, n: int) -> float:
    """Five standard errors of a share of n independent draws that each hit with probability p: what a
    correct sampler's share strays by once in about 1.7 million fixed sets of keys."""
    return 5 * math.sqrt(p * (1 - p) / n)


def test_top_k_never_samples_outside_the_k_most_likely():
    torch.manual_seed(0)
    logits = torch.randn(1, 1000) * 3
    allowed = set(logits[0].topk(5).indices.tolist())
    n = 2000
    tokens = sample(logits.expand(n, -1), torch.ones(n), torch.full((n,), 5), torch.ones(n), keys(n))
    assert set(tokens.tolist()) == allowed


def test_sampling_follows_the_tempered_distribution_and_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 20000
    for temperature in (0.5, 1.0, 2.0):
        for top_k in (0, 4):  # the whole vocabulary, and ranked candidates of which the last has no mass
            tokens = sample(logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_k),
                            torch.ones(n), keys(n, seed=top_k))  # fmt: skip
            expected = torch.softmax(logits[0, : top_k or None] / temperature, dim=0)
            observed = torch.bincount(tokens, minlength=5).float() / n
            for token, p in enumerate(expected.tolist()):
                assert abs(observed[token].item() - p) <= share_bound(p, n), (temperature, top_k, token)
            assert observed[len(expected) :].sum() == 0
    # top_p 0.6 keeps the first two tokens (their mass before each is 0 and 0.47 < 0.6), renormalised.
    tokens = sample(logits.expand(n, -1), torch.ones(n), torch.zeros(n, dtype=torch.long), torch.full((n,), 0.6), keys(n))
    probs = torch.softmax(logits[0], dim=0)
    observed = torch.bincount(tokens, minlength=5).float() / n
    first = (probs[0] / probs[:2].sum()).item()
    assert abs(observed[0].item() - first) <= share_bound(first, n)
    assert observed[2:].sum() == 0
    greedy = sample(logits.expand(3, -1), torch.zeros(3), torch.full((3,), 5), torch.ones(3), keys(3))
    assert greedy.tolist() == [0, 0, 0]


@pytest.mark.parametrize("top_k", [0, 50])
def test_two_nearby_distributions_sampled_with_the_same_keys_mostly_pick_the_same_token(top_k):
    """Gumbel coupling, which lets a draft model's sampled drafts match the target's tokens: with shared
    keys two distributions d apart in total variation agree at least (1 - d) / (1 + d) of the time; with
    independent keys only Σ p·q of the time."""
    torch.manual_seed(1)
    target = torch.randn(1, 1000) * 2
    draft = target + torch.randn(1, 1000) * 0.5
    n = 4000
    params = torch.ones(n), torch.full((n,), top_k), torch.ones(n)
    k = top_k or 1000

    def truncated(logits):
        top = logits[0].topk(k)
        return torch.zeros(1000, dtype=torch.float64).index_put_((top.indices,), torch.softmax(top.values.double(), 0))

    p, q = truncated(target), truncated(draft)
    d = 0.5 * (p - q).abs().sum().item()
    shared = (sample(target.expand(n, -1), *params, keys(n)) == sample(draft.expand(n, -1), *params, keys(n)))
    independent = (sample(target.expand(n, -1), *params, keys(n)) == sample(draft.expand(n, -1), *params, keys(n, 1)))
    coupled, chance = (1 - d) / (1 + d), (p * q).sum().item()
    assert coupled > chance + 0.3  # the case is one where coupling matters
    assert shared.double().mean().item() >= coupled - share_bound(coupled, n)
    assert abs(independent.double().mean().item() - chance) <= share_bound(chance, n)


def test_nanogpt_generate_convenience(sharp_model):
    idx = torch.tensor([PROMPTS[0], PROMPTS[0]])
    out = sharp_model.generate(idx, max_new_tokens=5, temperature=0.0)
    assert out.shape == (2, 9)
    assert out[0, 4:].tolist() == recompute_greedy(sharp_model, PROMPTS[0], 5)
    sampled = sharp_model.generate(idx, max_new_tokens=5, top_k=1)
    assert sampled.tolist() == out.tolist()
