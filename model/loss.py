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
# small enough to stay far below the 400 MB the whole tensor would take, and below glibc's 32 MiB
# ceiling for serving an allocation from its heap rather than a fresh mapping: a mapped block is
# faulted in afresh every step (12,500 page faults and 5-10% of the loss's time at 32 MiB, none at 24).
CHUNK_BYTES = 24 * 2**20


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
    share = (valid / valid.sum())[:, None]
    targets = targets.where(valid, 0)
    n, vocab = x.shape[0], weight.shape[0]
    with torch.autocast(device, enabled=False):
        xc, wc = x.to(dtype), weight.to(dtype)
        rows = max(1, min(n, chunk_bytes // (vocab * wc.element_size())))
        # Few, large operations per block: on a CPU each one is a parallel region whose threads meet.
        logits = torch.empty(rows, vocab, dtype=dtype, device=x.device)
        probs = torch.empty_like(logits)
        p_target = torch.empty(n, dtype=dtype, device=x.device)
        minus_one = torch.full((rows,), -1.0, dtype=dtype, device=x.device)
        if gradients:
            # d loss / d logits = (softmax - one_hot(target)) * share: the share scales the small
            # factors of the two products, not the block of probabilities.
            scaled_x = (x * share).to(dtype)
            grad_x = torch.empty(n, x.shape[1], dtype=dtype, device=x.device)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        for start in range(0, n, rows):
            block = slice(start, min(start + rows, n))
            block_logits, block_probs = logits[: block.stop - start], probs[: block.stop - start]
            torch.mm(xc[block], wc.T, out=block_logits)
            torch.softmax(block_logits, dim=1, out=block_probs)
            at_target = (torch.arange(block.stop - start, device=x.device), targets[block])
            p_target[block] = block_probs[at_target]
            if not gradients:
                continue
            block_probs.index_put_(at_target, minus_one[: block.stop - start], accumulate=True)
            torch.mm(block_probs, wc, out=grad_x[block])
            if dtype == torch.float32:
                grad_weight.addmm_(block_probs.T, scaled_x[block])
            else:
                grad_weight += block_probs.T @ scaled_x[block]
        row_loss = -p_target.float().log()
        underflow = p_target == 0
        if underflow.any():
            # A probability below the dtype's range (a loss above ~100 nats): the exact log-sum-exp.
            rows_under = underflow.nonzero()[:, 0]
            logits_under = (xc[rows_under] @ wc.T).float()
            row_loss[rows_under] = logits_under.logsumexp(dim=1) - logits_under.gather(1, targets[rows_under, None])[:, 0]
        loss = (row_loss[:, None] * share).sum()
    if not gradients:
        return loss, None, None
    return loss, (grad_x * share).to(x.dtype), grad_weight.to(weight.dtype)
