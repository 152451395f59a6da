"""The baselines' `official` presets against independent transcriptions of the authors' code (mr-eggplant/EATA,
mr-eggplant/SAR, qinenergy/cotta, zhangmarvin/memo, DequanWang/tent) on tiny batch-norm networks, to 1e-5, edge paths
included: EATA's Fisher regulariser and a reset that keeps its moving average; SAR without a reliable sample
(momentum steps) and its repeated recoveries; CoTTA augmented and not, with stochastic restores; MEMO's AugMix draw
for draw and its batch-norm prior. Each reference follows its repository's functions line by line (names kept), with
.cuda() calls dropped and numpy's global generator passed in as an object; the adapter under test is built from its
preset. Also: EATA's Fisher computed by the harness (fisher_data), and the benchmark files' presets."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.adapter import ADAPTERS
from tta.bench.datasets import BuildContext, DataConfig
from tta.bench.source_data import clean_images, fisher_batches, prepare_adapter

from official_code import (cotta_collect_params, cotta_configure_model, cotta_get_tta_transforms,
                           cotta_softmax_entropy, sar_collect_params, tent_collect_params,
                           tent_configure_model)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
TOL = {"atol": 1e-5, "rtol": 1e-5}


def bn_net(num_classes=5, seed=0, sharpness=8.0):
    """Conv-BN-ReLU x2, pooling, a linear head: the layer types the official code adapts (BatchNorm2d only)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))
    with torch.no_grad():  # confident enough that the entropy filters keep some samples
        net[-1].weight.mul_(sharpness)
    return tta.wrap_model(net, class_names=[f"c{i}" for i in range(num_classes)], input_size=(3, 12, 12))


