"""The last stage's loss: norm, lm_head and cross-entropy on the loss tokens only, a chunk at a time.

Computed the plain way (`lm_head(norm(h)).float()` then `F.cross_entropy` with an ignore index),
the head runs on every position of a micro-batch, prompt and padding included, and autograd keeps
the fp32 log-probabilities of every position, [tokens, vocab], until the backward. With a
Llama-3 vocabulary (128k) that is 0.5 MB a token, and the peak of one forward + backward is about
2.5 times what is kept (`benchmarks/head_loss.py`: 1,275 MiB for 1024 tokens at hidden 1024).

Here only the positions whose next label counts (`LossTokens`, found on the host from the labels,
so no device sync) go through the norm and the lm_head, and `LinearCrossEntropy` runs the head a
chunk of tokens at a time. The loss is the last node of the graph and its weights (1 / the loss
tokens of each job's step) are known in the forward, so the forward computes the input gradient
of each chunk right away, `(softmax - onehot) * weight @ W`, and keeps only that [tokens, hidden]
gradient for the backward: no logits are kept and none are computed twice. The gradient equals the
plain way's: the same operations in the same dtypes (the lm_head GEMM in the model dtype, softmax
and cross-entropy in fp32, the logits' gradient cast back to the model dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mlora_pp.data import IGNORE_INDEX
from mlora_pp.lora import host_to_device

CHUNK_LOGIT_BYTES = 256 * 2**20
"""Bytes of fp32 logits one chunk computes at once: the softmax and its gradient are computed in
place, so that (and, in bf16, the half-size logits before their cast) is the head's transient peak."""


@dataclass(frozen=True)
class LossTokens:
    """Where a micro-batch's loss is: the positions whose next label counts, and what each predicts.

    Position t of row r predicts ``labels[r, t + 1]`` (the Hugging Face convention), so it is
    ``r * L + t`` in the flattened [rows * L] hidden states. Parts (one job's rows each) are
    contiguous row ranges, so each part's loss tokens are a contiguous run of the selection.
    """

    positions: torch.Tensor
    """int64 [n]: flat index into the micro-batch's [rows * L] positions."""
    targets: torch.Tensor
    """int64 [n]: the token each position must predict."""
    weights: torch.Tensor
    """fp32 [n]: each token's weight in the loss that is backpropagated (its part's weight)."""
    part_of: torch.Tensor
    """int64 [n]: the index of each token's part."""
    counts: tuple[int, ...]
    """Loss tokens of each part, in order."""

    @staticmethod
    def find(labels: torch.Tensor, parts: Sequence[tuple[int, int]], weights: Sequence[float],
             device: torch.device | str = "cpu") -> "LossTokens":
        """From host labels [rows, L] (`IGNORE_INDEX` where no loss), each part's row range
        [start, end) and its weight; the result's tensors are moved to `device`."""
        if labels.device.type != "cpu":
            raise ValueError("LossTokens.find reads the labels on the host; pass them before moving them")
        rows, length = labels.shape
        nxt = labels[:, 1:]
        rr, tt = (nxt != IGNORE_INDEX).nonzero(as_tuple=True)
        per_row = torch.bincount(rr, minlength=rows).tolist()
        counts = tuple(sum(per_row[start:end]) for start, end in parts)
        part_index = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(counts, dtype=torch.long))
        token_weights = torch.tensor(list(weights), dtype=torch.float32)[part_index]
        moved = (rr * length + tt, nxt[rr, tt], token_weights, part_index)
        positions, targets, token_weights, part_index = (host_to_device(t, device) for t in moved)
        return LossTokens(positions, targets, token_weights, part_index, counts)


def chunk_tokens(vocab: int, budget: int = CHUNK_LOGIT_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most `budget` bytes (at least 1)."""
    return max(1, budget // (4 * vocab))


class LinearCrossEntropy(torch.autograd.Function):
    """(sum_t weights[t] * CE_t, CE [n]) of logits = hidden @ weight^T against targets, a chunk of
    tokens at a time; weight is frozen. The input gradient is computed in the forward (see the
    module docstring) when `need_grad`; CE [n] is not differentiable."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                chunk: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = (hidden[start:end] @ weight.t()).float()  # as lm_head(...).float()
            target = targets[start:end].unsqueeze(1)
            target_logit = logits.gather(1, target)
            top = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(top).exp_()  # in place: one chunk of logits is all that is ever alive
            sum_exp = exp.sum(dim=1, keepdim=True)
            losses[start:end] = (sum_exp.log() + top - target_logit).squeeze(1)  # log-sum-exp - logit
            if grad is not None:
                probs = exp.div_(sum_exp)  # softmax
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                probs.mul_(weights[start:end].unsqueeze(1))
                torch.matmul(probs.to(hidden.dtype), weight, out=grad[start:end])
            del logits, exp
        ctx.mark_non_differentiable(losses)
        if grad is not None:
            ctx.save_for_backward(grad)
        return (losses * weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_losses: torch.Tensor | None):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                         chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`LinearCrossEntropy` on [n, d] hidden states; `chunk` defaults to `chunk_tokens(vocab)`."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy: the lm_head weight is frozen; training it is not supported")
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return LinearCrossEntropy.apply(hidden, weight, targets, weights, chunk or chunk_tokens(weight.shape[0]),
                                    need_grad)


def head_loss(hidden: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor,
              where: LossTokens, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The last stage's loss from its hidden states before the final norm [rows, L, d]: (the weighted
    sum of the loss tokens' cross-entropy, to backpropagate; each part's summed cross-entropy
    [parts], not differentiable). The norm (row-wise) and the lm_head `weight` see the loss tokens only."""
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where.positions)
    total, losses = linear_cross_entropy(norm(selected), weight, where.targets, where.weights, chunk)
    sums = torch.zeros(len(where.counts), dtype=losses.dtype, device=losses.device)
    return total, sums.index_add_(0, where.part_of, losses)
