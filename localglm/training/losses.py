"""Cross entropy through the lm_head without the [tokens, vocab] tensors autograd would keep.

Why: in the default model's training step the lm_head and its cross entropy were a third of the time
(8,192-token vocabulary, 4,096 positions, twice: the main model's and the MTP block's). Autograd kept
the logits, cast them to float32, ran log-softmax forward and backward and filled a dense gradient,
each a pass over a [4096, 8192] tensor. Here each chunk of rows computes its logits, the loss and
the gradient (softmax - onehot) / N at once, in the chunk's own cache-sized memory, and the backward
is the two matmuls. The loss is the same float32 log-sum-exp of the same logits (bf16 logits where
the forward computes in bf16, as autocast's lm_head gives them), so it equals F.cross_entropy's.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        n = hidden.shape[0]
        with torch.autocast("cpu", enabled=False):
            x, w = hidden.to(dtype), weight.to(dtype)
            grad_x = torch.empty(hidden.shape, dtype=dtype)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32)
            total = torch.zeros((), dtype=torch.float32)
            for s in range(0, n, CHUNK_ROWS):
                xs, ts = x[s : s + CHUNK_ROWS], targets[s : s + CHUNK_ROWS]
                logits = (xs @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, ts[:, None]).squeeze(1)).sum()
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(ts)), ts] -= 1.0
                grad = grad.div_(n).to(dtype)
                grad_x[s : s + CHUNK_ROWS] = grad @ w
                grad_w += (grad.T @ xs).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_x * grad_out).to(hidden_dtype), (grad_w * grad_out).to(weight_dtype), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of softmax(hidden @ weight.T) against targets: hidden [N, H], weight [V, H], targets [N].
    Computes in autocast's dtype when autocast is on (as an nn.Linear there would), else in float32."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype)