def batches(n, size=8, seed=1):
    """Images of distinct mean colours, so that the tiny network's predictions differ between them."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 3, 1, 1, generator=g) + 0.3 * torch.rand(size, 3, 12, 12, generator=g)).clamp(0, 1)
            for _ in range(n)]


def assert_same_params(model, ref):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name].detach(), **TOL)


def moved(model, seed=0):
    source = dict(bn_net(seed=seed).named_parameters())
    return sum(not torch.equal(p.detach(), source[n].detach()) for n, p in model.named_parameters())


# ---- EATA: mr-eggplant/EATA eata.py and main.py ----------------------------------------------------------------
# eata.py configure_model and collect_params are tent.py's lines: official_code.tent_configure_model and
# tent_collect_params.
def eata_fishers(subnet, params, fisher_loader):
    """main.py, `elif args.algorithm == 'eata'`."""
    ewc_optimizer = torch.optim.SGD(params, 0.001)
    fishers = {}
    train_loss_fn = nn.CrossEntropyLoss()
    for iter_, images in enumerate(fisher_loader, start=1):
        outputs = subnet(images)
        _, targets = outputs.max(1)
        loss = train_loss_fn(outputs, targets)
        loss.backward()
        for name, param in subnet.named_parameters():
            if param.grad is not None:
                if iter_ > 1:
                    fisher = param.grad.data.clone().detach() ** 2 + fishers[name][0]
                else:
                    fisher = param.grad.data.clone().detach() ** 2
                if iter_ == len(fisher_loader):
                    fisher = fisher / iter_
                fishers.update({name: [fisher, param.data.clone().detach()]})
        ewc_optimizer.zero_grad()
    return fishers


def eata_update_model_probs(current_model_probs, new_probs):
    if current_model_probs is None:
        if new_probs.size(0) == 0:
            return None
        with torch.no_grad():
            return new_probs.mean(0)
    if new_probs.size(0) == 0:
        with torch.no_grad():
            return current_model_probs
    with torch.no_grad():
        return 0.9 * current_model_probs + (1 - 0.9) * new_probs.mean(0)


@torch.enable_grad()
def forward_and_adapt_eata(x, model, optimizer, fishers, e_margin, current_model_probs, fisher_alpha, d_margin):
    outputs = model(x)
    entropys = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
    filter_ids_1 = torch.where(entropys < e_margin)
    ids1 = filter_ids_1
    ids2 = torch.where(ids1[0] > -0.1)
    entropys = entropys[filter_ids_1]
    if current_model_probs is not None:
        cosine_similarities = F.cosine_similarity(current_model_probs.unsqueeze(dim=0),
                                                  outputs[filter_ids_1].softmax(1), dim=1)
        filter_ids_2 = torch.where(torch.abs(cosine_similarities) < d_margin)
        entropys = entropys[filter_ids_2]
        ids2 = filter_ids_2
        updated_probs = eata_update_model_probs(current_model_probs, outputs[filter_ids_1][filter_ids_2].softmax(1))
    else:
        updated_probs = eata_update_model_probs(current_model_probs, outputs[filter_ids_1].softmax(1))
    coeff = 1 / (torch.exp(entropys.clone().detach() - e_margin))
    entropys = entropys.mul(coeff)
    loss = entropys.mean(0)
    if fishers is not None:
        ewc_loss = 0
        for name, param in model.named_parameters():
            if name in fishers:
                ewc_loss += fisher_alpha * (fishers[name][0] * (param - fishers[name][1]) ** 2).sum()
        loss += ewc_loss
    if x[ids1][ids2].size(0) != 0:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad()
    return outputs, updated_probs


class OfficialEATA:
    """eata.EATA: reset() reloads the model and optimizer and keeps current_model_probs."""

    def __init__(self, model, lr, fisher_loader, fisher_alpha, e_margin, d_margin):
        self.model = tent_configure_model(model)
        params, _ = tent_collect_params(self.model)
        self.fishers = eata_fishers(self.model, params, fisher_loader) if fisher_loader is not None else None
        self.optimizer = torch.optim.SGD(params, lr, momentum=0.9)
        self.fisher_alpha, self.e_margin, self.d_margin = fisher_alpha, e_margin, d_margin
        self.current_model_probs = None
        self.model_state = copy.deepcopy(self.model.state_dict())
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    def __call__(self, x):
        outputs, self.current_model_probs = forward_and_adapt_eata(
            x, self.model, self.optimizer, self.fishers, self.e_margin, self.current_model_probs, self.fisher_alpha,
            self.d_margin)
        return outputs

    def reset(self):
        self.model.load_state_dict(self.model_state, strict=True)
        self.optimizer.load_state_dict(self.optimizer_state)


@pytest.mark.parametrize("with_fisher", [True, False])
def test_eata_official_preset_matches_the_authors_code(with_fisher):
    """EATA with the Fisher regulariser (and ETA without), a reset in the middle of the stream that keeps the moving
    average of predictions, redundant samples filtered after the first batch."""
    clean, stream = batches(3, seed=7), batches(6, seed=1)
    lr, d_margin, alpha = 0.05, 0.99, 50.0   # large enough that every path (filtering, penalty) moves weights
    model, ref_model = bn_net(), bn_net()
    config = {"preset": "official", "lr": lr, "d_margin": d_margin, "fisher_alpha": alpha}
    adapter = tta.create_adapter("eata", model, fisher_data="clean" if with_fisher else None, **config)
    assert (adapter.cfg.optimizer, adapter.cfg.momentum, adapter.cfg.keep_average_on_reset) == ("sgd", 0.9, True)
    if with_fisher:
        adapter.compute_fisher(clean)
    ref = OfficialEATA(ref_model, lr, clean if with_fisher else None, alpha, 0.4 * math.log(5), d_margin)
    assert adapter.variant == ("eata" if with_fisher else "eta")
    reliable = updated = 0
    for i, x in enumerate(stream):
        if i == 3:
            reliable, updated = adapter.num_reliable, adapter.num_updated
            adapter.reset()
            ref.reset()
            torch.testing.assert_close(adapter.average_probs, ref.current_model_probs, **TOL)  # kept by both
        torch.testing.assert_close(adapter(x), ref(x), **TOL)
    assert_same_params(model, ref_model)
    reliable, updated = reliable + adapter.num_reliable, updated + adapter.num_updated
    assert 0 < updated < reliable and moved(model) > 0  # both filters dropped samples, and weights moved
    if with_fisher:
        for name, (f, theta0) in adapter.fisher.items():
            torch.testing.assert_close(f, ref.fishers[name][0], **TOL)
            torch.testing.assert_close(theta0, ref.fishers[name][1], **TOL)


def test_eata_presets():
    cfg = ADAPTERS.get("eata").Config
    assert (cfg().preset, cfg().lr, cfg().keep_average_on_reset) == ("tta", 2.5e-4, False)  # today's behaviour
    zoo = cfg(preset="zoo-cifar10")
    assert (zoo.optimizer, zoo.lr, zoo.d_margin, zoo.fisher_alpha, zoo.fisher_size) == ("adam", 1e-3, 0.4, 1.0, 2000)
    assert cfg(preset="zoo-imagenet").nesterov is True
    assert cfg(preset="zoo-cifar10", lr=5e-4).lr == 5e-4  # a field given explicitly wins
    with pytest.raises(ValueError, match="Valid choices"):
        cfg(preset="offical")
    with pytest.raises(ValueError, match="nesterov applies to SGD"):
        cfg(preset="zoo-cifar10", nesterov=True)
    # The default clears the moving average on reset, as the zoo; official keeps it.
    adapter = tta.create_adapter("eata", bn_net(), d_margin=0.99)
    adapter(batches(1)[0])
    assert adapter.average_probs is not None
    adapter.reset()
    assert adapter.average_probs is None


def test_eata_refuses_to_adapt_without_the_fisher_its_config_names():
    adapter = tta.create_adapter("eata", bn_net(), fisher_data="clean")
    with pytest.raises(ValueError, match="compute_fisher"):
        adapter(batches(1)[0])
    assert adapter.variant == "eta" and moved(adapter.model) == 0


# ---- EATA's Fisher in the harness ------------------------------------------------------------------------------
def fmnist_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 10))
    return tta.wrap_model(net, mean=[0.5], std=[0.5], class_names=[str(i) for i in range(10)], input_size=(1, 28, 28))


def test_fisher_data_clean_is_the_benchmarks_clean_split():
    data = DataConfig(kind="fashion-mnist", corruptions=["gaussian_noise"], per_class=2)
    adapter = tta.create_adapter("eata", fmnist_net(), fisher_data="clean", fisher_size=24)
    prepare_adapter(adapter, data, batch_size=8, seed=0, device="cpu")
    assert adapter.variant == "eata" and set(adapter.fisher) == set(adapter.adapted_names)
    # the same as computing it by hand on 24 seeded clean images in batches of the benchmark's batch size
    images = clean_images("clean", data, BuildContext((1, 28, 28), [str(i) for i in range(10)]))
    assert len(images) > 24  # the whole clean split, not the per-class subsample the test stream uses
    by_hand = tta.create_adapter("eata", fmnist_net(), fisher_data="clean", fisher_size=24)
    by_hand.compute_fisher(list(fisher_batches(images, 24, 8, seed=0)))
    for name, (f, _) in adapter.fisher.items():
        torch.testing.assert_close(f, by_hand.fisher[name][0])
    assert sum(x.shape[0] for x in fisher_batches(images, 24, 8, seed=0)) == 24


def test_fisher_data_from_a_folder_and_refusals(tmp_path):
    import numpy as np
    from PIL import Image
    for c in range(2):
        (tmp_path / str(c)).mkdir()
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 * i + c, dtype=np.uint8)).save(tmp_path / str(c) / f"{i}.png")
    adapter = tta.create_adapter("eata", fmnist_net(), fisher_data=str(tmp_path))
    prepare_adapter(adapter, DataConfig(kind="fashion-mnist"), batch_size=4, seed=0, device="cpu")
    assert adapter.variant == "eata"
    with pytest.raises(ValueError, match="has none; give fisher_data a folder"):
        prepare_adapter(tta.create_adapter("eata", fmnist_net(), fisher_data="clean"),
                        DataConfig(kind="imagenet-c", root=str(tmp_path)), batch_size=4, seed=0, device="cpu")
    with pytest.raises(ValueError, match="is not a folder"):
        prepare_adapter(tta.create_adapter("eata", fmnist_net(), fisher_data=str(tmp_path / "missing")),
                        DataConfig(kind="fashion-mnist"), batch_size=4, seed=0, device="cpu")
    eta = prepare_adapter(tta.create_adapter("eata", fmnist_net()), DataConfig(kind="fashion-mnist"), 4, 0, "cpu")
    assert eta.variant == "eta"


def test_bench_runs_eata_with_its_fisher(tmp_path, monkeypatch):
    from tta.bench.results import read_rows
    from tta.bench.runner import run_benchmark
    from tta.bench.spec import parse_spec
    computed = []
    original = ADAPTERS.get("eata").compute_fisher
    monkeypatch.setattr(ADAPTERS.get("eata"), "compute_fisher",
                        lambda self, b: computed.append(1) or original(self, b))
    values = {"name": "t", "model": {"name": "zoo:fmnist-cnn"}, "batch_size": 16,
              "data": {"kind": "fashion-mnist", "corruptions": ["gaussian_noise"], "per_class": 2},
              "methods": [{"name": "eata", "config": {"fisher_data": "clean", "fisher_size": 32}},
                          {"name": "eata", "label": "eta"}]}
    run_benchmark(parse_spec(values), tmp_path / "r.jsonl", progress=False, device="cpu")
    rows = {r["method"]: r for r in read_rows(tmp_path / "r.jsonl")}
    assert computed == [1]  # for the eata run only
    assert rows["eata"]["config"]["fisher_data"] == "clean" and rows["eta"]["config"]["fisher_data"] is None
    assert rows["eata"]["config_id"] != rows["eta"]["config_id"]


# ---- CoTTA: qinenergy/cotta cifar/cotta.py, imagenet/cotta.py, my_transforms.py ----------------------------------
# my_transforms.py ColorJitterPro, cotta.py get_tta_transforms, softmax_entropy, configure_model and
# collect_params: official_code.py
class OfficialCoTTA:
    """cotta.CoTTA; `imagenet` picks imagenet/cotta.py (symmetric loss, views only when the anchor is unsure, fixed
    restore 0.001 and teacher momentum 0.999) over cifar/cotta.py (cross-entropy, 32 views computed always)."""

    def __init__(self, model, optimizer, imagenet, n_views, ap, rst, mt=0.999):
        self.model, self.optimizer, self.imagenet, self.N, self.ap, self.rst, self.mt = \
            model, optimizer, imagenet, n_views, ap, rst, mt
        self.model_state = copy.deepcopy(model.state_dict())
        self.model_anchor = copy.deepcopy(model)
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())
        self.model_ema = copy.deepcopy(model)
        for param in self.model_ema.parameters():
            param.detach_()
        self.transform = cotta_get_tta_transforms(12)

    @torch.enable_grad()
    def __call__(self, x):
        outputs = self.model(x)
        anchor_prob = torch.nn.functional.softmax(self.model_anchor(x), dim=1).max(1)[0]
        standard_ema = self.model_ema(x)
        outputs_emas = []
        to_aug = anchor_prob.mean(0) < self.ap
        if to_aug or not self.imagenet:
            for i in range(self.N):
                outputs_emas.append(self.model_ema(self.transform(x)).detach())
        outputs_ema = torch.stack(outputs_emas).mean(0) if to_aug else standard_ema
        loss = cotta_softmax_entropy(outputs, outputs_ema.detach() if self.imagenet else outputs_ema,
                                     self.imagenet).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        for ema_param, param in zip(self.model_ema.parameters(), self.model.parameters()):
            ema_param.data[:] = self.mt * ema_param[:].data[:] + (1 - self.mt) * param[:].data[:]
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters():
                if npp in ["weight", "bias"] and p.requires_grad:
                    mask = (torch.rand(p.shape) < self.rst).float()
                    with torch.no_grad():
                        p.data = self.model_state[f"{nm}.{npp}"] * mask + p * (1. - mask)
        return outputs_ema


class WithToken(nn.Module):
    """bn_net plus a parameter that is neither a weight nor a bias (as a ViT class token)."""

    def __init__(self):
        super().__init__()
        self.body = bn_net().net
        self.offset = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x):
        return self.body(x + self.offset)


@pytest.mark.parametrize("preset, anchor_unsure", [("official-imagenet", True), ("official-imagenet", False),
                                                   ("official-cifar10", True)])
def test_cotta_official_presets_match_the_authors_code(preset, anchor_unsure):
    imagenet = preset == "official-imagenet"
    ap = 1.0 if anchor_unsure else 0.1     # 5 classes: the anchor's mean top probability is never below 0.1
    rst = 0.2                                # instead of 0.001 / 0.01, so that restores happen in 4 batches
    stream = batches(4, seed=2)

    def net():
        torch.manual_seed(0)
        return tta.wrap_model(WithToken(), class_names=[f"c{i}" for i in range(5)], input_size=(3, 12, 12))
    model, ref_model = net(), cotta_configure_model(net())
    adapter = tta.create_adapter("cotta", model, preset=preset, n_augmentations=3, confidence_threshold=ap,
                                 restore_prob=rst)
    assert "net.offset" not in adapter.adapted_names and "net.body.1.weight" in adapter.adapted_names
    params, _ = cotta_collect_params(ref_model)
    if imagenet:
        assert (adapter.cfg.optimizer, adapter.cfg.lr, adapter.cfg.nesterov, adapter.cfg.loss) == ("sgd", 0.01, True,
                                                                                                    "sce")
        ref_opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, dampening=0, weight_decay=0.0, nesterov=True)
    else:
        assert (adapter.cfg.optimizer, adapter.cfg.lr, adapter.cfg.loss) == ("adam", 1e-3, "ce")
        ref_opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    ref = OfficialCoTTA(ref_model, ref_opt, imagenet, 3, ap, rst)
    for i, x in enumerate(stream):
        torch.manual_seed(100 + i)
        expected = ref(x)
        torch.manual_seed(100 + i)
        torch.testing.assert_close(adapter(x), expected, **TOL)
    assert_same_params(model, ref_model)
    assert_same_params(adapter.teacher, ref.model_ema)
    assert torch.equal(model.net.offset, torch.zeros(1, 3, 1, 1))  # neither a weight nor a bias: fixed


def test_cotta_presets_and_default():
    cfg = ADAPTERS.get("cotta").Config
    default = cfg()
    assert (default.preset, default.loss, default.adapt, default.augment, default.optimizer) == \
        ("tta", "ce", "all", "tta", "adam")
    imagenet = cfg(preset="official-imagenet")
    assert (imagenet.restore_prob, imagenet.confidence_threshold, imagenet.momentum) == (0.001, 0.1, 0.9)
    with pytest.raises(ValueError, match="Valid choices"):
        cfg(loss="symmetric")
    views = tta.augment.cotta_augment_official(batches(1)[0])
    assert views.shape == (8, 3, 12, 12) and 0 <= float(views.min()) and float(views.max()) <= 1


# ---- SAR: mr-eggplant/SAR sar.py, sam.py ------------------------------------------------------------------------
class SAM(torch.optim.Optimizer):
    """sam.py (from davda54/sam), the parts SAR uses."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super(SAM, self).__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self):
        return torch.norm(torch.stack([((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
                                       for group in self.param_groups for p in group["params"]
                                       if p.grad is not None]), p=2)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups


def sar_configure_model(model):
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.requires_grad_(True)
    return model


# sar.py collect_params: official_code.sar_collect_params
@torch.enable_grad()
def forward_and_adapt_sar(x, model, optimizer, margin, reset_constant, ema):
    optimizer.zero_grad()
    outputs = model(x)
    entropys = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
    filter_ids_1 = torch.where(entropys < margin)
    entropys = entropys[filter_ids_1]
    loss = entropys.mean(0)
    loss.backward()
    optimizer.first_step(zero_grad=True)
    entropys2 = -(lambda o: (o.softmax(1) * o.log_softmax(1)).sum(1))(model(x))
    entropys2 = entropys2[filter_ids_1]
    filter_ids_2 = torch.where(entropys2 < margin)
    loss_second = entropys2[filter_ids_2].mean(0)
    if not math.isnan(loss_second.item()):
        ema = loss_second.item() if ema is None else 0.9 * ema + (1 - 0.9) * loss_second.item()
    loss_second.backward()
    optimizer.second_step(zero_grad=True)
    reset_flag = False
    if ema is not None:
        if ema < 0.2:
            reset_flag = True
    return outputs, ema, reset_flag


class OfficialSAR:
    """sar.SAR: after reset() (model and SAM state; the base SGD's momentum stays) forward() sets ema back."""

    def __init__(self, model, lr, margin_e0):
        self.model = sar_configure_model(model)
        params, self.names = sar_collect_params(self.model)
        self.optimizer = SAM(params, torch.optim.SGD, lr=lr, momentum=0.9)
        self.margin_e0, self.ema, self.resets = margin_e0, None, 0
        self.model_state = copy.deepcopy(self.model.state_dict())
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    def __call__(self, x):
        outputs, ema, reset_flag = forward_and_adapt_sar(x, self.model, self.optimizer, self.margin_e0, 0.2, self.ema)
        if reset_flag:
            self.reset()
            self.resets += 1
        self.ema = ema
        return outputs

    def reset(self):
        self.model.load_state_dict(self.model_state, strict=True)
        self.optimizer.load_state_dict(self.optimizer_state)
        self.ema = None


class SarNet(nn.Module):
    """Module names that tell the official rules from the default patterns: stage.norm and head.norm adapt in the
    authors' code (neither contains "norm." nor is named norm), layer4 and the top-level norm do not."""

    def __init__(self, sharpness):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.stage = nn.Module()
        self.stage.conv, self.stage.norm = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.layer4 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.norm = nn.LayerNorm(6)
        self.head = nn.Module()
        self.head.norm, self.head.fc = nn.LayerNorm(6), nn.Linear(6, 5)
        nn.init.zeros_(self.head.fc.bias)  # identical images then give uniform predictions: no reliable sample
        self.sharpness = sharpness

    def forward(self, x):
        x = self.layer4(torch.relu(self.stage.norm(self.stage.conv(self.layer1(x)))))
        x = self.norm(x.mean((2, 3)))
        return self.sharpness * self.head.fc(self.head.norm(x))


def sar_net(sharpness=8.0):
    torch.manual_seed(0)
    return tta.wrap_model(SarNet(sharpness), class_names=[f"c{i}" for i in range(5)], input_size=(3, 12, 12))


def test_sar_parameter_rules():
    official = tta.create_adapter("sar", sar_net(), preset="official")
    _, names = sar_collect_params(sar_configure_model(sar_net().net))
    assert official.adapted_names == [f"net.{n}" for n in names]
    assert {n.rsplit(".", 1)[0] for n in names} == {"layer1.1", "stage.norm", "head.norm"}
    default = tta.create_adapter("sar", sar_net())  # *.norm and head* match the network's names, in the wrapper too
    assert {n.rsplit(".", 1)[0] for n in default.adapted_names} == {"net.layer1.1"}


@pytest.mark.parametrize("preset", ["official", "zoo-cifar10"])
def test_sar_official_preset_matches_the_authors_code(preset):
    """Reliable batches, then batches without a reliable sample (identical images: the official code still steps,
    on momentum alone), then reliable ones again."""
    stream = batches(3, seed=3)
    stream[1] = stream[1][:1].expand(8, -1, -1, -1).clone()
    stream.append(stream[1].clone())
    stream += batches(2, seed=4)
    lr = 0.05 if preset == "official" else 1e-3
    model, ref_model = sar_net(), sar_net()
    adapter = tta.create_adapter("sar", model, preset=preset, **({"lr": lr} if preset == "official" else {}))
    assert (adapter.cfg.lr, adapter.cfg.always_step) == (lr, True)
    ref = OfficialSAR(ref_model.net, lr, 0.4 * math.log(5))
    for i, x in enumerate(stream):
        before = [p.detach().clone() for _, p in adapter.adapted_params]
        torch.testing.assert_close(adapter(x), ref(model.normalize(x)), **TOL)
        assert_same_params(model.net, ref_model.net)
        if i == 2:  # no reliable sample, and yet the weights moved: momentum
            assert not all(torch.equal(a, p) for a, (_, p) in zip(before, adapter.adapted_params))
    assert adapter.recoveries == ref.resets == 0


def test_sar_official_recovery_keeps_momentum_and_the_low_ema():
    """Near-zero entropies: the loss EMA falls under 0.2 at once, and the official code recovers at every step."""
    stream = batches(4, seed=5)
    model, ref_model = sar_net(sharpness=200.0), sar_net(sharpness=200.0)
    adapter = tta.create_adapter("sar", model, preset="official", lr=0.05)
    ref = OfficialSAR(ref_model.net, 0.05, 0.4 * math.log(5))
    for x in stream:
        torch.testing.assert_close(adapter(x), ref(model.normalize(x)), **TOL)
        assert_same_params(model.net, ref_model.net)
        assert adapter.loss_ema == pytest.approx(ref.ema)
    assert adapter.recoveries == ref.resets == len(stream)
    assert adapter.optimizer.state  # momentum buffers survived the recoveries
    default = tta.create_adapter("sar", sar_net(sharpness=200.0), lr=0.05)
    default(stream[0])
    assert default.recoveries == 1 and default.loss_ema is None and not default.optimizer.state
    zoo = tta.create_adapter("sar", sar_net(sharpness=200.0), preset="zoo-cifar10", lr=0.05)
    zoo(stream[0])  # the zoo's reset(): weights back, the EMA cleared, SGD's momentum kept (its SAM, as the authors')
    assert zoo.recoveries == 1 and zoo.loss_ema is None and zoo.optimizer.state


# ---- MEMO: zhangmarvin/memo imagenet-exps and cifar-10-exps (utils/third_party.py, adapt_helpers.py) -------------
class PriorBN(nn.BatchNorm2d):
    """nn.BatchNorm2d with train_helpers._modified_bn_forward as its forward (the authors patch the class itself)."""
    prior = 1

    def forward(self, input):
        est_mean = torch.zeros(self.running_mean.shape, device=self.running_mean.device)
        est_var = torch.ones(self.running_var.shape, device=self.running_var.device)
        nn.functional.batch_norm(input, est_mean, est_var, None, None, True, 1.0, self.eps)
        running_mean = self.prior * self.running_mean + (1 - self.prior) * est_mean
        running_var = self.prior * self.running_var + (1 - self.prior) * est_var
        return nn.functional.batch_norm(input, running_mean, running_var, self.weight, self.bias, False, 0, self.eps)


def with_prior_bn(net):
    for name, m in list(net.named_children()):
        if isinstance(m, nn.BatchNorm2d):
            new = PriorBN(m.num_features, eps=m.eps)
            new.load_state_dict(m.state_dict())
            setattr(net, name, new)
        else:
            with_prior_bn(m)
    return net


def memo_augmentations(np_random, size):
    """third_party.py's augmentations list, with np.random given as np_random."""
    from PIL import Image, ImageOps

    def int_parameter(level, maxval):
        return int(level * maxval / 10)

    def float_parameter(level, maxval):
        return float(level) * maxval / 10.

    def rand_lvl(n):
        return np_random.uniform(low=0.1, high=n)

    def rotate(pil_img, level):
        degrees = int_parameter(rand_lvl(level), 30)
        if np_random.uniform() > 0.5:
            degrees = -degrees
        return pil_img.rotate(degrees, resample=Image.BILINEAR, fillcolor=128)

    def solarize(pil_img, level):
        level = int_parameter(rand_lvl(level), 256)
        return ImageOps.solarize(pil_img, 256 - level)

    def shear_x(pil_img, level):
        level = float_parameter(rand_lvl(level), 0.3)
        if np_random.uniform() > 0.5:
            level = -level
        return pil_img.transform((size, size), Image.AFFINE, (1, level, 0, 0, 1, 0), resample=Image.BILINEAR,
                                 fillcolor=128)

    def shear_y(pil_img, level):
        level = float_parameter(rand_lvl(level), 0.3)
        if np_random.uniform() > 0.5:
            level = -level
        return pil_img.transform((size, size), Image.AFFINE, (1, 0, 0, level, 1, 0), resample=Image.BILINEAR,
                                 fillcolor=128)

    def translate_x(pil_img, level):
        level = int_parameter(rand_lvl(level), size / 3)
        if np_random.random() > 0.5:
            level = -level
        return pil_img.transform((size, size), Image.AFFINE, (1, 0, level, 0, 1, 0), resample=Image.BILINEAR,
                                 fillcolor=128)

    def translate_y(pil_img, level):
        level = int_parameter(rand_lvl(level), size / 3)
        if np_random.random() > 0.5:
            level = -level
        return pil_img.transform((size, size), Image.AFFINE, (1, 0, 0, 0, 1, level), resample=Image.BILINEAR,
                                 fillcolor=128)

    def posterize(pil_img, level):
        level = int_parameter(rand_lvl(level), 4)
        return ImageOps.posterize(pil_img, 4 - level)

    return [ImageOps.autocontrast, ImageOps.equalize, lambda x: rotate(x, 1), lambda x: solarize(x, 1),
            lambda x: shear_x(x, 1), lambda x: shear_y(x, 1), lambda x: translate_x(x, 1),
            lambda x: translate_y(x, 1), lambda x: posterize(x, 1)]


def memo_aug(np_random, size, crop, mean, std):
    """_augmix_aug with its preaugment (RandomResizedCrop + flip for ImageNet, RandomCrop(pad 4) + flip for CIFAR)
    and preprocess (ToTensor + Normalize)."""
    import numpy as np
    from torchvision import transforms
    augmentations = memo_augmentations(np_random, size)
    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    preaugment = transforms.Compose([transforms.RandomResizedCrop(size) if crop == "resized" else
                                     transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()])

    def _augmix_aug(x_orig):
        x_orig = preaugment(x_orig)
        x_processed = preprocess(x_orig)
        w = np.float32(np_random.dirichlet([1.0, 1.0, 1.0]))
        m = np.float32(np_random.beta(1.0, 1.0))
        mix = torch.zeros_like(x_processed)
        for i in range(3):
            x_aug = x_orig.copy()
            for _ in range(np_random.randint(1, 4)):
                x_aug = np_random.choice(augmentations)(x_aug)
            mix += w[i] * preprocess(x_aug)
        return m * x_processed + (1 - m) * mix
    return _augmix_aug


def memo_marginal_entropy(outputs):
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - math.log(logits.shape[0])
    avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1), avg_logits


def random_pil(seed):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8)
    array[:6] //= 3  # some structure, so that autocontrast and equalize do something
    return Image.fromarray(array.numpy())


