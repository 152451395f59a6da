"""IT3: the conditioned network, its training loss and the idempotence adapter."""
import copy

import pytest
import torch
from torch import nn

import tta
import tta.methods.it3  # noqa: F401  (registers "it3" until the package imports it)
from tta.methods.it3 import idempotence_loss, jensen_shannon
from tta.nets import IT3Net, it3_training_loss

from fixtures import tiny_model


def classifier(seed=0, num_classes=5):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    return IT3Net(net, num_outputs=num_classes, layer="2")


def depth_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 1, 1))
    return IT3Net(net, num_outputs=1, layer="2", task="regression", dense=True)


def make_idempotent(model):
    """Zero the embedding's last layer: y no longer reaches the network, so f(x, f(x, 0)) = f(x, 0) exactly."""
    with torch.no_grad():
        model.embed[-1].weight.zero_()
        model.embed[-1].bias.zero_()
    return model


def test_loss_is_zero_for_an_idempotent_model_and_positive_otherwise(images):
    for build in (classifier, depth_model):
        model = build()
        loss, _ = idempotence_loss(model, model, images)
        assert loss.shape == (8,) and (loss > 0).all()
        make_idempotent(model)
        loss, _ = idempotence_loss(model, model, images)
        assert torch.equal(loss, torch.zeros(8))
    model = make_idempotent(classifier())
    assert torch.equal(idempotence_loss(model, model, images, "js")[0], torch.zeros(8))


def test_jensen_shannon_matches_its_definition():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    p, q = a.softmax(1), b.softmax(1)
    m = (p + q) / 2
    expected = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
    assert torch.allclose(jensen_shannon(a, b), expected, atol=1e-6)
    assert torch.allclose(jensen_shannon(a, a), torch.zeros(4), atol=1e-7)


@pytest.mark.parametrize("build,distance,anchor,lr", [(classifier, "mse", "frozen", 1e-2),
                                                      (classifier, "js", "ema", 1e-2),
                                                      (depth_model, "mse", "frozen", 1e-3)])
def test_test_time_steps_reduce_the_idempotence_loss(images, build, distance, anchor, lr):
    model = build()
    if model.task == "regression":
        with torch.no_grad():  # a freshly initialised depth net barely listens to y; make it far from idempotent
            model.embed[-1].weight.mul_(30)
    adapter = tta.create_adapter("it3", model, steps=10, lr=lr, episodic=False, distance=distance, anchor=anchor)
    frozen = copy.deepcopy(model)
    before = idempotence_loss(model, frozen, images, distance)[0].mean()
    adapter(images)
    after = idempotence_loss(model, frozen, images, distance)[0].mean()
    assert after < 0.5 * before


def test_gradients_reach_the_model_and_never_the_anchor(images):
    model = classifier()
    adapter = tta.create_adapter("it3", model, episodic=False)
    anchor_before = copy.deepcopy(adapter.anchor.state_dict())
    model_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert set(adapter.adapted_names) == set(model_before), "IT3 adapts every parameter of f, embedding included"
    assert not any(p.requires_grad for p in adapter.anchor.parameters())
    loss, _ = idempotence_loss(adapter.model, adapter.anchor, images)
    loss.mean().backward()
    assert all(p.grad is None for p in adapter.anchor.parameters())
    # f(x, 0) embeds a zero vector, so the first embedding layer's weight has an exactly zero gradient;
    # everything else in f receives one.
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert torch.equal(grads.pop("embed.0.weight"), torch.zeros_like(model.embed[0].weight))
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad(set_to_none=True)
    adapter(images)
    assert all(torch.equal(v, anchor_before[k]) for k, v in adapter.anchor.state_dict().items()), \
        "the frozen anchor moved"
    assert all(not torch.equal(p, model_before[n]) for n, p in model.named_parameters() if n in grads)


def test_ema_anchor_follows_the_model(images):
    adapter = tta.create_adapter("it3", classifier(), episodic=False, anchor="ema", ema_momentum=0.5, lr=1e-2)
    before = copy.deepcopy(adapter.anchor.state_dict())
    adapter(images)
    assert any(not torch.equal(v, before[k]) for k, v in adapter.anchor.state_dict().items())


@pytest.mark.parametrize("anchor", ["frozen", "ema"])
def test_reset_is_bit_exact_and_episodic_mode_restores(images, anchor):
    model = classifier()
    source = copy.deepcopy(model.state_dict())
    adapter = tta.create_adapter("it3", model, steps=3, lr=1e-2, episodic=False, anchor=anchor)
    anchor_source = copy.deepcopy(adapter.anchor.state_dict())
    first = adapter(images)
    adapter(images)
    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, anchor_source[k]) for k, v in adapter.anchor.state_dict().items())
    assert not adapter.optimizer.state
    assert torch.equal(adapter(images), first)
    episodic = tta.create_adapter("it3", classifier(), steps=3, lr=1e-2)
    a = episodic(images)
    assert all(torch.equal(v, source[k]) for k, v in episodic.model.state_dict().items())
    assert torch.equal(a, episodic(images))


