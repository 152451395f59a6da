"""The `zoo-cifar10` / `zoo-imagenet` presets of tent and cotta against independent transcriptions of the TTA zoo
(mariodoebler/test-time-adaptation, classification/: conf.py, cfgs/cifar10_c/{tent,cotta}.yaml,
cfgs/imagenet_c/{tent,cotta}.yaml, methods/base.py, methods/tent.py, methods/cotta.py,
augmentations/transforms_cotta.py, utils/misc.py) on the tiny BN + GN + LN network of the fixtures, to 1e-5: each
preset resolves to the zoo's values, and adaptation steps under it equal the zoo's. Also: `tta run` computes EATA's
Fisher regulariser from fisher_data through the harness's code path (tta.bench.source_data)."""
import copy

import numpy as np
import pytest
import torch
from fixtures import tiny_model
from official_code import cotta_get_tta_transforms, cotta_softmax_entropy, tent_forward_and_adapt
from PIL import Image
from torch import nn

import tta
from tta.adapter import ADAPTERS
from tta.bench.source_data import fisher_batches
from tta.cli import main
from tta.data import open_images

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
TOL = {"atol": 1e-5, "rtol": 1e-5}

# What the zoo's YAMLs set over conf.py's defaults (OPTIM.BETA is Adam's first beta; OPTIM.MOMENTUM, DAMPENING 0 and
# NESTEROV True apply to SGD; WD 0; STEPS 1; MODEL.EPISODIC False).
ZOO_OPTIM = {
    "zoo-cifar10": {"optimizer": "adam", "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "steps": 1,
                    "episodic": False},
    "zoo-imagenet": {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0,
                     "steps": 1, "episodic": False},
}
ZOO_COTTA = {  # M_TEACHER.MOMENTUM, COTTA.RST, COTTA.AP, TEST.N_AUGMENTATIONS; the loss by data set name
    "zoo-cifar10": {**ZOO_OPTIM["zoo-cifar10"], "ema_momentum": 0.999, "restore_prob": 0.01,
                    "confidence_threshold": 0.92, "n_augmentations": 32, "loss": "ce"},
    "zoo-imagenet": {**ZOO_OPTIM["zoo-imagenet"], "lr": 0.01, "ema_momentum": 0.999, "restore_prob": 0.001,
                     "confidence_threshold": 0.1, "n_augmentations": 32, "loss": "sce"},
}


@pytest.mark.parametrize("preset", sorted(ZOO_OPTIM))
def test_tent_zoo_presets_resolve_to_the_zoos_values(preset):
    cfg = ADAPTERS.get("tent").Config(preset=preset)
    assert {k: getattr(cfg, k) for k in ZOO_OPTIM[preset]} == ZOO_OPTIM[preset]
    assert ADAPTERS.get("tent").Config(preset=preset, lr=0.5).lr == 0.5  # a field given explicitly wins
    default = ADAPTERS.get("tent").Config()
    assert (default.optimizer, default.lr, default.momentum, default.nesterov) == ("sgd", 2.5e-4, 0.9, False)


@pytest.mark.parametrize("preset", sorted(ZOO_COTTA))
def test_cotta_zoo_presets_resolve_to_the_zoos_values(preset):
    cfg = ADAPTERS.get("cotta").Config(preset=preset)
    assert {k: getattr(cfg, k) for k in ZOO_COTTA[preset]} == ZOO_COTTA[preset]
    # the zoo's augmentations are the authors' (transforms_cotta.get_tta_transforms); weight/bias only
    assert (cfg.augment, cfg.adapt) == ("official", "weight_bias")


# ---- transcriptions of the zoo ---------------------------------------------------------------------------------
# methods/tent.py forward_and_adapt is DequanWang/tent's step, methods/cotta.py softmax_entropy_cifar and
# softmax_entropy_imagenet are qinenergy/cotta's losses, and augmentations/transforms_cotta.py get_tta_transforms is
# qinenergy/cotta's list: each is transcribed once, in official_code.py.
def zoo_configure_model(model, cotta):
    """methods/tent.py and methods/cotta.py configure_model: eval mode, batch-norm on batch statistics; tent enables
    the normalisation layers, cotta every module."""
    model.eval()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        elif isinstance(m, nn.BatchNorm1d):
            m.train()
            m.requires_grad_(True)
        elif cotta or isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.requires_grad_(True)
    return model


def zoo_collect_params(model, tent):
    """methods/tent.py collect_params (norm layers' weight and bias) or base.py's (every weight and bias that
    requires grad)."""
    params = []
    for nm, m in model.named_modules():
        if tent and not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            continue
        for np_, p in m.named_parameters():
            if np_ in ["weight", "bias"] and (tent or p.requires_grad):
                params.append(p)
    return params


