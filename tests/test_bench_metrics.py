"""Metrics against reference computations (scikit-learn, scikit-image, hand-written loops)."""
import math

import numpy as np
import pytest
import torch

from tta.bench.metrics import (ALEXNET_ERRORS, ClassificationMeter, DepthMeter, SegmentationMeter, confusion_matrix,
                               depth_errors, expected_calibration_error, mean_corruption_error, mean_iou,
                               pixel_accuracy, ssim, top1_accuracy)


def test_accuracy_ignores_unlabelled():
    assert top1_accuracy([1, 2, 3, 4], [1, 0, 3, -1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        top1_accuracy([1], [-1])


def _ece_reference(conf, correct, n_bins):
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [(c, k) for c, k in zip(conf, correct) if (lo < c <= hi) or (lo == 0 and c == 0)]
        if inside:
            acc = sum(k for _, k in inside) / len(inside)
            avg = sum(c for c, _ in inside) / len(inside)
            total += len(inside) / len(conf) * abs(acc - avg)
    return total


def test_ece_matches_reference_loop():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.05, 1.0, 500)
    correct = rng.uniform(size=500) < conf ** 2
    assert expected_calibration_error(conf, correct, 15) == pytest.approx(_ece_reference(conf, correct, 15))
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0


def test_classification_meter_with_class_subset():
    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0], [3.0, 0.0, 2.0, 9.0]])
    meter = ClassificationMeter(class_subset=[0, 1, 2])  # output 3 is outside the set: never predicted
    meter.update(logits, torch.tensor([1, 0]))
    out = meter.compute()
    assert out["accuracy"] == 1.0 and out["n_labelled"] == 2
    plain = ClassificationMeter()
    plain.update(logits, torch.tensor([1, 0]))
    assert plain.compute()["accuracy"] == 0.0


def test_mce_unnormalised_and_alexnet():
    errors = {("fog", s): 0.1 * s for s in range(1, 6)}
    errors.update({("snow", s): 0.5 for s in range(1, 6)})
    un = mean_corruption_error(errors)
    assert un["CE/fog"] == pytest.approx(0.3) and un["mCE"] == pytest.approx(0.4)
    norm = mean_corruption_error(errors, ALEXNET_ERRORS)
    ref = (1.5 / (5 * ALEXNET_ERRORS["fog"]) + 2.5 / (5 * ALEXNET_ERRORS["snow"])) / 2
    assert norm["mCE"] == pytest.approx(ref)
    with pytest.raises(ValueError, match="severities 1-5"):
        mean_corruption_error({("fog", 5): 0.5}, ALEXNET_ERRORS)
    with pytest.raises(ValueError, match="no baseline"):
        mean_corruption_error({("saturate", s): 0.5 for s in range(1, 6)}, ALEXNET_ERRORS)


def test_segmentation_matches_sklearn():
    from sklearn.metrics import confusion_matrix as sk_confusion, jaccard_score
    rng = np.random.default_rng(1)
    target = rng.integers(0, 5, (2, 12, 12))
    target[0, :3] = 255
    pred = np.where(rng.uniform(size=target.shape) < 0.6, target, rng.integers(0, 5, target.shape)) % 5
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5)
    keep = target != 255
    ref = sk_confusion(target[keep], pred[keep], labels=range(5))
    assert np.array_equal(conf.numpy(), ref)
    assert mean_iou(conf) == pytest.approx(jaccard_score(target[keep], pred[keep], average="macro"))
    assert pixel_accuracy(conf) == pytest.approx((pred[keep] == target[keep]).mean())
    meter = SegmentationMeter(5)
    logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 5).permute(0, 3, 1, 2).float()
    meter.update(logits, torch.from_numpy(target))
    assert meter.compute()["miou"] == pytest.approx(mean_iou(conf))


def test_depth_errors_match_numpy():
    rng = np.random.default_rng(2)
    t = rng.uniform(0.5, 10, (2, 1, 16, 16))
    t[0, 0, :2] = 0  # no measurement
    p = t * rng.uniform(0.7, 1.4, t.shape)
    out = depth_errors(torch.from_numpy(p), torch.from_numpy(t))
    v = t > 0
    assert out["abs_rel"] == pytest.approx(np.mean(np.abs(p[v] - t[v]) / t[v]))
    assert out["rmse"] == pytest.approx(math.sqrt(np.mean((p[v] - t[v]) ** 2)))
    assert out["delta1"] == pytest.approx(np.mean(np.maximum(p[v] / t[v], t[v] / p[v]) < 1.25))


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 5, (40, 48))
    b = a + rng.normal(0, 0.5, a.shape)
    ref = structural_similarity(a, b, data_range=5.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(torch.from_numpy(a), torch.from_numpy(b), 5.0) == pytest.approx(ref, abs=1e-6)
    assert ssim(torch.from_numpy(a), torch.from_numpy(a), 5.0) == pytest.approx(1.0)


def test_depth_meter_resizes_and_skips_invalid():
    meter = DepthMeter()
    target = torch.full((1, 1, 16, 16), 2.0)
    target[..., :4, :] = 0
    meter.update(torch.full((1, 1, 8, 8), 2.0), target)
    out = meter.compute()
    assert out["abs_rel"] == 0 and out["delta1"] == 1 and out["ssim"] == pytest.approx(1.0)
