"""Defaults that are the official code's settings, and the named options for the other settings: Diffusion-TTA's
adapted set, presets and precision, the Diffusion Classifier's per-data-set loss, TTT-MAE's mask token and slow
inference's optimizer state."""
import copy

import pytest
import torch
from torch import nn

import tta
import tta.methods.diffusion_classifier  # noqa: F401  (registers the methods before tta.methods imports them)
import tta.methods.diffusion_tta  # noqa: F401
import tta.methods.slow_inference  # noqa: F401
import tta.methods.ttt_mae  # noqa: F401
from tta.generative import DiffusionClassifier
from tta.methods.diffusion_tta import PRESETS, DiffusionTTAConfig, all_but_last_parameters
from tta.models.sources import CLIPZeroShot

from fixtures import gaussian_problem, save_pixel_judge

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
FAST = {"pairs": 6, "micro_batch": 3, "steps": 1, "seed": 0}


@pytest.fixture(scope="module")
def pixel_judge(tmp_path_factory):
    return save_pixel_judge(tmp_path_factory.mktemp("judge") / "judge", num_classes=5, size=16)


class ScaledBlock(nn.Module):
    """A module with children that also holds a parameter itself, as ConvNeXt's blocks hold their layer scale."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.scale = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, x):
        return self.norm(self.conv(x)) * self.scale


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block, self.pool, self.fc = ScaledBlock(), nn.AdaptiveAvgPool2d(2), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.pool(self.block(x)).flatten(1))


def with_gradient(module):
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


# ---- Diffusion-TTA: what adapts ---------------------------------------------------------------------------------
def test_all_but_last_gives_gradients_to_every_leaf_but_the_last(pixel_judge):
    """The official adapted set (build.py load_optimizer, freeze_class_embeds: True): the leaf modules' parameters
    but the last leaf's; a parameter held by a module with children gets none either."""
    model = TinyNet()
    adapter = tta.create_adapter("diffusion_tta", model, judge=pixel_judge, adapt_judge=False, **FAST)
    assert adapter.cfg.adapt == "all_but_last"  # the default
    leaves = {"block.conv.weight", "block.conv.bias", "block.norm.weight", "block.norm.bias"}
    assert set(adapter.adapted_names) == leaves
    adapter.compute_gradients(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    assert with_gradient(model) == leaves
    assert model.fc.weight.grad is None and model.fc.bias.grad is None and model.block.scale.grad is None


def test_all_but_last_on_official_architectures():
    tv = pytest.importorskip("torchvision")
    resnet = tv.models.resnet18(num_classes=5)
    names = {n for n, _ in all_but_last_parameters(resnet)}
    assert names == {n for n, _ in resnet.named_parameters()} - {"fc.weight", "fc.bias"}
    # A CLIP zero-shot model's last layer is its fixed text head (a buffer): every leaf of the image tower adapts.
    visual = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.LayerNorm(8))
    clip = CLIPZeroShot(visual, torch.randn(3, 8), 100.0)
    assert {n for n, _ in all_but_last_parameters(clip)} == {n for n, _ in clip.named_parameters()}
    # last_layer names the module left out instead
    assert {n for n, _ in all_but_last_parameters(TinyNet(), "block.norm")} == {"block.conv.weight", "block.conv.bias",
                                                                                  "fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="Valid choices"):
        all_but_last_parameters(TinyNet(), "head")


def test_adapt_all_still_adapts_every_weight(pixel_judge):
    model = TinyNet()
    adapter = tta.create_adapter("diffusion_tta", model, judge=pixel_judge, adapt="all", adapt_judge=False, **FAST)
    adapter.compute_gradients(torch.rand(2, 3, 16, 16))
    assert with_gradient(model) == {n for n, _ in model.named_parameters()}


# ---- Diffusion-TTA: presets and precision ------------------------------------------------------------------------
def test_default_is_the_official_dit_setting_and_adapts_the_judge(pixel_judge):
    cfg = DiffusionTTAConfig()
    assert (cfg.preset, cfg.optimizer, cfg.lr, cfg.momentum, cfg.steps, cfg.pairs, cfg.micro_batch) == \
        ("official-dit", "sgd", 5e-3, 0.9, 5, 180, 15)
    assert cfg.adapt == "all_but_last" and cfg.adapt_judge is True and cfg.autocast == "off"
    adapter = tta.create_adapter("diffusion_tta", TinyNet(), judge=pixel_judge, **FAST)
    adapter.compute_gradients(torch.rand(1, 3, 16, 16))
    judge = {f"judge.{n}" for n in with_gradient(adapter.judge)}
    assert judge and judge == {n for n in adapter.adapted_names if n.startswith("judge.")}
    assert adapter.optimizer.param_groups[1]["lr"] == 5e-3  # the judge's group: the same lr, as one optimizer there


def test_presets_fill_only_what_is_not_given():
    sd = DiffusionTTAConfig(preset="official-sd")
    assert (sd.pairs, sd.micro_batch, sd.adapt_judge, sd.optimizer, sd.lr) == (192, 16, False, "sgd", 5e-3)
    adam = DiffusionTTAConfig(preset="official-dit-adam")
    assert (adam.optimizer, adam.lr, adam.weight_decay, adam.adapt_judge) == ("adamw", 1e-5, 0.0, True)
    only = DiffusionTTAConfig(preset="classifier-only")
    assert only.adapt_judge is False and {k: getattr(only, k) for k in PRESETS["official-dit"] if k !=
                                          "adapt_judge"} == {k: v for k, v in PRESETS["official-dit"].items()
                                                             if k != "adapt_judge"}
    explicit = DiffusionTTAConfig(preset="official-sd", pairs=32, adapt_judge=True, lr=1e-3)
    assert (explicit.pairs, explicit.adapt_judge, explicit.lr, explicit.micro_batch) == (32, True, 1e-3, 16)


def test_optimizer_of_the_adam_preset_is_adamw(pixel_judge):
    adapter = tta.create_adapter("diffusion_tta", TinyNet(), judge=pixel_judge, preset="official-dit-adam", **FAST)
    assert type(adapter.optimizer) is torch.optim.AdamW and adapter.optimizer.param_groups[0]["weight_decay"] == 0


def test_preset_errors_are_clear(pixel_judge):
    with pytest.raises(ValueError, match="official-dit, official-dit-adam, official-sd, classifier-only"):
        DiffusionTTAConfig(preset="paper")
    with pytest.raises(ValueError, match="classifier-only"):
        tta.create_adapter("diffusion_tta", TinyNet(), judge=pixel_judge, per_example=True)
    per_example = tta.create_adapter("diffusion_tta", TinyNet(), judge=pixel_judge, per_example=True,
                                     preset="classifier-only", **FAST)
    assert per_example.cfg.adapt_judge is False


# ---- the Diffusion Classifier: each preset's official loss -------------------------------------------------------
@pytest.mark.parametrize("preset,loss", [("cifar10", "l1"), ("pets", "l1"), ("flowers", "l1"), ("stl10", "l1"),
                                         ("food", "l2"), ("aircraft", "l2"), ("imagenet", "l2"),
                                         ("objectnet", "l2")])
def test_classifier_presets_carry_their_commands_loss(preset, loss):
    judge, _, _ = gaussian_problem(k=4)
    assert DiffusionClassifier(judge, preset=preset).loss == loss
    other = "l2" if loss == "l1" else "l1"
    assert DiffusionClassifier(judge, preset=preset, loss=other).loss == other  # an explicit loss wins


def test_classifier_loss_without_a_preset():
    judge, _, _ = gaussian_problem(k=4)
    assert DiffusionClassifier(judge).loss == "l1"  # no schedule either: the cifar10 preset
    assert DiffusionClassifier(judge, keep=(2, 1), samples=(4, 8)).loss == "l2"  # the script's default


def test_classifier_preset_loss_is_the_loss_that_scores():
    judge, images, _ = gaussian_problem(k=6, n=2)
    schedule = {"keep": (5, 1), "samples": (50, 500), "seed": 0, "micro_batch": 1000}
    by_preset = DiffusionClassifier(judge, preset="cifar10", seed=0, micro_batch=1000).errors(images)
    assert torch.allclose(by_preset, DiffusionClassifier(judge, loss="l1", **schedule).errors(images))
    assert not torch.allclose(by_preset, DiffusionClassifier(judge, loss="l2", **schedule).errors(images))


def test_classifier_adapter_records_the_presets_loss(pixel_judge):
    from fixtures import tiny_model
    adapter = tta.create_adapter("diffusion_classifier", tiny_model(), judge=pixel_judge, preset="pets")
    assert adapter.cfg.loss == "l1" and adapter.classifier.loss == "l1"
    explicit = tta.create_adapter("diffusion_classifier", tiny_model(), judge=pixel_judge, preset="pets", loss="l2")
    assert explicit.cfg.loss == "l2" and explicit.classifier.loss == "l2"
    with pytest.raises(ValueError, match="Valid choices"):
        tta.create_adapter("diffusion_classifier", tiny_model(), judge=pixel_judge, loss="huber")


# ---- TTT-MAE: the mask token adapts, as in the authors' finetune_mode 'encoder' ----------------------------------
def mae_model():
    timm = pytest.importorskip("timm")
    from tta.nets import MaskedAutoencoderViT
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1,
                            embed_dim=16, num_heads=2, in_chans=1, num_classes=3)
    return MaskedAutoencoderViT(vit, decoder_dim=8)


