"""The contract every adapter keeps, checked for every registered method (test_isolation checks reset() and episodes).

Methods are picked by kind (fixtures.KINDS), never by a list of names, so a new method joins every check of its kind.
"""
import copy

import pytest
import torch

import tta
from tta.params import norm_layers

from fixtures import FAST, KINDS, make_adapter, methods, tiny_model


def expected_trainable(name, model, cfg):
    """What each method's paper says adapts, derived here independently of the method code."""
    norm_affine = {f"{ln}.{pn}" for ln, layer in norm_layers(model) for pn, _ in layer.named_parameters()}
    if name in methods("statistics") + ["diffusion_classifier"]:
        return set()
    if name in ("tent", "eata"):
        return norm_affine
    if name == "sar":  # exclude names the network's own modules, inside the wrapper
        return {f"net.{ln}.{pn}" for ln, layer in norm_layers(model.net, cfg.exclude)
                for pn, _ in layer.named_parameters()}
    if name in ("cotta", "memo"):
        return {n for n, _ in model.named_parameters()}
    pytest.skip(f"{name} declares its trainable set in its own tests")


BASELINES = methods("baseline")


def test_every_registered_method_says_what_kind_it_is():
    assert set(KINDS) == set(tta.list_adapters()), "list a new method's kinds in tests/fixtures.py KINDS"


@pytest.mark.parametrize("name", BASELINES)
def test_output_shape_and_finite(name, images):
    _, adapter = make_adapter(name)
    out = adapter(images)
    assert out.shape == (8, 5)
    assert torch.isfinite(out).all()
    assert not out.requires_grad


@pytest.mark.parametrize("name", BASELINES)
def test_trainable_set_is_what_the_method_claims(name, images):
    model, adapter = make_adapter(name, lr=0.05, episodic=False)
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
def test_adapts_under_no_grad(name, images):
    _, adapter = make_adapter(name)
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


@pytest.mark.parametrize("name", methods("entropy"))
def test_entropy_methods_refuse_regression_outputs(name, images):
    model = tiny_model(num_classes=1, dense=True, task="depth")
    adapter = tta.create_adapter(name, model, **FAST.get(name, {}))
    with pytest.raises(ValueError, match="class scores"):
        adapter(images[:2])


@pytest.mark.parametrize("name", methods("statistics"))
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
        for _, p in eata.adapted_params:
            p.add_(0.1)
    assert float(eata.fisher_penalty().detach()) > 0.0


def test_sar_recovers_the_source_model_on_collapse(images):
    model = tiny_model(sharpness=200.0)  # near-zero entropy: the loss EMA falls under the reset constant
    source = copy.deepcopy(model.state_dict())
    sar = tta.create_adapter("sar", model, lr=0.05)
    sar(images)
    assert sar.recoveries >= 1
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