def numpy_rng_as_memo_draws_it():
    """tta.augment.memo_augment_official seeds its numpy RandomState from torch's generator, one draw per image."""
    import numpy as np
    return np.random.RandomState(int(torch.randint(0, 2 ** 31 - 1, ()).item()))


@pytest.mark.parametrize("crop", ["resized", "pad4"])
def test_memo_official_augmix_matches_the_authors(crop):
    import numpy as np
    import torchvision.transforms.functional as TF
    model = bn_net()
    pil = random_pil(3)
    torch.manual_seed(5)
    ours = tta.augment.memo_augment_official(TF.to_tensor(pil), 16, crop, rng=np.random.RandomState(9))
    torch.manual_seed(5)
    aug = memo_aug(np.random.RandomState(9), 12, crop, model.mean.flatten().tolist(), model.std.flatten().tolist())
    theirs = torch.stack([aug(pil) for _ in range(16)])
    torch.testing.assert_close(model.normalize(ours), theirs, **TOL)
    assert len({round(float(v.sum()), 3) for v in ours}) == 16  # 16 different views


@pytest.mark.parametrize("preset", ["official", "official-cifar10"])
def test_memo_official_presets_match_the_authors_code(preset):
    import torchvision.transforms.functional as TF
    imagenet = preset == "official"
    lr = 0.05  # instead of 2.5e-4 / 0.005, so that one step changes the predictions visibly
    model = bn_net(sharpness=2.0)
    adapter = tta.create_adapter("memo", model, preset=preset, lr=lr)
    n = 64 if imagenet else 32
    assert (adapter.cfg.n_augmentations, adapter.cfg.momentum, adapter.cfg.prior_strength) == \
        (n, 0.0, 16.0 if imagenet else -1.0)
    ref = bn_net(sharpness=2.0)
    net = with_prior_bn(copy.deepcopy(ref.net))
    ckpt = copy.deepcopy(net.state_dict())
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=0.0)
    mean, std = ref.mean.flatten().tolist(), ref.std.flatten().tolist()
    prior = 16 / 17 if imagenet else 1  # cifar-10-exps has no prior: plain BN in eval mode
    changed = 0
    for i in range(3):
        pil = random_pil(10 + i)
        image = TF.to_tensor(pil)
        torch.manual_seed(20 + i)
        ours = adapter(image[None])
        # adapt_single + test_single, after net.load_state_dict(ckpt['state_dict'])
        torch.manual_seed(20 + i)
        tr_transforms = memo_aug(numpy_rng_as_memo_draws_it(), 12, "resized" if imagenet else "pad4", mean, std)
        net.load_state_dict(ckpt)
        net.eval()
        PriorBN.prior = prior
        inputs = torch.stack([tr_transforms(pil) for _ in range(n)])
        optimizer.zero_grad()
        loss, _ = memo_marginal_entropy(net(inputs))
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            theirs = net(TF.normalize(TF.to_tensor(pil), mean, std)[None])
        PriorBN.prior = 1
        torch.testing.assert_close(ours, theirs, **TOL)
        with torch.no_grad():
            changed += int(not torch.allclose(ours, ref(image[None]), atol=1e-3))
    assert changed == 3
    assert_same_params(model, bn_net(sharpness=2.0))  # episodic: the source weights are back after every image