def zoo_setup_optimizer(params, method, lr):
    """base.py setup_optimizer with conf.py's OPTIM defaults (BETA 0.9, MOMENTUM 0.9, DAMPENING 0, NESTEROV True,
    WD 0)."""
    if method == "Adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True)


class ZooCoTTA:
    """methods/cotta.py CoTTA.loss_calculation + forward_and_adapt (single precision), ema_update_model of
    utils/misc.py with update_all=True."""

    def __init__(self, model, optimizer, imagenet, img_size, n_augmentations, ap, rst, mt=0.999):
        self.model, self.optimizer, self.imagenet = model, optimizer, imagenet
        self.mt, self.rst, self.ap, self.n_augmentations = mt, rst, ap, n_augmentations
        self.model_ema = copy.deepcopy(model)
        for param in self.model_ema.parameters():
            param.detach_()
        self.model_anchor = copy.deepcopy(model)
        for param in self.model_anchor.parameters():
            param.detach_()
        self.model_states = [copy.deepcopy(m.state_dict()) for m in (model, self.model_ema, self.model_anchor)]
        self.transform = cotta_get_tta_transforms(img_size)

    @torch.enable_grad()
    def __call__(self, imgs_test):
        outputs = self.model(imgs_test)
        anchor_prob = torch.nn.functional.softmax(self.model_anchor(imgs_test), dim=1).max(1)[0]
        ema_outputs = []
        if anchor_prob.mean(0) < self.ap:
            for _ in range(self.n_augmentations):
                ema_outputs.append(self.model_ema(self.transform(imgs_test)).detach())
            outputs_ema = torch.stack(ema_outputs).mean(0)
        else:
            outputs_ema = self.model_ema(imgs_test)
        loss = cotta_softmax_entropy(outputs, outputs_ema, self.imagenet).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        for param_to_update, param_to_merge in zip(self.model_ema.parameters(), self.model.parameters()):
            param_to_update.data = self.mt * param_to_update.data + (1 - self.mt) * param_to_merge.data
        with torch.no_grad():
            if self.rst > 0.:
                for nm, m in self.model.named_modules():
                    for npp, p in m.named_parameters():
                        if npp in ["weight", "bias"] and p.requires_grad:
                            mask = (torch.rand(p.shape) < self.rst).float()
                            p.data = self.model_states[0][f"{nm}.{npp}"] * mask + p * (1. - mask)
        return outputs_ema


# ---- the comparisons -------------------------------------------------------------------------------------------
def stream(n, seed=1):
    """Batches of distinct mean colours, so that the tiny network's predictions differ between images."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 3, 1, 1, generator=g) + 0.3 * torch.rand(8, 3, 16, 16, generator=g)).clamp(0, 1)
            for _ in range(n)]


def assert_same_params(model, ref):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name].detach(), **TOL)


class WithToken(nn.Module):
    """TinyNet plus a parameter that is neither a weight nor a bias (as a ViT class token): the zoo's CoTTA leaves it
    fixed."""

    def __init__(self, net):
        super().__init__()
        self.body = net
        self.offset = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x):
        return self.body(x + self.offset)


@pytest.mark.parametrize("preset", sorted(ZOO_OPTIM))
def test_tent_zoo_presets_step_as_the_zoo(preset):
    model, ref_model = tiny_model(sharpness=3.0), zoo_configure_model(tiny_model(sharpness=3.0), cotta=False)
    adapter = tta.create_adapter("tent", model, preset=preset)
    method, lr = ("Adam", 1e-3) if preset == "zoo-cifar10" else ("SGD", 2.5e-4)
    optimizer = zoo_setup_optimizer(zoo_collect_params(ref_model, tent=True), method, lr)
    source = copy.deepcopy(dict(model.named_parameters()))
    for x in stream(3):  # three steps, so that Adam's moments and Nesterov's momentum count
        expected = tent_forward_and_adapt(x, ref_model, optimizer)
        torch.testing.assert_close(adapter(x), expected, **TOL)
        assert_same_params(model, ref_model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, source[n])}
    assert moved and moved <= set(adapter.adapted_names)  # norm layers only: convolutions and the head stay


@pytest.mark.parametrize("preset, anchor_unsure", [("zoo-cifar10", True), ("zoo-cifar10", False),
                                                   ("zoo-imagenet", True), ("zoo-imagenet", False)])
def test_cotta_zoo_presets_step_as_the_zoo(preset, anchor_unsure):
    imagenet = preset == "zoo-imagenet"
    ap = 1.0 if anchor_unsure else 0.0  # the anchor's mean top probability is always below 1 and above 0
    rst = 0.2                           # instead of 0.01 / 0.001, so that restores happen within three batches

    def net():
        base = tiny_model(sharpness=3.0)
        # The bias of a convolution that feeds batch norm on batch statistics has a true gradient of zero; Adam
        # would scale rounding noise there into full lr steps, different in any two implementations: drop it.
        base.net.features[0].register_parameter("bias", None)
        torch.manual_seed(0)
        return tta.wrap_model(WithToken(base.net), class_names=base.class_names, input_size=(3, 16, 16))
    model, ref_model = net(), zoo_configure_model(net(), cotta=True)
    adapter = tta.create_adapter("cotta", model, preset=preset, n_augmentations=3, confidence_threshold=ap,
                                 restore_prob=rst)
    method, lr = ("SGD", 0.01) if imagenet else ("Adam", 1e-3)
    optimizer = zoo_setup_optimizer(zoo_collect_params(ref_model, tent=False), method, lr)
    ref = ZooCoTTA(ref_model, optimizer, imagenet, (16, 16), 3, ap, rst)
    for i, x in enumerate(stream(3, seed=2)):
        torch.manual_seed(100 + i)
        expected = ref(x)
        torch.manual_seed(100 + i)
        torch.testing.assert_close(adapter(x), expected, **TOL)
        assert_same_params(model, ref_model)
        assert_same_params(adapter.teacher, ref.model_ema)
    assert torch.equal(model.net.offset, torch.zeros(1, 3, 1, 1))  # neither a weight nor a bias: fixed


# ---- EATA's Fisher in tta run ----------------------------------------------------------------------------------
def image_folder(root, per_class=3, classes=2):
    """Grey 28x28 images in class folders 0, 1, ... (Fashion-MNIST's size, for zoo:fmnist-cnn)."""
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.random.default_rng([c, i]).integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels).save(root / str(c) / f"{i}.png")
    return root


