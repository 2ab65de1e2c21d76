"""Batched next-token sampling with per-row temperature, top-k, top-p and random keys.

Every row is sampled by the Gumbel-max trick: the token with the highest tempered logit plus Gumbel
noise, among the row's candidates, which draws exactly from the tempered, truncated softmax. The noise
of each (row, token) comes from a counter-based hash of the row's key and the token id, not from a
stream: a key is one request's draw for one position, so the token picked there depends on that
row's logits and key alone, never on the other rows, on how many candidates they asked for, or on
when it is asked. Two models' rows given the same key share their noise token by token, so where
their distributions are close they pick the same token (Gumbel coupling: the same token with
probability at least (1 - d) / (1 + d), d the distributions' total variation distance). Speculative
decoding's draft model relies on that, and samples its drafts with the key of each position.

Candidates are ranked by (logit, then lowest token id), a total order, so equal logits (frequent in
bf16) rank the same whichever kernel sorts them and however many candidates it is asked for; the
nucleus is a prefix of that ranking, its prefix sums exact per element.
"""

from __future__ import annotations

import torch

KEY_BITS = 62  # a key's random bits: two 32-bit words' worth that fits a signed int64


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    keys: torch.Tensor,
) -> torch.Tensor:
    """Pick one token per row of `logits` (B, V).

    temperature (B,): 0 means greedy. top_k (B,): candidates per row, 0 for the whole vocabulary.
    top_p (B,): nucleus mass in (0, 1]. keys (B,): int64 in [0, 2**KEY_BITS), one per row.
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
        ids = torch.arange(vocab, device=logits.device)
        choice[rows] = _perturbed(logits[rows], scale[rows], keys[rows], ids).argmax(dim=-1)
    if ranked.any():
        rows = _rows(ranked)
        choice[rows] = _ranked(logits[rows], scale[rows], top_k[rows], top_p[rows], keys[rows])
    return choice


def gumbel(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise (float64) for each row's key (B,) and token ids ((V,) or (B, V)).

    A 32-bit hash of the key's two words and the id, in int32 tensors whose products wrap around as
    unsigned ones do (the bits are the same), so it is the same on every device and batch shape."""
    low, high = _word(keys), _word(keys >> 32)
    bits = _mix32((low[:, None] + ids.to(torch.int32)) ^ high[:, None])
    # bits as unsigned, centred in its 2**32 steps: uniform in (0, 1), never 0 or 1.
    uniform = (bits.double() + (2**31 + 0.5)) / 2.0**32
    return -torch.log(-torch.log(uniform))


def _word(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of int64 `x`, as int32 (two's complement)."""
    low = x & 0xFFFFFFFF
    return torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit words with full avalanche (xor-shift-multiply; the masks make the shifts
    logical on signed words)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x21F0AAAD
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x735A2D97
    return x ^ ((x >> 15) & 0x1FFFF)


def _perturbed(logits, scale, keys, ids):
    """Tempered logits plus each (row, token id)'s noise: the Gumbel-max scores."""
    return logits.double() / scale.double()[:, None] + gumbel(keys, ids)


def _rows(mask: torch.Tensor):
    """The rows `mask` selects: all of them as a slice (a view, no copy of the logits), else their indices."""
    return slice(None) if bool(mask.all()) else mask.nonzero()[:, 0]


def _ranked(logits, scale, top_k, top_p, keys):
    """The Gumbel-max pick among each row's top-k candidates, cut to the top-p nucleus."""
    indices = _candidates(logits, top_k)
    k_max = indices.shape[1]
    values = logits.gather(1, indices)
    # Unnormalised weights: exp and a prefix sum are exact per element, so trailing candidates
    # that another row needed (masked to zero) cannot change this row's nucleus.
    weights = torch.exp((values - values[:, :1]) / scale[:, None])
    ranks = torch.arange(k_max, device=logits.device)
    weights = weights.masked_fill(ranks[None, :] >= top_k[:, None], 0.0)
    cumulative = weights.cumsum(dim=-1)
    total = cumulative.gather(1, (top_k - 1)[:, None])
    # Nucleus: a candidate stays while the mass before it is under top_p; that keeps a prefix.
    kept = ((cumulative - weights) < top_p[:, None] * total).sum(dim=-1)
    kept = torch.minimum(kept, top_k).clamp(min=1)
    scores = _perturbed(values, scale, keys, indices).masked_fill(ranks[None, :] >= kept[:, None], -torch.inf)
    return indices.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0]


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
