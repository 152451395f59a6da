"""Tiny models and batches shared by the tests (CPU, offline, seconds)."""
import functools
import tempfile

import pytest
import torch
from torch import nn

import tta


class TinyNet(nn.Module):
    """A small BN + GN + LN classifier or segmenter; `sharpness` scales the logits so that entropy filters
    (EATA, SAR) keep samples."""

    def __init__(self, num_classes=5, dense=False, sharpness=1.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.dense = dense
        self.head = nn.Conv2d(8, num_classes, 1) if dense else nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, num_classes))
        self.sharpness = sharpness

    def forward(self, x):
        return self.sharpness * self.head(self.features(x))


def tiny_model(num_classes=5, dense=False, sharpness=1.0, seed=0, task=None):
    torch.manual_seed(seed)
    net = TinyNet(num_classes, dense, sharpness)
    task = task or ("segmentation" if dense else "classification")
    return tta.wrap_model(net, class_names=[f"c{i}" for i in range(num_classes)], input_size=(3, 16, 16), task=task)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine extra threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(8, 3, 16, 16)


# Keep augmentation-heavy methods cheap in the tests.
FAST = {"memo": {"n_augmentations": 4}, "cotta": {"n_augmentations": 2}}


# ---- one small model (and batch) per registered method, for the contract tests -------------------------------
def _it3_model():
    from tta.nets import IT3Net
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return IT3Net(net, num_outputs=5, layer="3"), {}, torch.rand(8, 3, 16, 16)


def _slot_model():
    from tta.nets import SlotAttentionAutoEncoder
    torch.manual_seed(0)
    model = SlotAttentionAutoEncoder(image_size=(16, 16), in_channels=1, num_slots=3, dim=16, hidden=8)
    return model, {"steps": 3}, torch.rand(2, 1, 16, 16)


def _mae_model():
    import timm
    from tta.nets import MaskedAutoencoderViT
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                            embed_dim=32, num_heads=2, in_chans=1, num_classes=3)
    return MaskedAutoencoderViT(vit, decoder_dim=16), {"steps": 2, "views": 2}, torch.rand(2, 1, 16, 16)


@functools.lru_cache(maxsize=None)
def _tiny_judge_folder():
    from test_generative import save_pixel_judge
    return save_pixel_judge(tempfile.mkdtemp(prefix="tta-judge-"), num_classes=5, size=16)


def _diffusion_model(name):
    torch.manual_seed(1)
    config = ({"backend": _tiny_judge_folder(), "steps": 1, "pairs": 4, "micro_batch": 4} if name == "diffusion_tta"
              else {"backend": _tiny_judge_folder(), "samples": (4,), "micro_batch": 20})
    return tiny_model(sharpness=20.0), config, torch.rand(8, 3, 16, 16)


SPECIAL_MODELS = {"it3": _it3_model, "slow_inference": _slot_model, "ttt_mae": _mae_model,
                  "diffusion_tta": functools.partial(_diffusion_model, "diffusion_tta"),
                  "diffusion_classifier": functools.partial(_diffusion_model, "diffusion_classifier")}


def model_and_config(name, **overrides):
    """(model, config, batch) that `name` accepts: the shared TinyNet for most methods, their own for the rest."""
    if name in SPECIAL_MODELS:
        model, config, batch = SPECIAL_MODELS[name]()
    else:
        torch.manual_seed(1)
        model, config, batch = tiny_model(sharpness=20.0), dict(FAST.get(name, {})), torch.rand(8, 3, 16, 16)
    return model, {**config, **overrides}, batch


@pytest.fixture
def fixed_draws(monkeypatch):
    """Diffusion-TTA's (t, eps) draws fixed per step for up to 3 images: set state["rows"] to the images a run
    adapts and state["step"] to 0 before it, and every run gets its images' rows of the same draws, so a batch
    adapted per example can be compared with separate runs of one image."""
    import tta.methods.diffusion_tta as dtta
    draws = {}
    state = {"step": 0, "rows": slice(0, 3)}

    def fake_pairs(x0, n, *args):
        step = state["step"]
        state["step"] += 1
        if step not in draws:
            gen = torch.Generator().manual_seed(4 + step)
            draws[step] = (torch.randint(0, 1000, (3, n), generator=gen),
                           torch.randn(3, n, *x0.shape[1:], generator=gen))
        t, eps = draws[step]
        return t[state["rows"]].to(x0.device), eps[state["rows"]].to(x0.device, x0.dtype)
    monkeypatch.setattr(dtta, "sample_pairs", fake_pairs)
    return state
