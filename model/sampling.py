"""Batched next-token sampling with per-row temperature, top-k, top-p and random draws.

Every row is sampled by inverse transform with one uniform number drawn from that request's
generator, and every number on the way depends on that row's logits alone, never on the other rows
or on how many candidates they asked for: exponentials and prefix sums are exact per element, and
candidates are ranked by (logit, then lowest token id), a total order, so equal logits (frequent in
bf16) rank the same whichever kernel sorts them and however many candidates it is asked for.
"""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V).

    temperature (B,): 0 means greedy. top_k (B,): candidates per row, 0 for the whole vocabulary.
    top_p (B,): nucleus mass in (0, 1]. uniform (B,): one draw in [0, 1) per row.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    top_k = torch.where(top_k < 1, vocab, top_k.clamp(max=vocab))
    choice = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    whole = ~greedy & (top_k == vocab) & (top_p >= 1)
    ranked = ~greedy & ~whole
    if greedy.any():
        rows = _rows(greedy)
        # The first maximum, as argmax documents: ties go to the lowest token id, as in the ranking.
        choice[rows] = logits[rows].argmax(dim=-1)
    if whole.any():
        rows = _rows(whole)
        choice[rows] = _whole_vocabulary(logits[rows], scale[rows], uniform[rows])
    if ranked.any():
        rows = _rows(ranked)
        choice[rows] = _ranked(logits[rows], scale[rows], top_k[rows], top_p[rows], uniform[rows])
    return choice


def _rows(mask: torch.Tensor):
    """The rows `mask` selects: all of them as a slice (a view, no copy of the logits), else their indices."""
    return slice(None) if bool(mask.all()) else mask.nonzero()[:, 0]


def _whole_vocabulary(logits, scale, uniform):
    """Inverse transform over every token in id order: no ranking needed."""
    weights = torch.exp((logits - logits.amax(dim=-1, keepdim=True)) / scale[:, None])
    cumulative = weights.cumsum(dim=-1)
    total = cumulative[:, -1:].contiguous()
    choice = torch.searchsorted(cumulative, uniform[:, None] * total, right=True)
    # u * total can round up to total itself: the last token with any weight then.
    return torch.minimum(choice, torch.searchsorted(cumulative, total))[:, 0]


def _ranked(logits, scale, top_k, top_p, uniform):
    """Inverse transform over each row's top-k candidates, best first, cut to the top-p nucleus."""
    indices = _candidates(logits, top_k)
    k_max = indices.shape[1]
    values = logits.gather(1, indices)
    # Unnormalised weights: exp and a prefix sum are exact per element, so trailing candidates
    # that another row needed (masked to zero) cannot change this row's numbers.
    weights = torch.exp((values - values[:, :1]) / scale[:, None])
    ranks = torch.arange(k_max, device=logits.device)
    weights = weights.masked_fill(ranks[None, :] >= top_k[:, None], 0.0)
    cumulative = weights.cumsum(dim=-1)
    total = cumulative.gather(1, (top_k - 1)[:, None])
    # Nucleus: a candidate stays while the mass before it is under top_p; that keeps a prefix.
    kept = ((cumulative - weights) < top_p[:, None] * total).sum(dim=-1)
    kept = torch.minimum(kept, top_k).clamp(min=1)
    kept_total = cumulative.gather(1, (kept - 1)[:, None])
    choice = (cumulative <= uniform[:, None] * kept_total).sum(dim=-1)
    choice = torch.minimum(choice, kept - 1)
    return indices.gather(1, choice[:, None])[:, 0]


def _candidates(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Token ids (B, max top_k), each row's top-k first, best first, ties to the lower id.

    A float top-k finds them when every row's k-th logit beats its next (the set is then certain;
    only the order of equal logits inside it is sorted out); otherwise every logit is ranked."""
    vocab = logits.shape[-1]
    k_max = int(top_k.max())
    if k_max < vocab:
        values, ids = logits.topk(k_max + 1, dim=-1)
        if bool((values.gather(1, (top_k - 1)[:, None]) > values.gather(1, top_k[:, None])).all()):
            order = _rank_keys(values[:, :k_max], ids[:, :k_max], vocab).argsort(dim=-1, descending=True)
            return ids.gather(1, order)
    ids = torch.arange(vocab, device=logits.device).expand_as(logits)
    return _rank_keys(logits, ids, vocab).topk(k_max, dim=-1).indices


def _rank_keys(values: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """One int64 per candidate, ordered as (logit, then lower token id first): unique, so any
    kernel ranks them the same way."""
    bits = values.contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE floats as integers of the same order
    return ordered.to(torch.int64) * (1 << 32) + (vocab - 1 - ids)