# ---- norm: DequanWang/tent norm.py ------------------------------------------------------------------------------
def test_norm_official_preset_sets_the_authors_epsilon():
    model = bn_net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3  # as timm's TensorFlow ports
    ref = copy.deepcopy(model)
    for m in ref.modules():  # norm.configure_model(model, eps=1e-5, momentum=0.1, ...)
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.eps = 1e-5
            m.momentum = 0.1
    x = batches(1)[0] * 0.05  # low-variance channels, where epsilon matters
    default = tta.create_adapter("norm", copy.deepcopy(model))
    official = tta.create_adapter("norm", model, preset="official")
    with torch.no_grad():
        expected = ref(x)
    torch.testing.assert_close(official(x), expected, **TOL)
    assert not torch.allclose(default(x), expected, **TOL)  # the default keeps the network's 1e-3


# ---- the benchmark files run the setups of the tables they cite ------------------------------------------------
@pytest.mark.parametrize("path, presets", [
    ("benchmarks/cifar10-c.yaml", {"norm": "official", "tent": "official-cifar10", "eata": "zoo-cifar10",
                                   "sar": "zoo-cifar10", "cotta": "official-cifar10"}),
    ("benchmarks/imagenet-c.yaml", {"norm": "official", "tent": "official-imagenet",
                                    "tent-continual": "official-imagenet", "eata": "official", "sar": "official",
                                    "cotta": "official-imagenet", "memo-episodic": "official"})])
