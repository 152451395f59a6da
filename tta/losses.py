"""Shared loss functions. Class dimension is 1, so they work for (B, K) and dense (B, K, H, W) outputs alike."""
from __future__ import annotations

import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over dim 1; shape (B,) or (B, H, W)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def per_sample(values: torch.Tensor) -> torch.Tensor:
    """Average any per-pixel values down to one value per sample: (B, ...) -> (B,)."""
    return values.reshape(values.shape[0], -1).mean(1)


def cross_entropy_soft(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """-sum softmax(target) * log_softmax(logits) over dim 1 (CoTTA's teacher-student loss)."""
    return -(target_logits.softmax(1) * logits.log_softmax(1)).sum(1)


def symmetric_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """The mean of the cross-entropies both ways between softmax(logits) and softmax(target_logits) (CoTTA's ImageNet
    teacher-student loss); target_logits should come detached, so that only `logits` learns."""
    return 0.5 * cross_entropy_soft(logits, target_logits) + 0.5 * cross_entropy_soft(target_logits, logits)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the average prediction over the batch (MEMO): the batch holds augmentations of one input."""
    log_probs = logits.log_softmax(1)
    avg_log_probs = torch.logsumexp(log_probs, dim=0) - torch.log(torch.tensor(float(logits.shape[0])))
    avg_log_probs = avg_log_probs.clamp(min=torch.finfo(avg_log_probs.dtype).min)
    return -(avg_log_probs.exp() * avg_log_probs).sum(0).mean()


def require_class_scores(outputs: torch.Tensor, method: str) -> None:
    """Entropy-based methods need class scores in dim 1; a single output channel means regression."""
    if outputs.dim() < 2 or outputs.shape[1] < 2:
        raise ValueError(
            f"{method} minimises prediction entropy and needs class scores of shape (B, K, ...) with K >= 2; "
            f"got outputs of shape {tuple(outputs.shape)}. For regression models use it3, slow_inference or "
            "diffusion_tta instead.")