def test_prediction_is_read_after_adaptation(images):
    model = classifier()
    with torch.no_grad():
        source_out = model(images)
    adapter = tta.create_adapter("it3", model, steps=2, lr=1e-2, episodic=False)
    out = adapter(images)
    with torch.no_grad():
        assert torch.equal(out, model(images))
        second = tta.create_adapter("it3", model, steps=0, predict="second")(images)
        assert torch.allclose(second, model(images, model(images).softmax(1)))
    assert not torch.allclose(out, source_out)
    assert not out.requires_grad


def test_the_hook_exists_only_during_the_call(images):
    model = classifier()
    target = model.net[2]
    seen = []
    target.register_forward_pre_hook(lambda m, i: seen.append(len(m._forward_hooks)))
    model(images)
    assert seen == [1] and len(target._forward_hooks) == 0
    with pytest.raises(ValueError, match="shape"):
        model(images, torch.zeros(8, 3))  # wrong K
    bad = IT3Net(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)), num_outputs=2, layer="1",
                 feature_channels=7)
    with pytest.raises(ValueError, match="channels"):
        bad(images)
    assert len(bad.net[1]._forward_hooks) == 0, "a failing forward pass must not leave its hook behind"


def test_training_loss_feeds_ground_truth_with_probability_p(images):
    recorded = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 + 5, 5)

        def forward(self, x):
            recorded.append(x[:, 3:, 0, 0].detach().clone())
            return self.lin(x.mean((2, 3)))

    model = IT3Net(Recorder(), num_outputs=5, layer=None)  # y concatenated to the input channels
    labels = torch.arange(8) % 5
    loss = it3_training_loss(model, images, labels, p_ground_truth=1.0)
    assert torch.equal(recorded[0], nn.functional.one_hot(labels, 5).float())
    assert torch.allclose(recorded[1], model(images, recorded[0]).softmax(1).detach()), "second pass: softmax(y1)"
    recorded.clear()
    it3_training_loss(model, images, labels, p_ground_truth=0.0)
    assert torch.equal(recorded[0], torch.zeros(8, 5))
    loss.backward()
    assert model.net.lin.weight.grad is not None and torch.isfinite(loss)


def test_training_loss_for_dense_regression(images):
    model = depth_model()
    depth = torch.rand(8, 1, 16, 16)
    loss = it3_training_loss(model, images, depth, p_ground_truth=0.5, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.embed[0].weight.grad is not None


def test_refuses_an_unwrapped_model_and_regression_js(images):
    with pytest.raises(TypeError, match="IT3Net"):
        tta.create_adapter("it3", tiny_model())
    with pytest.raises(ValueError, match="mse"):
        tta.create_adapter("it3", depth_model(), distance="js")(images)
    with pytest.raises(ValueError, match="anchor"):
        tta.create_adapter("it3", classifier(), anchor="teacher")
    with pytest.raises(ValueError, match="named_modules"):
        IT3Net(nn.Linear(3, 2), num_outputs=2, layer="nope")


def test_wraps_an_image_model_and_adapts_under_no_grad(images):
    model = IT3Net(tiny_model(), num_outputs=5, layer="net.features.3")
    adapter = tta.create_adapter("it3", model)
    with torch.no_grad():
        out = adapter(images)
    assert out.shape == (8, 5) and torch.isfinite(out).all()
    assert adapter.model.net.net.features[1].training is False, "BN keeps its source statistics"


def test_an_it3_network_reports_the_input_size_and_classes_of_the_model_it_wraps():
    inner = tiny_model()
    model = IT3Net(inner, num_outputs=5, layer="net.features.3")
    assert model.input_size == (3, 16, 16) and model.class_names == inner.class_names
    model.input_size = (3, 24, 24)  # evaluating at another resolution changes the wrapped model's size
    assert inner.input_size == (3, 24, 24)
    bare = IT3Net(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), num_outputs=2, layer="1")
    assert bare.input_size is None and bare.class_names is None
    with pytest.raises(AttributeError, match="tta.wrap_model"):
        bare.input_size = (3, 2, 2)


def test_tta_run_adapts_the_zoo_it3_network(capsys):
    from tta.cli import main
    code = main(["run", "--model", "zoo:fmnist-it3", "--method", "it3", "--data", "foolbox:fashionMNIST",
                 "--corruption", "fog", "--severity", "3", "--batch-size", "10", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "20 images, fog-3" in out and "before (source)" in out and "after (it3)" in out
