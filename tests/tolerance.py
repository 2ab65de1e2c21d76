"""Bounds for comparisons that are not exact by design, derived from floating-point arithmetic, not from what
one CPU happened to compute.

Two evaluations of one expression that round differently (another summation order, blocking, vector width
or fused multiply-add: what separates CPUs, kernels and libraries) each stay within γ_n·Σ|terms| of the
exact value for every reduction of n terms on the way, so they differ by at most twice that. The worst
case, γ_n = n·u / (1 − n·u) with u = eps/2 (Higham, Accuracy and Stability of Numerical Algorithms, §3.1),
grows with n and would let a 50,257-term softmax hide a 1% error; rounding errors that are independent and
of mean zero grow with √n instead, and γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1 holds with probability
at least 1 − 2n·exp(−λ²(1 − u)²/2) (Higham and Mary, A New Approach to Probabilistic Rounding Error
Analysis, SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4). λ = 7 makes that a failure in more than 10⁵
runs for the longest reduction here. A value computed through a chain of reductions, a network's layers,
gets the sum over the chain (to first order in u, every step at the magnitude given). The magnitude is the
largest Σ|terms| involved (for a matrix product, the largest entry of |A|·|B|) or a stated bound on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model import GPTConfig


LAMBDA = 7.0


def gamma(dtype: torch.dtype, n: int) -> float:
    """γ̃_n(λ): the relative error of a reduction of n terms in `dtype`, but with negligible probability."""
    u = torch.finfo(dtype).eps / 2
    return math.expm1(LAMBDA * math.sqrt(n) * u + n * u * u / (1 - u))


def rounding_bound(dtype: torch.dtype, magnitude: float, *lengths: int) -> float:
    """How far apart two evaluations may be after reductions of `lengths` terms, at `magnitude`."""
    return 2 * float(magnitude) * sum(gamma(dtype, n) for n in lengths)


def product_magnitude(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest Σ|a_ik·b_kj| of the product a @ b."""
    return (a.double().abs() @ b.double().abs()).max().item()


def network_lengths(config: GPTConfig, positions: int) -> list[int]:
    """The reductions behind one of a GPT's logits, first to last: in every block the two layer norms
    (mean and variance over n_embd), the query, key and value projection (n_embd), the query-key products
    (head_dim), the softmax's sum and the weighted sum of values (`positions`), the output projection
    (n_embd) and the MLP's two products (n_embd, 4·n_embd); then the final layer norm and the head (n_embd)."""
    c = config.n_embd
    block = [c, c, c, config.head_dim, positions, positions, c, c, c, c, 4 * c]
    return block * config.n_layer + [c, c, c]


def cross_entropy_bounds(x, weight, targets, bf16: bool = False) -> list[float]:
    """How far two evaluations of the mean cross-entropy of the logits x @ weight.T against targets (-1
    ignored), and of its gradients with respect to x and weight, may part.

    The logits are products of C terms; in bf16 the products' inputs and outputs are also rounded to bf16
    (three roundings of u each). A logit off by δ moves its probability by a factor within e^(±2δ) (the
    softmax's own sum of V terms adds γ_V), so the probabilities carry a relative error ε. Each output is
    then a reduction over rows (the loss's mean and the weight's gradient, N terms) or over the vocabulary
    (the input's gradient, V terms) of terms known within ε, so its bound is its own sum of absolute terms
    times 2·(ε + γ) over its reduction."""
    u_bf16 = torch.finfo(torch.bfloat16).eps / 2
    (rows, width), vocab = x.shape, weight.shape[0]
    valid = targets != -1
    share = (valid / valid.sum())[:, None].double()
    z = x.double() @ weight.double().T
    logit_error = rounding_bound(torch.float32, product_magnitude(x, weight.T), width) + (
        3 * u_bf16 * product_magnitude(x, weight.T) if bf16 else 0.0)
    epsilon = 2 * logit_error + 2 * gamma(torch.float32, vocab) + (2 * u_bf16 if bf16 else 0.0)
    gradient = torch.softmax(z, dim=1) - F.one_hot(targets.where(valid, 0), vocab).double()
    row_loss = (torch.logsumexp(z, dim=1) - z.gather(1, targets.where(valid, 0)[:, None])[:, 0]).abs()
    magnitudes = [
        (row_loss[:, None] * share).sum().item() + logit_error,
        product_magnitude(gradient * share, weight.double()),
        product_magnitude(gradient.T, x.double() * share),
    ]
    reductions = [rows, vocab, rows]
    rounding = [2 * u_bf16 if bf16 else 0.0] * 3  # bf16 outputs of the two gradients' products
    return [m * (2 * epsilon + 2 * gamma(torch.float32, n) + r) for m, n, r in zip(magnitudes, reductions, rounding)]


def logits_bound(model, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """How far two evaluations of `model`'s logits for `idx` (B, T) may part: the network's chain of
    reductions at the magnitude of the head's product, the largest Σ|terms| a logit is made of (layer norms
    keep every earlier stage's relative error at most as large, to first order)."""
    head_inputs = []
    hook = model.transformer.ln_f.register_forward_hook(lambda module, args, out: head_inputs.append(out.detach()))
    try:
        with torch.no_grad():
            model(idx)
    finally:
        hook.remove()
    h = head_inputs[0].float().flatten(0, 1)
    weight = model.transformer.wte.weight.detach().float()[: model.config.vocab_size]
    return rounding_bound(dtype, product_magnitude(h, weight.T), *network_lengths(model.config, idx.shape[1]))


def linear_bound(linear: torch.nn.Linear, x: torch.Tensor) -> float:
    """How far two evaluations of `linear(x)` may part: one reduction over the input width (and the bias)."""
    rows = x.reshape(-1, x.shape[-1]).detach()
    magnitude = product_magnitude(rows, linear.weight.detach().T)
    if linear.bias is not None:
        magnitude += linear.bias.detach().abs().max().item()
    return rounding_bound(linear.weight.dtype, magnitude, x.shape[-1] + 1)