@pytest.mark.parametrize("mode,mask_token,cls_token", [("encoder", True, True), ("encoder_no_msk", False, True),
                                                       ("encoder_no_cls_no_msk", False, False)])
def test_ttt_mae_mask_token_gradient(mode, mask_token, cls_token):
    model = mae_model()
    adapter = tta.create_adapter("ttt_mae", model, views=4, finetune_mode=mode)
    torch.manual_seed(0)
    adapter.adaptation_loss(torch.rand(1, 1, 16, 16)).backward()
    got = with_gradient(model)
    assert ("decoder.mask_token" in got) == mask_token and ("vit.cls_token" in got) == cls_token
    assert got == set(adapter.adapted_names)
    assert not any(n.startswith("decoder.") and n != "decoder.mask_token" for n in got)
    assert "vit.head.weight" not in got


def test_ttt_mae_default_moves_the_mask_token_and_resets_it():
    model = mae_model()
    source = model.decoder.mask_token.detach().clone()
    adapter = tta.create_adapter("ttt_mae", model, views=4, steps=2, lr=0.5, episodic=False)
    assert adapter.cfg.finetune_mode == "encoder"
    adapter(torch.rand(1, 1, 16, 16))
    assert not torch.equal(model.decoder.mask_token, source)
    adapter.reset()
    assert torch.equal(model.decoder.mask_token, source)
    with pytest.raises(ValueError, match="encoder, encoder_no_msk, encoder_no_cls_no_msk"):
        tta.create_adapter("ttt_mae", mae_model(), finetune_mode="all")