def test_benchmark_files_pick_the_published_presets(path, presets):
    from pathlib import Path
    from tta.bench.spec import load_spec
    spec = load_spec(Path(__file__).resolve().parents[1] / path)
    configs = {m.label: m.resolved_config() for m in spec.methods}
    assert {label: configs[label].preset for label in presets} == presets
    assert configs["eata"].fisher_data is not None  # EATA, not ETA
    if "tent-continual" in configs:  # EATA's README ran TENT with plain momentum (reset per corruption), CoTTA's
        settings = {m.label: m.settings for m in spec.methods}     # Table 6 and the zoo with Nesterov (continual)
        assert (configs["tent"].nesterov, settings["tent"]) == (False, ["reset_per_shift"])
        assert (configs["tent-continual"].nesterov, settings["tent-continual"]) == (True, ["continual"])


def test_sar_official_lr_rule():
    """main.py: args.lr from the batch size and the network (ResNet-50 with BN or GN, or ViT-Base)."""
    adapter = tta.create_adapter("sar", sar_net(), preset="official", lr_rule="official")
    adapter(batches(1, size=8)[0])
    assert adapter.ruled_lr == pytest.approx(0.00025 / 64 * 8 * 2)
    adapter.reset()
    assert adapter.optimizer.param_groups[0]["lr"] == pytest.approx(0.00025 / 64 * 8 * 2)  # kept by reset()
    big = tta.create_adapter("sar", sar_net(), preset="official", lr_rule="official")
    big(batches(1, size=32)[0])
    assert big.ruled_lr == 0.00025

    class LayerNormOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 6), nn.LayerNorm(6))
            self.head = nn.Linear(6, 5)

        def forward(self, x):
            return 8 * self.head(self.blocks(x))
    torch.manual_seed(0)
    vit = tta.wrap_model(LayerNormOnly(), class_names=[f"c{i}" for i in range(5)], input_size=(3, 12, 12))
    adapter = tta.create_adapter("sar", vit, preset="official", lr_rule="official")
    adapter(batches(1, size=8)[0])
    assert adapter.ruled_lr == pytest.approx(0.001 / 64 * 8)
    assert tta.create_adapter("sar", sar_net(), preset="official").cfg.lr_rule == "fixed"  # lr as given by default
