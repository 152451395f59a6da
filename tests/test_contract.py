"""The contract every adapter keeps, checked for every registered method."""
import copy

import pytest
import torch

import tta
from tta.params import norm_layers

from conftest import FAST, model_and_config, tiny_model

ENTROPY_BASED = {"tent", "eata", "sar", "cotta", "memo"}


def expected_trainable(name, model, cfg):
    """What each method's paper says adapts, derived here independently of the method code."""
    norm_affine = {f"{ln}.{pn}" for ln, layer in norm_layers(model) for pn, _ in layer.named_parameters()}
    if name in ("source", "norm", "diffusion_classifier"):
        return set()
    if name in ("tent", "eata"):
        return norm_affine
    if name == "sar":  # exclude names the network's own modules, inside the wrapper
        return {f"net.{ln}.{pn}" for ln, layer in norm_layers(model.net, cfg.exclude)
                for pn, _ in layer.named_parameters()}
    if name in ("cotta", "memo"):
        return {n for n, _ in model.named_parameters()}
    pytest.skip(f"{name} declares its trainable set in its own tests")


def make(name, **kw):
    model = tiny_model(sharpness=20.0)
    return model, tta.create_adapter(name, model, **{**FAST.get(name, {}), **kw})


BASELINES = [n for n in tta.list_adapters() if n in {"source", "norm", "tent", "eata", "sar", "cotta", "memo"}]


@pytest.mark.parametrize("name", BASELINES)
def test_output_shape_and_finite(name, images):
    _, adapter = make(name)
    out = adapter(images)
    assert out.shape == (8, 5)
    assert torch.isfinite(out).all()
    assert not out.requires_grad


@pytest.mark.parametrize("name", BASELINES)
def test_trainable_set_is_what_the_method_claims(name, images):
    model, adapter = make(name, lr=0.05, episodic=False)
    expected = expected_trainable(name, model, adapter.cfg)
    assert set(adapter.adapted_names) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter(images)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed <= expected, f"{name} changed parameters it does not adapt: {changed - expected}"
    if expected:
        assert changed, f"{name} adapted nothing on a batch it should learn from"


@pytest.mark.parametrize("name", BASELINES)
def test_reset_is_bit_exact(name, images):
    model, adapter = make(name, lr=0.05, steps=2, episodic=False)
    source = copy.deepcopy(model.state_dict())
    for _ in range(3):
        adapter(images)
    adapter.reset()
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), f"{name}: {k} differs after reset()"
    if adapter.optimizer is not None:
        assert not adapter.optimizer.state, "optimizer state (momentum, Adam moments) must be cleared"
    # after reset the adapter behaves exactly as a fresh one
    fresh_model = tiny_model(sharpness=20.0)
    fresh = tta.create_adapter(name, fresh_model, **{**FAST.get(name, {}), "lr": 0.05, "steps": 2, "episodic": False})
    torch.manual_seed(5)
    a = adapter(images)
    torch.manual_seed(5)
    b = fresh(images)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_episodic_mode_leaves_the_model_unchanged(name, images):
    model, adapter = make(name, lr=0.05, episodic=True)
    source = copy.deepcopy(model.state_dict())
    first = adapter(images)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), f"{name}: {k} leaked out of an episode"
    torch.manual_seed(0)
    again = adapter(images)
    if name not in ("memo", "cotta"):  # random augmentations make those two differ run to run
        assert torch.allclose(first, again, atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_adapts_under_no_grad(name, images):
    _, adapter = make(name)
    with torch.no_grad():
        out = adapter(images)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in BASELINES if n != "memo"])
def test_dense_logits(name, images):
    model = tiny_model(dense=True, sharpness=20.0)
    adapter = tta.create_adapter(name, model, **FAST.get(name, {}))
    out = adapter(images)
    assert out.shape == (8, 5, 16, 16) and torch.isfinite(out).all()


def test_memo_dense_logits(images):
    adapter = tta.create_adapter("memo", tiny_model(dense=True), n_augmentations=2)
    assert adapter(images[:2]).shape == (2, 5, 16, 16)


@pytest.mark.parametrize("name", sorted(ENTROPY_BASED))
def test_entropy_methods_refuse_regression_outputs(name, images):
    model = tiny_model(num_classes=1, dense=True, task="depth")
    adapter = tta.create_adapter(name, model, **FAST.get(name, {}))
    with pytest.raises(ValueError, match="class scores"):
        adapter(images[:2])


@pytest.mark.parametrize("name", ["source", "norm"])
def test_statistics_methods_take_regression_outputs(name, images):
    adapter = tta.create_adapter(name, tiny_model(num_classes=1, dense=True, task="depth"))
    assert adapter(images).shape == (8, 1, 16, 16)


def test_norm_uses_test_batch_statistics(images):
    model = tiny_model()
    with torch.no_grad():
        bn = model.net.features[1]
        bn.running_mean.fill_(5.0)  # a stale training statistic that the source model uses
        source_out = model.eval()(images)
        out = tta.create_adapter("norm", model)(images)
    assert not torch.allclose(source_out, out)
    assert torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 5.0)), "norm must not overwrite stats"


def test_eata_fisher_regulariser_pulls_towards_the_source(images):
    model = tiny_model(sharpness=20.0)
    eata = tta.create_adapter("eata", model, lr=0.05)
    eata.compute_fisher([images[:4], images[4:]])
    assert set(eata.fisher) == set(eata.adapted_names)
    assert float(eata.fisher_penalty().detach()) == 0.0
    with torch.no_grad():
        for _, p in eata.adapted:
            p.add_(0.1)
    assert float(eata.fisher_penalty().detach()) > 0.0


def test_sar_recovers_the_source_model_on_collapse(images):
    model = tiny_model(sharpness=200.0)  # near-zero entropy: the loss EMA falls under the reset constant
    source = copy.deepcopy(model.state_dict())
    sar = tta.create_adapter("sar", model, lr=0.05)
    sar(images)
    assert sar.recoveries >= 1
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", tta.list_adapters())
def test_every_adapter_resets_exactly_and_isolates_episodes(name):
    """For every registered method, on a model it accepts: the trainable set is the adapted set, only it
    changes, reset() is bit-exact, and an episodic call leaves every weight as it was."""
    model, config, batch = model_and_config(name, episodic=False)
    source = copy.deepcopy(model.state_dict())
    adapter = tta.create_adapter(name, model, **config)
    adapted = set(adapter.adapted_names)
    # Diffusion-TTA's default (the official DiT setting) also adapts its judge, named "backend.<name>".
    judge = getattr(adapter, "backend", None)
    judge_adapted = {f"backend.{n}" for n, p in judge.named_parameters() if p.requires_grad} if judge else set()
    assert judge_adapted <= adapted
    adapted -= judge_adapted
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapted
    out = adapter(batch)
    assert torch.isfinite(out).all()
    changed = {n for n, p in model.named_parameters() if not torch.equal(source[n], p)}
    assert changed <= adapted
    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items()), f"{name}: reset() is not exact"
    episodic = tta.create_adapter(name, model, **{**config, "episodic": True})
    episodic(batch)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items()), f"{name}: an episode leaked"
