"""Cross-entropy through the output head without materialising the logits.

    nll_sum = linear_cross_entropy(hidden, head_weight, labels)   # labels already shifted

For each chunk of tokens: logits = h W^T (compute dtype), then in fp32 the
log-sum-exp, the summed NLL of the labelled tokens and, while the chunk is at
hand, the gradient with respect to h: (softmax - onehot) W. Forward returns the
summed NLL and keeps only that gradient (tokens x hidden, the size of one
activation), so the (tokens x vocabulary) logits and their fp32 copies never
exist in full: at b4 x s4096 with a 32k vocabulary that is about 5 GiB less
peak memory. The head is frozen in QLoRA, so no gradient for W is formed.
`linear_cross_entropy_reference` is the plain-PyTorch version of the same sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_BYTES = 128 * 2**20  # fp32 logits of one chunk: 1,024 tokens of a 32k vocabulary


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Token t predicts t+1: labels moved left by one, the last position ignored."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE)


def linear_cross_entropy_reference(hidden, weight, labels):
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def chunk_rows(vocab: int) -> int:
    return max(128, CHUNK_BYTES // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        h2 = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(h2) if hidden.requires_grad else None
        w = weight.to(h2.dtype)
        for start in range(0, h2.shape[0], chunk):
            h, t = h2[start : start + chunk], y[start : start + chunk]
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = t != IGNORE
            safe = t.clamp(min=0)
            target = logits.gather(1, safe[:, None]).squeeze(1)
            total += ((lse - target) * valid).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs.scatter_add_(1, safe[:, None], -valid[:, None].to(probs.dtype))
                probs.mul_(valid[:, None])
                grad[start : start + chunk] = probs.to(h.dtype) @ w
            del logits
        ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype)).view(ctx.shape), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Summed NLL over labelled tokens (labels == -100 are ignored); weight must be frozen."""
    if weight.requires_grad:
        return linear_cross_entropy_reference(hidden, weight, labels)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk or chunk_rows(weight.shape[0]))