@pytest.fixture
def fishers(monkeypatch):
    """The Fisher information each EATA adapter computes, in order."""
    computed = []
    original = ADAPTERS.get("eata").compute_fisher

    def recording(self, batches):
        original(self, batches)
        computed.append(self.fisher)
    monkeypatch.setattr(ADAPTERS.get("eata"), "compute_fisher", recording)
    return computed


def run_eata(data, *options):
    return main(["run", "--model", "zoo:fmnist-cnn", "--data", str(data), "--method", "eata", "--batch-size", "4",
                 "--seed", "3", *options])


def test_tta_run_computes_eatas_fisher_from_a_folder(tmp_path, capsys, fishers):
    test, clean = image_folder(tmp_path / "test"), image_folder(tmp_path / "clean", per_class=5)
    assert run_eata(test, "--set", f"eata.fisher_data={clean}", "--set", "eata.fisher_size=8") == 0
    out = capsys.readouterr().out
    assert f"eata: Fisher regulariser on: Fisher information from 8 clean images of {clean}" in out
    assert "after (eata)" in out and "EATA's Fisher information" in out
    (fisher,) = fishers
    # the harness's draw: 8 of the folder's 10 images, seeded by the run's seed, in batches of its batch size
    model = tta.create_model("zoo:fmnist-cnn")
    by_hand = tta.create_adapter("eata", model, fisher_data=str(clean), fisher_size=8)
    by_hand.compute_fisher(fisher_batches(open_images(str(clean), model.input_size, model.class_names), 8, 4, 3))
    assert set(fisher) == set(by_hand.fisher) == set(by_hand.adapted_names)
    for name, (f, theta) in fisher.items():
        torch.testing.assert_close(f, by_hand.fisher[name][0])
        torch.testing.assert_close(theta, by_hand.fisher[name][1])


def test_tta_run_says_whether_the_fisher_regulariser_is_on(tmp_path, capsys, fishers):
    test = image_folder(tmp_path / "test")
    assert run_eata(test) == 0
    assert "eata: Fisher regulariser off: no fisher_data, so it runs as ETA" in capsys.readouterr().out
    # clean: the --data images before the --corruption (all six: fewer than fisher_size)
    assert run_eata(test, "--corruption", "gaussian_noise", "--set", "eata.fisher_data=clean") == 0
    out = capsys.readouterr().out
    assert "eata: Fisher regulariser on: Fisher information from 6 clean images of clean (all there are" in out
    assert len(fishers) == 1
    # without a corruption, clean would be the test images themselves: refused before any model loads
    assert run_eata(test, "--set", "eata.fisher_data=clean") == 2
    assert "give fisher_data a folder of clean images, or add --corruption" in capsys.readouterr().err
    assert run_eata(test, "--set", f"eata.fisher_data={tmp_path / 'missing'}") == 2
    assert "is not a folder" in capsys.readouterr().err