# ---- slow inference: the training run's optimizer state for every scene -----------------------------------------
class TinyAutoEncoder(nn.Module):
    """A deterministic reconstruction model (ReconstructionModel), so one step can be replayed by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(16, 4), nn.Linear(4, 16)

    def reconstruct(self, x):
        return self.dec(self.enc(x.flatten(1))).view_as(x), {}

    def predict(self, x):
        return self.enc(x.flatten(1))


def trained_adam_state(model, path, steps=3, lr=1e-2, key=None):
    """Save the state of an Adam that trained `model` for a few steps (on a copy), as a checkpoint would hold it."""
    copy_ = copy.deepcopy(model)
    optimizer = torch.optim.Adam(copy_.parameters(), lr=lr)
    for i in range(steps):
        x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(i))
        optimizer.zero_grad()
        recon, _ = copy_.reconstruct(x)
        (recon - x).pow(2).mean().backward()
        optimizer.step()
    state = optimizer.state_dict()
    torch.save({key: state, "model": copy_.state_dict()} if key else state, path)
    return state


@pytest.mark.parametrize("key", [None, "optimizer", "optimizer_state_dict"])
def test_optimizer_state_starts_every_scene(tmp_path, key):
    model = TinyAutoEncoder()
    saved = trained_adam_state(model, tmp_path / "state.pt", key=key)
    source = copy.deepcopy(model)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    adapter = tta.create_adapter("slow_inference", model, steps=1, lr=5e-4, optimizer_state=str(tmp_path / "state.pt"))
    assert adapter.optimizer.param_groups[0]["lr"] == 5e-4  # the config's lr, not the saved run's 1e-2
    out = adapter(x)  # two scenes, each from the loaded state
    for i in range(2):  # replay: the saved Adam state, one step on that scene alone
        replay = copy.deepcopy(source)
        optimizer = torch.optim.Adam(replay.parameters(), lr=5e-4)
        optimizer.load_state_dict(copy.deepcopy(saved))  # torch shares the saved step counters, which step() bumps
        optimizer.param_groups[0]["lr"] = 5e-4
        recon, _ = replay.reconstruct(x[i:i + 1])
        (recon - x[i:i + 1]).pow(2).flatten(1).mean(1).mean().backward()
        optimizer.step()
        with torch.no_grad():
            assert torch.allclose(out[i], replay.predict(x[i:i + 1])[0], atol=1e-6)
    state = adapter.optimizer.state_dict()["state"]  # after the scenes: reset to the loaded state
    for i, s in saved["state"].items():
        assert torch.equal(state[i]["exp_avg"], s["exp_avg"]) and float(state[i]["step"]) == float(s["step"])
    fresh = tta.create_adapter("slow_inference", TinyAutoEncoder(), steps=1, lr=5e-4)(x)
    assert not torch.allclose(fresh, out, atol=1e-6)  # a fresh Adam's first step differs


def test_optimizer_state_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        tta.create_adapter("slow_inference", TinyAutoEncoder(), optimizer_state=str(tmp_path / "missing.pt"))
    trained_adam_state(TinyAutoEncoder(), tmp_path / "adam.pt")
    with pytest.raises(ValueError, match="not a sgd state"):
        tta.create_adapter("slow_inference", TinyAutoEncoder(), optimizer="sgd",
                           optimizer_state=str(tmp_path / "adam.pt"))
    other = nn.Module()
    other.enc, other.dec = nn.Linear(16, 5), nn.Linear(5, 16)
    other.reconstruct = TinyAutoEncoder.reconstruct.__get__(other)
    trained_adam_state(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="same model's optimizer"):
        tta.create_adapter("slow_inference", TinyAutoEncoder(), optimizer_state=str(tmp_path / "other.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="holds no optimizer state dict"):
        tta.create_adapter("slow_inference", TinyAutoEncoder(), optimizer_state=str(tmp_path / "junk.pt"))
