"""A judge trained on per-image standardised images sees test images the same way; the classifier control too."""
import json
import os

import pytest
import torch

from tta.generative import create_judge
from tta.generative.base import STANDARD_IMAGE_STD, normalise_judge_input
from fixtures import save_pixel_judge


def test_per_image_normalisation_removes_brightness_and_contrast():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    z = normalise_judge_input(x, "per-image")
    assert torch.allclose(z.flatten(1).mean(1), torch.zeros(4), atol=1e-6)
    assert torch.allclose(z.flatten(1).std(1, unbiased=False), torch.full((4,), STANDARD_IMAGE_STD), atol=0.03)
    # a darker, flatter copy of the same images standardises to (almost) the same thing; eps keeps it finite
    shifted = normalise_judge_input(0.2 * x + 0.5, "per-image")
    assert (shifted - z).abs().max() < 0.1 * z.abs().max()
    assert torch.equal(normalise_judge_input(x, "none"), x)
    assert torch.equal(normalise_judge_input(torch.zeros(1, 1, 4, 4), "per-image"), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="input_norm"):
        normalise_judge_input(x, "per-channel")


def _judge(tmp_path, input_norm=None):
    folder = save_pixel_judge(tmp_path / "judge", num_classes=3, size=16, channels=1)
    if input_norm is not None:
        with open(os.path.join(folder, "tta_backend.json"), "w") as f:
            json.dump({"kind": "pixel-unet", "input_norm": input_norm}, f)
    return create_judge(folder, kind="pixel-unet")


def test_judge_reads_its_input_norm_from_its_folder(tmp_path):
    x = torch.rand(2, 1, 16, 16)
    dim = 0.3 * x + 0.1  # the same images at lower brightness and contrast
    plain, standardised = _judge(tmp_path / "a"), _judge(tmp_path / "b", "per-image")
    assert plain.input_norm == "none" and standardised.input_norm == "per-image"
    assert (plain.encode(x) - plain.encode(dim)).abs().max() > 0.5
    assert (standardised.encode(x) - standardised.encode(dim)).abs().max() < 0.1
    with pytest.raises(ValueError, match="input_norm"):
        _judge(tmp_path / "c", "sometimes")


def test_standardised_classifier_control_is_blind_to_contrast():
    from tta.zoo.fmnist import load_classifier
    torch.manual_seed(0)
    model, plain = load_classifier(None, standardise=True).eval(), load_classifier(None).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), model(0.5 * x + 0.2), atol=1e-3)
        assert not torch.allclose(plain(x), plain(0.5 * x + 0.2), atol=1e-3)
