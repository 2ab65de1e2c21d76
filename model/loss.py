"""The language model's cross-entropy, computed a block of rows at a time without materialising the logits.

The head turns every position into 50,257 logits: at the training benchmark's shape (2,048 positions
per step) that is a 400 MB tensor, written by the matrix product, read and written again by the
log-softmax, then by its gradient, then read by both backward products: the largest cost of a CPU
training step, and on a GPU its largest piece of memory. `linear_cross_entropy` instead takes the rows
in blocks of about `CHUNK_BYTES` of logits. For each block one softmax gives both the loss (minus the
log of the target's probability) and the gradient of the logits (the probabilities, less one at the
target), which go straight into the two products that make the gradients of the hidden states and of
the head's weight. Only one block's logits ever exist. The gradients are therefore computed in the
forward pass and handed out by the backward pass (the technique of fused linear + cross-entropy
kernels such as Liger-Kernel's).

Under autocast the products run in the autocast dtype, as `F.linear` would; the softmax keeps float32
inside, as the autocast path's float32 cross-entropy does.
"""

from __future__ import annotations

import torch

# Logits per block. Big enough that the head's weight is read a few times per step, not hundreds;
# small enough to stay far below the 400 MB the whole tensor would take.
CHUNK_BYTES = 32 * 2**20


@torch.compiler.disable  # a compiled model calls this eagerly: Inductor would materialise the logits again
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Mean cross-entropy of the logits `x @ weight.T` against `targets`, skipping `ignore_index`.

    `x` is (N, C), `weight` (V, C), `targets` (N,): the same value as
    `F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)`.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, chunk_bytes)
    return _blocks(x, weight, targets, ignore_index, chunk_bytes, gradients=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_bytes):
        loss, grad_x, grad_weight = _blocks(x, weight, targets, ignore_index, chunk_bytes, gradients=True)
        ctx.save_for_backward(grad_x, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None


def _blocks(x, weight, targets, ignore_index, chunk_bytes, gradients: bool):
    """The loss and, with `gradients`, its gradients with respect to `x` and `weight`."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    valid = targets != ignore_index
    # Each row's share of the mean; an ignored row gets none and takes a harmless stand-in target.
    share = valid / valid.sum()
    targets = targets.where(valid, 0)
    with torch.autocast(device, enabled=False):
        xc, wc = x.to(dtype), weight.to(dtype)
        n, vocab = x.shape[0], weight.shape[0]
        rows = max(1, min(n, chunk_bytes // (vocab * wc.element_size())))
        logits = torch.empty(rows, vocab, dtype=dtype, device=x.device)
        probs = torch.empty_like(logits)
        minus_one = torch.full((rows,), -1.0, dtype=dtype, device=x.device)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if gradients else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if gradients else None
        for start in range(0, n, rows):
            end = min(start + rows, n)
            block = slice(start, end)
            block_logits, block_probs = logits[: end - start], probs[: end - start]
            torch.mm(xc[block], wc.T, out=block_logits)
            torch.softmax(block_logits, dim=1, out=block_probs)
            at_target = (torch.arange(end - start, device=x.device), targets[block])
            p_target = block_probs[at_target].float()
            row_loss = -p_target.log()
            if not bool(p_target.min() > 0):
                # A probability below float32's range (a loss above ~100 nats): the exact log-sum-exp.
                exact = block_logits.float().logsumexp(dim=1) - block_logits[at_target].float()
                row_loss = torch.where(p_target > 0, row_loss, exact)
            loss += (row_loss * share[block]).sum()
            if not gradients:
                continue
            # d loss / d logits = (softmax - one_hot(target)) * share; the share scales the small
            # factors of each product instead of the block of probabilities.
            block_probs.index_put_(at_target, minus_one[: end - start], accumulate=True)
            row_share = share[block, None]
            grad_x[block] = (block_probs @ wc).to(x.dtype) * row_share
            scaled_x = (x[block] * row_share).to(dtype)
            if dtype == torch.float32:
                grad_weight.addmm_(block_probs.T, scaled_x)
            else:
                grad_weight += block_probs.T @ scaled_x
    if gradients:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_x, grad_weight
