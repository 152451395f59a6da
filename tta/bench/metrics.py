"""Metrics: pure functions, plus small meters that accumulate them over a stream of batches.

Classification: top-1 accuracy / error, expected calibration error, mean corruption error (mCE, normalised by
AlexNet's errors when they are given). Segmentation: mean IoU and pixel accuracy from one confusion matrix
(tta.segmentation_metrics, below the harness, so the zoo scores its segmenter with the same functions).
Depth: AbsRel, RMSE and delta < 1.25 pooled over valid pixels, and SSIM averaged over images.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..segmentation_metrics import adjusted_rand_index, confusion_matrix, foreground_ari, mean_iou, pixel_accuracy

# AlexNet's top-1 error per corruption, averaged over severities 1-5 (Hendrycks & Dietterich 2019,
# github.com/hendrycks/robustness); mCE divides a model's summed errors by AlexNet's.
ALEXNET_ERRORS: Dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
MCE_BASELINES = {"alexnet": ALEXNET_ERRORS}


# ---- classification ----------------------------------------------------------------------------------------
def top1_accuracy(pred: Sequence[int], target: Sequence[int]) -> float:
    """Fraction of predictions equal to the target (labels < 0 mean unlabelled and are left out)."""
    pred, target = np.asarray(pred), np.asarray(target)
    mask = target >= 0
    if not mask.any():
        raise ValueError("no labelled examples: accuracy needs targets >= 0")
    return float((pred[mask] == target[mask]).mean())


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over equal-width confidence bins of |accuracy - mean confidence| x bin share.
    Bins are (lo, hi], with the first bin closed at 0."""
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        raise ValueError("ECE of an empty set")
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs(corr[inside].mean() - conf[inside].mean())
    return float(ece)


