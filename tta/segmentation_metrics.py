"""Segmentation metrics: mean IoU and pixel accuracy from a confusion matrix, and for object discovery the
adjusted Rand index (ARI) and foreground ARI (FG-ARI). Pure functions of tensors, below both the benchmark harness
(whose meters accumulate them over a stream) and the zoo (which scores its segmenter with them).

mIoU and pixel accuracy compare labels class by class. The adjusted Rand index (Hubert & Arabie, 1985) compares
two labelings of the same pixels up to a permutation of the label ids, which is what slot models need: slot k has
no fixed meaning. FG-ARI (used by MONet, IODINE, Slot Attention and Slot-TTA) scores only the pixels that belong to
an object in the ground truth, so a model is not rewarded for merely finding the background.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts, rows = target class, columns = predicted class; `ignore_index` pixels are left out."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(conf: Union[torch.Tensor, np.ndarray]) -> float:
    """Mean over classes that occur (in target or prediction) of intersection / union."""
    conf = np.asarray(conf, dtype=np.float64)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    if not present.any():
        raise ValueError("mIoU of an empty confusion matrix")
    return float((inter[present] / union[present]).mean())


def pixel_accuracy(conf: Union[torch.Tensor, np.ndarray]) -> float:
    """Fraction of the counted pixels whose predicted class is their target class."""
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    if total == 0:
        raise ValueError("pixel accuracy of an empty confusion matrix")
    return float(np.trace(conf) / total)


def _comb2(n: torch.Tensor) -> torch.Tensor:
    return n * (n - 1) / 2


def _ari_one(true: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    n = true.numel()
    if n <= 1:
        return torch.tensor(1.0, dtype=torch.float64)
    _, t = torch.unique(true, return_inverse=True)
    _, p = torch.unique(pred, return_inverse=True)
    n_t, n_p = int(t.max()) + 1, int(p.max()) + 1
    contingency = torch.bincount(t * n_p + p, minlength=n_t * n_p).reshape(n_t, n_p).double()
    sum_cells = _comb2(contingency).sum()
    sum_rows = _comb2(contingency.sum(1)).sum()
    sum_cols = _comb2(contingency.sum(0)).sum()
    expected = sum_rows * sum_cols / _comb2(torch.tensor(float(n), dtype=torch.float64))
    maximum = (sum_rows + sum_cols) / 2
    if maximum == expected:
        # Both labelings put every pixel in one cluster, or each pixel in its own: they agree perfectly
        # (scikit-learn's convention; the formula is 0/0 there).
        return torch.tensor(1.0, dtype=torch.float64)
    return (sum_cells - expected) / (maximum - expected)


def adjusted_rand_index(true_labels: torch.Tensor, pred_labels: torch.Tensor,
                        ignore: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ARI per example between integer labelings of shape (B, ...) (e.g. (B, H, W)); returns float64 (B,).

    `ignore` (bool, same shape) drops pixels from the comparison; an example with fewer than two pixels left
    scores 1. Equal to sklearn.metrics.adjusted_rand_score on each flattened example.
    """
    if true_labels.shape != pred_labels.shape:
        raise ValueError(f"label maps must have the same shape, got {tuple(true_labels.shape)} and "
                         f"{tuple(pred_labels.shape)}; turn soft masks (B, K, H, W) into labels with .argmax(1)")
    if true_labels.is_floating_point() or pred_labels.is_floating_point():
        raise TypeError("ARI compares integer label maps; use .argmax(1) on masks or .long() on label images")
    true_flat = true_labels.reshape(true_labels.shape[0], -1)
    pred_flat = pred_labels.reshape(pred_labels.shape[0], -1)
    keep = None if ignore is None else ~ignore.reshape(true_flat.shape).bool()
    scores = []
    for i in range(true_flat.shape[0]):
        t, p = true_flat[i], pred_flat[i]
        if keep is not None:
            t, p = t[keep[i]], p[keep[i]]
        scores.append(_ari_one(t.cpu(), p.cpu()))
    return torch.stack(scores)


def foreground_ari(true_labels: torch.Tensor, pred_labels: torch.Tensor, background: int = 0) -> torch.Tensor:
    """FG-ARI per example: ARI over the pixels whose ground-truth label is not `background`."""
    return adjusted_rand_index(true_labels, pred_labels, ignore=true_labels == background)
