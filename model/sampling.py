"""Batched next-token sampling with per-row temperature, top-k, top-p and random draws.

Every row is sampled by inverse transform over its own sorted candidates with one uniform number
drawn from that request's generator, so a row's token never depends on the other rows in the batch
or on how many candidates they asked for.
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
    top_k = torch.where(top_k < 1, vocab, top_k.clamp(max=vocab))
    k_max = int(top_k.max())
    values, indices = logits.topk(k_max, dim=-1)
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
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
    threshold = uniform[:, None] * kept_total
    choice = (cumulative <= threshold).sum(dim=-1)
    choice = torch.minimum(choice, kept - 1)
    choice = torch.where(greedy, torch.zeros_like(choice), choice)
    return indices.gather(1, choice[:, None])[:, 0]