def mean_corruption_error(errors: Mapping[Tuple[str, int], float],
                          baseline: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """mCE from top-1 errors keyed by (corruption, severity).

    Without a baseline, CE_c is the mean error over the severities evaluated and mCE the mean over corruptions
    (unnormalised). With a baseline (AlexNet's mean error per corruption over severities 1-5), CE_c =
    sum_s E_{s,c} / sum_s E^AlexNet_{s,c}; that ratio needs all five severities, so a corruption evaluated at
    fewer severities is an error rather than a silently wrong number. Returns {"mCE": ..., "CE/<corruption>": ...}."""
    by_corruption: Dict[str, Dict[int, float]] = {}
    for (corruption, severity), err in errors.items():
        by_corruption.setdefault(corruption, {})[int(severity)] = float(err)
    if not by_corruption:
        raise ValueError("mCE needs at least one (corruption, severity) error")
    out: Dict[str, float] = {}
    for corruption, sev in sorted(by_corruption.items()):
        mean_err = sum(sev.values()) / len(sev)
        if baseline is None:
            out[f"CE/{corruption}"] = mean_err
            continue
        if corruption not in baseline:
            raise ValueError(f"no baseline error for corruption {corruption!r}; baselines exist for "
                             f"{', '.join(sorted(baseline))}. Drop the baseline for an unnormalised mCE")
        if sorted(sev) != [1, 2, 3, 4, 5]:
            raise ValueError(f"the normalised CE of {corruption!r} needs severities 1-5, got {sorted(sev)}; "
                             "evaluate all five or use the unnormalised mCE (no baseline)")
        out[f"CE/{corruption}"] = mean_err / baseline[corruption]
    out["mCE"] = sum(out.values()) / len(out)
    return out


# ---- depth -------------------------------------------------------------------------------------------------
def valid_depth(target: torch.Tensor) -> torch.Tensor:
    """Pixels with a measurement: depth sensors write 0 (or NaN) where they have none."""
    return torch.isfinite(target) & (target > 0)


def depth_errors(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """AbsRel, RMSE and delta < 1.25 pooled over the valid pixels of all images (as DenseDepth and most
    monocular-depth code compute them)."""
    sums = depth_sums(pred, target)
    return depth_from_sums(sums)


def depth_sums(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    mask = valid_depth(target)
    p = pred[mask].double().clamp_min(1e-6)  # a non-positive prediction would make the ratio meaningless
    t = target[mask].double()
    ratio = torch.maximum(p / t, t / p)
    return {"pixels": float(mask.sum()), "abs_rel": float(((p - t).abs() / t).sum()),
            "sq_err": float(((p - t) ** 2).sum()), "delta1": float((ratio < 1.25).sum())}


def depth_from_sums(sums: Mapping[str, float]) -> Dict[str, float]:
    n = sums["pixels"]
    if n == 0:
        raise ValueError("no valid depth pixels (all targets are 0 or NaN)")
    return {"abs_rel": sums["abs_rel"] / n, "rmse": math.sqrt(sums["sq_err"] / n), "delta1": sums["delta1"] / n}


def _gaussian_window(sigma: float = 1.5, radius: int = 5, dtype=torch.float64) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) of two (H, W) maps: an 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, averaged over the window positions that lie wholly inside the image."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"ssim expects two (H, W) maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    w = _gaussian_window(sigma)
    if min(a.shape) < w.shape[-1]:
        raise ValueError(f"ssim needs maps of at least {w.shape[-1]}x{w.shape[-1]} pixels, got {tuple(a.shape)}")
    x, y = a.double()[None, None], b.double()[None, None]
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    var_x = F.conv2d(x * x, w) - mu_x ** 2
    var_y = F.conv2d(y * y, w) - mu_y ** 2
    cov = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def depth_ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """SSIM of one (H, W) depth prediction against its target. Pixels without a measurement are set to 0 in
    both maps, and the data range is the target's valid range, so the score depends on the target only."""
    mask = valid_depth(target)
    if not mask.any():
        raise ValueError("no valid depth pixels")
    t = torch.where(mask, target, torch.zeros_like(target))
    p = torch.where(mask, pred, torch.zeros_like(pred))
    return ssim(p, t, data_range=float(t[mask].max()) or 1.0)


# ---- meters: accumulate over a stream ----------------------------------------------------------------------
class Meter:
    """What every meter shares: a count `n`, per-image records, and its state as JSON to merge shards of a stream.

    Per-image records are kept beside a meter's totals: each image's index in its domain ("id") and its score, so
    two methods run on the same images can be paired image by image (tta.bench.stats).

    `state()` is what a meter has accumulated and what it was built with, as plain JSON values; `Meter.merge`
    builds one meter from the states of meters that each saw part of a stream (tta.bench.distributed's shards):
    per-example lists are concatenated in the order given, counts, sums and matrices added, so the metrics come out
    exactly as if one meter had seen every batch.
    """
    task = ""
    primary = ""

    def _start_records(self, *fields: str) -> None:
        self.records: Dict[str, list] = {"id": [], **{f: [] for f in fields}}
        self.records_complete = True  # False once a batch came without ids: no pairing for this row

    def _record(self, ids: Optional[torch.Tensor], **values: list) -> None:
        if ids is None:
            self.records_complete = False
            return
        self.records["id"] += [int(i) for i in ids]
        for name, vals in values.items():
            self.records[name] += vals

    def per_image(self) -> Optional[Dict[str, list]]:
        return self.records if self.records_complete and self.records["id"] else None

    # ---- state and merge ----
    def config(self) -> Dict[str, Any]:
        """The constructor's arguments, as JSON values."""
        return {}

    def totals(self) -> Dict[str, Any]:
        """What the meter has accumulated besides `n` and the records, as JSON values."""
        raise NotImplementedError

    def add_totals(self, totals: Mapping[str, Any]) -> None:
        """Add another meter's `totals()` to this one's (lists are appended after this meter's own)."""
        raise NotImplementedError

    def state(self) -> Dict[str, Any]:
        return {"task": self.task, "config": self.config(), "n": self.n, "records": self.records,
                "records_complete": self.records_complete, "totals": self.totals()}

    @classmethod
    def merge(cls, states: Sequence[Mapping[str, Any]]) -> "Meter":
        """One meter from the `state()`s of meters of this class built alike, each having seen part of a stream."""
        if not states:
            raise ValueError("merging meters needs at least one state")
        for s in states:
            if s["task"] != cls.task or s["config"] != states[0]["config"]:
                raise ValueError(f"cannot merge meter states of different tasks or settings into one "
                                 f"{cls.__name__}: {[(t['task'], t['config']) for t in states]}")
        meter = cls(**states[0]["config"])
        for s in states:
            meter.n += s["n"]
            for name, values in s["records"].items():
                meter.records[name] += values
            meter.records_complete = meter.records_complete and s["records_complete"]
            meter.add_totals(s["totals"])
        return meter


class ClassificationMeter(Meter):
    """Top-1 accuracy and ECE; `class_subset` restricts the prediction to those output indices (ImageNet-A/R)."""
    task, primary = "classification", "accuracy"

    def __init__(self, class_subset: Optional[Sequence[int]] = None, n_bins: int = 15, record_steps: bool = False):
        """`record_steps`: each update also takes the model's outputs before every adaptation step and after the
        last (Adapter.outputs_by_step), and the per-image records keep each image's prediction and correctness
        after 0, 1, ..., N steps (step_pred, step_correct)."""
        self.subset = torch.as_tensor(list(class_subset)) if class_subset is not None else None
        self.n_bins = n_bins
        self.record_steps = record_steps
        self.confidence: List[float] = []
        self.correct: List[bool] = []
        self.n = 0
        self._start_records("pred", "correct", *(("step_pred", "step_correct") if record_steps else ()))

    def _predict(self, outputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Confidence and predicted class of (B, K) logits (within class_subset, if any)."""
        if outputs.dim() != 2:
            raise ValueError(f"classification benchmarks need (B, K) logits, got shape {tuple(outputs.shape)}")
        logits = outputs.detach().float().cpu()
        if self.subset is not None:
            logits = logits[:, self.subset]
        conf, pred = logits.softmax(1).max(1)
        return conf, self.subset[pred] if self.subset is not None else pred

    def update(self, outputs: torch.Tensor, target: torch.Tensor, ids: Optional[torch.Tensor] = None,
               steps: Optional[Sequence[torch.Tensor]] = None) -> None:
        conf, pred = self._predict(outputs)
        target = target.cpu()
        self.n += len(target)
        mask = target >= 0
        self.confidence += conf[mask].tolist()
        correct = (pred[mask] == target[mask]).tolist()
        self.correct += correct
        by_step = {}
        if self.record_steps:
            if not steps:
                raise ValueError("this meter records every step's prediction, but the adapter reported no step "
                                 "outputs for this batch (Adapter.outputs_by_step)")
            preds = torch.stack([self._predict(o)[1] for o in steps], 1)[mask]  # (labelled images, steps + 1)
            by_step = {"step_pred": preds.tolist(),
                       "step_correct": (preds == target[mask, None]).int().tolist()}
        self._record(None if ids is None else ids.cpu()[mask], pred=pred[mask].tolist(),
                     correct=[int(c) for c in correct], **by_step)

    def running(self) -> Optional[float]:
        return sum(self.correct) / len(self.correct) if self.correct else None

    def config(self) -> Dict[str, Any]:
        return {"class_subset": None if self.subset is None else self.subset.tolist(), "n_bins": self.n_bins,
                "record_steps": self.record_steps}

    def totals(self) -> Dict[str, Any]:
        return {"confidence": self.confidence, "correct": self.correct}

    def add_totals(self, totals: Mapping[str, Any]) -> None:
        self.confidence += totals["confidence"]
        self.correct += totals["correct"]

    def compute(self) -> Dict[str, Optional[float]]:
        if not self.correct:
            return {"accuracy": None, "error": None, "ece": None, "n_labelled": 0}
        acc = sum(self.correct) / len(self.correct)
        return {"accuracy": acc, "error": 1 - acc,
                "ece": expected_calibration_error(self.confidence, self.correct, self.n_bins),
                "n_labelled": len(self.correct)}


class SegmentationMeter(Meter):
    """mIoU and pixel accuracy; logits are resized (bilinear) to the target's size before the argmax. The
    per-image records hold each image's own mIoU (over the classes in that image or its prediction)."""
    task, primary = "segmentation", "miou"

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.n = 0
        self._start_records("miou")

    def update(self, outputs: torch.Tensor, target: torch.Tensor, ids: Optional[torch.Tensor] = None) -> None:
        if outputs.dim() != 4 or outputs.shape[1] != self.num_classes:
            raise ValueError(f"segmentation needs (B, {self.num_classes}, H, W) logits, got {tuple(outputs.shape)}")
        if outputs.shape[-2:] != target.shape[-2:]:
            outputs = F.interpolate(outputs.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        pred, target = outputs.argmax(1).cpu(), target.cpu()
        per_image = [confusion_matrix(p, t, self.num_classes, self.ignore_index) for p, t in zip(pred, target)]
        self.conf += sum(per_image[1:], per_image[0].clone())
        self.n += len(target)
        self._record(ids, miou=[mean_iou(c) if c.sum() else float("nan") for c in per_image])

    def running(self) -> Optional[float]:
        return pixel_accuracy(self.conf) if self.conf.sum() else None

    def config(self) -> Dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index}

    def totals(self) -> Dict[str, Any]:
        return {"conf": self.conf.tolist()}

    def add_totals(self, totals: Mapping[str, Any]) -> None:
        self.conf += torch.tensor(totals["conf"], dtype=torch.int64)

    def compute(self) -> Dict[str, Optional[float]]:
        if not self.conf.sum():
            return {"miou": None, "pixel_accuracy": None}
        return {"miou": mean_iou(self.conf), "pixel_accuracy": pixel_accuracy(self.conf)}


class DepthMeter(Meter):
    """AbsRel, RMSE, delta1 (pooled over pixels) and SSIM (mean over images); predictions are resized to the
    target's size. The per-image records hold each image's own delta1."""
    task, primary = "depth", "delta1"

    def __init__(self):
        self.sums = {"pixels": 0.0, "abs_rel": 0.0, "sq_err": 0.0, "delta1": 0.0}
        self.ssims: List[float] = []
        self.n = 0
        self._start_records("delta1")

    def update(self, outputs: torch.Tensor, target: torch.Tensor, ids: Optional[torch.Tensor] = None) -> None:
        if outputs.dim() != 4 or outputs.shape[1] != 1:
            raise ValueError(f"depth benchmarks need (B, 1, H, W) predictions, got {tuple(outputs.shape)}")
        target = target.cpu().float()
        target = target[:, None] if target.dim() == 3 else target
        pred = outputs.detach().float().cpu()
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
        for key, value in depth_sums(pred, target).items():
            self.sums[key] += value
        delta1 = []
        for p, t in zip(pred, target):
            sums = depth_sums(p, t)
            delta1.append(sums["delta1"] / sums["pixels"] if sums["pixels"] else float("nan"))
        self._record(ids, delta1=delta1)
        for p, t in zip(pred[:, 0], target[:, 0]):
            if valid_depth(t).any():
                self.ssims.append(depth_ssim(p, t))
        self.n += len(target)

    def running(self) -> Optional[float]:
        return self.sums["delta1"] / self.sums["pixels"] if self.sums["pixels"] else None

    def totals(self) -> Dict[str, Any]:
        return {"sums": self.sums, "ssims": self.ssims}

    def add_totals(self, totals: Mapping[str, Any]) -> None:
        for key, value in totals["sums"].items():
            self.sums[key] += value
        self.ssims += totals["ssims"]

    def compute(self) -> Dict[str, Optional[float]]:
        if not self.sums["pixels"]:
            return {"abs_rel": None, "rmse": None, "delta1": None, "ssim": None}
        out = depth_from_sums(self.sums)
        out["ssim"] = sum(self.ssims) / len(self.ssims)
        return out


class ObjectDiscoveryMeter(Meter):
    """ARI and FG-ARI (mean over images) of slot masks (B, S, H, W) against integer label maps (B, H, W), for
    slot models (task "object_discovery"): slot k has no fixed class, so only the partition is compared."""
    task, primary = "object_discovery", "fg_ari"

    def __init__(self):
        self.ari: List[float] = []
        self.fg_ari: List[float] = []
        self.n = 0
        self._start_records("fg_ari", "ari")

    def update(self, outputs: torch.Tensor, target: torch.Tensor, ids: Optional[torch.Tensor] = None) -> None:
        if outputs.dim() != 4:
            raise ValueError(f"object discovery needs (B, S, H, W) slot masks, got {tuple(outputs.shape)}")
        if outputs.shape[-2:] != target.shape[-2:]:
            outputs = F.interpolate(outputs.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        pred, target = outputs.argmax(1).cpu(), target.cpu().long()
        ari, fg_ari = adjusted_rand_index(target, pred).tolist(), foreground_ari(target, pred).tolist()
        self.ari += ari
        self.fg_ari += fg_ari
        self.n += len(target)
        self._record(ids, fg_ari=fg_ari, ari=ari)

    def running(self) -> Optional[float]:
        return sum(self.fg_ari) / len(self.fg_ari) if self.fg_ari else None

    def totals(self) -> Dict[str, Any]:
        return {"ari": self.ari, "fg_ari": self.fg_ari}

    def add_totals(self, totals: Mapping[str, Any]) -> None:
        self.ari += totals["ari"]
        self.fg_ari += totals["fg_ari"]

    def compute(self) -> Dict[str, Optional[float]]:
        if not self.ari:
            return {"fg_ari": None, "ari": None}
        return {"fg_ari": sum(self.fg_ari) / len(self.fg_ari), "ari": sum(self.ari) / len(self.ari)}


# Which metrics a report shows per task, and whether larger is better (for "change against source").
TASK_METRICS: Dict[str, List[Tuple[str, bool]]] = {
    "classification": [("accuracy", True), ("ece", False)],
    "segmentation": [("miou", True), ("pixel_accuracy", True)],
    "depth": [("abs_rel", False), ("rmse", False), ("delta1", True), ("ssim", True)],
    "object_discovery": [("fg_ari", True), ("ari", True)],
}


METERS: Dict[str, type] = {m.task: m for m in (ClassificationMeter, SegmentationMeter, DepthMeter,
                                                ObjectDiscoveryMeter)}


def merge_meters(states: Sequence[Mapping[str, Any]]) -> Meter:
    """One meter from the `state()`s of meters that each saw part of one stream (see Meter)."""
    tasks = {s["task"] for s in states}
    if len(tasks) != 1:
        raise ValueError(f"parts of one stream were scored by different meters: {sorted(tasks)}")
    return METERS[tasks.pop()].merge(states)


def make_meter(task: str, num_classes: Optional[int] = None, class_subset: Optional[Iterable[int]] = None,
               record_steps: bool = False):
    if record_steps and task != "classification":
        raise ValueError(f"record_steps records each step's class prediction: classification only, not {task}")
    if task == "classification":
        return ClassificationMeter(list(class_subset) if class_subset is not None else None,
                                   record_steps=record_steps)
    if task == "segmentation":
        if not num_classes:
            raise ValueError("segmentation metrics need the number of classes (the model's class_names)")
        return SegmentationMeter(num_classes)
    if task == "depth":
        return DepthMeter()
    if task == "object_discovery":
        return ObjectDiscoveryMeter()
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_METRICS)}")
