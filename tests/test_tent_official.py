"""tent's `official-cifar10` and `official-imagenet` presets against a transcription of the authors' code
(DequanWang/tent at e9e926a668d85244c66a6d5c006efbd2b82e83e8: tent.py's configure_model, collect_params and
forward_and_adapt, in tests/official_code.py, and its Tent here; cifar10c.py's setup_optimizer over conf.py and
cfgs/tent.yaml), on the tiny BN + GN + LN network of tests/fixtures.py, to 1e-5. The authors adapt BatchNorm2d alone,
so the GroupNorm and LayerNorm stay fixed."""
import copy

import pytest
import torch
import torch.nn as nn

import tta

from fixtures import tiny_model
from official_code import tent_collect_params, tent_configure_model, tent_forward_and_adapt

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
TOL = {"atol": 1e-5, "rtol": 1e-5}

# conf.py's OPTIM defaults, with cfgs/tent.yaml's OPTIM over them (CIFAR-10-C). The repository has no ImageNet config:
# there the paper's lr 0.00025 (batch 64) with METHOD SGD, the rest conf.py's.
CONF_OPTIM = {"STEPS": 1, "LR": 1e-3, "METHOD": "Adam", "BETA": 0.9, "MOMENTUM": 0.9, "DAMPENING": 0.0,
              "NESTEROV": True, "WD": 0.0}
OFFICIAL = {"official-cifar10": {**CONF_OPTIM, "METHOD": "Adam", "STEPS": 1, "BETA": 0.9, "LR": 1e-3, "WD": 0.0},
            "official-imagenet": {**CONF_OPTIM, "METHOD": "SGD", "LR": 0.00025}}


# ---- tent.py, line by line (configure_model, collect_params, forward_and_adapt: official_code.py) ---------------
class OfficialTent(nn.Module):
    def __init__(self, model, optimizer, steps=1, episodic=False):
        super().__init__()
        self.model, self.optimizer, self.steps, self.episodic = model, optimizer, steps, episodic

    def forward(self, x):
        for _ in range(self.steps):
            outputs = tent_forward_and_adapt(x, self.model, self.optimizer)
        return outputs


# ---- cifar10c.py --------------------------------------------------------------------------------------------------
def setup_optimizer(params, optim):
    if optim["METHOD"] == "Adam":
        return torch.optim.Adam(params, lr=optim["LR"], betas=(optim["BETA"], 0.999), weight_decay=optim["WD"])
    elif optim["METHOD"] == "SGD":
        return torch.optim.SGD(params, lr=optim["LR"], momentum=optim["MOMENTUM"], dampening=optim["DAMPENING"],
                               weight_decay=optim["WD"], nesterov=optim["NESTEROV"])
    raise NotImplementedError


def setup_tent(model, optim, episodic=False):
    model = tent_configure_model(model)
    params, param_names = tent_collect_params(model)
    optimizer = setup_optimizer(params, optim)
    return OfficialTent(model, optimizer, steps=optim["STEPS"], episodic=episodic), param_names


def stream(n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(6, 3, 1, 1, generator=g) + 0.4 * torch.rand(6, 3, 16, 16, generator=g)).clamp(0, 1)
            for _ in range(n)]


def test_official_presets_hold_the_authors_settings():
    for preset, optim in OFFICIAL.items():
        cfg = tta.create_adapter("tent", tiny_model(), preset=preset).cfg
        assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.steps, cfg.episodic, cfg.norms) == \
            (optim["METHOD"].lower(), optim["LR"], optim["WD"], optim["STEPS"], False, "batch")
        if cfg.optimizer == "adam":
            assert cfg.betas == (optim["BETA"], 0.999)
        else:
            assert (cfg.momentum, cfg.nesterov) == (optim["MOMENTUM"], optim["NESTEROV"])  # dampening 0: torch's


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
@pytest.mark.parametrize("lr, steps", [(None, 1), (0.05, 1), (0.05, 3)])
def test_official_presets_match_the_authors_code(preset, lr, steps):
    """Three batches under the preset as it is, and with a larger lr (and 3 steps per batch), so that the weights
    move far beyond the tolerance and Nesterov's look-ahead shows."""
    optim = dict(OFFICIAL[preset], STEPS=steps, **({"LR": lr} if lr else {}))
    model, ref_model = tiny_model(sharpness=5.0), tiny_model(sharpness=5.0)
    adapter = tta.create_adapter("tent", model, preset=preset, steps=steps, **({"lr": lr} if lr else {}))
    ref, names = setup_tent(ref_model, optim)
    assert adapter.adapted_names == names == ["net.features.1.weight", "net.features.1.bias"]
    for x in stream():
        torch.testing.assert_close(adapter(x), ref(x), **TOL)
    ref_params, source = dict(ref_model.named_parameters()), dict(tiny_model(sharpness=5.0).named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], **TOL)
        if name not in names:
            assert torch.equal(p, source[name])  # GroupNorm and LayerNorm too: the authors adapt BatchNorm2d alone
    assert all((model.get_parameter(n) - source[n]).abs().max() > 1e-4 for n in names)  # moved beyond TOL


def test_the_comparison_sees_nesterov_and_the_layers_adapted():
    """The oracle can fail: plain momentum, or every norm layer adapted, give other predictions."""
    x = stream()
    for change in ({"nesterov": False}, {"norms": "all"}):
        model, ref_model = tiny_model(sharpness=5.0), tiny_model(sharpness=5.0)
        adapter = tta.create_adapter("tent", model, preset="official-imagenet", lr=0.05, **change)
        ref, _ = setup_tent(ref_model, dict(OFFICIAL["official-imagenet"], LR=0.05))
        outs = [(adapter(b), ref(b)) for b in x]
        assert not torch.allclose(*outs[-1], **TOL), change


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_official_presets_refuse_a_network_without_batch_norm(preset):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.LayerNorm(8), nn.Linear(8, 5))
    model = tta.wrap_model(net, class_names=[f"c{i}" for i in range(5)], input_size=(3, 16, 16))
    with pytest.raises(ValueError, match="set norms: all"):
        tta.create_adapter("tent", copy.deepcopy(model), preset=preset)
    assert tta.create_adapter("tent", model, preset=preset, norms="all").adapted_names == ["net.2.weight", "net.2.bias"]
