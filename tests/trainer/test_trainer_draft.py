"""A draft model for speculative decoding, trained beside the target as the README shows: a second
`trainer fit` on the same text into `<out>/draft`, the tiny preset with --block-size set to the target's
context (the draft only drafts while its cache holds the whole context)."""

from __future__ import annotations

from model import GPT, Engine, GPTConfig, SamplingParams, load_checkpoint

TARGET_CONTEXT = 96  # past the tiny preset's 64, so that the draft's own context must be raised to cover it
COMMON = ("--steps", "4", "--eval-interval", "4", "--lr", "3e-3", "--warmup-steps", "2")


def drafted_steps(target, draft, prompt: list[int], new_tokens: int) -> tuple[list[int], list[int]]:
    """The tokens of a greedy generation with `draft` (None: plain decoding), and the context length at
    each decode step that checked draft tokens (a fixed draft length: every step that can draft does)."""
    speculation = dict(draft_model=draft, draft_length=2) if draft else {}
    engine = Engine(target, max_batch_size=1, **speculation)
    engine.add(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eot=False), "r")
    tokens, contexts = [], []
    while engine.has_work():
        proposed = sum(engine.planner.stats.proposed.values()) if draft else 0
        context = len(prompt) + len(tokens)
        tokens += [event.token for event in engine.step()]
        if draft and sum(engine.planner.stats.proposed.values()) > proposed:
            contexts.append(context)
    return tokens, contexts


def test_a_draft_trained_beside_the_target_drafts_through_the_targets_whole_context(fit, tmp_path):
    fit(tmp_path, *COMMON, "--n-layer", "3", "--n-head", "3", "--n-embd", "48", "--block-size", str(TARGET_CONTEXT))
    fit(tmp_path / "draft", *COMMON, "--block-size", str(TARGET_CONTEXT))
    target, target_meta = load_checkpoint(tmp_path / "best_model.pt")
    draft, draft_meta = load_checkpoint(tmp_path / "draft" / "best_model.pt")
    short = GPT(GPTConfig.from_preset("tiny"))  # the preset's own context, 64 tokens (its weights do not matter)
    assert draft_meta["data_digest"] == target_meta["data_digest"]  # trained on the same tokens
    assert draft.config.block_size == target.config.block_size == TARGET_CONTEXT

    prompt, new_tokens = [464, 3290, 318, 257, 1049, 13], TARGET_CONTEXT - 6
    plain, _ = drafted_steps(target, None, prompt, new_tokens)
    covered, contexts = drafted_steps(target, draft, prompt, new_tokens)
    cut, short_contexts = drafted_steps(target, short, prompt, new_tokens)
    assert covered == cut == plain and len(plain) == new_tokens
    # Drafts are checked up to the target's last positions (a step drafts while two tokens are still due).
    assert contexts and max(contexts) >= TARGET_CONTEXT - 2
    # A draft with a shorter context stops where its cache is full, a third of the way from the end.
    assert short_contexts and max(short_contexts) <= short.config.block_size < TARGET_CONTEXT - 2
