"""The divergence guard: non-finite losses skip the update, diverged or collapsed states restore the source."""
import pytest
import torch

import tta

from conftest import FAST, tiny_model


@pytest.mark.parametrize("name", ["tent", "eata", "sar", "cotta", "memo"])
def test_pathological_learning_rate_never_does_worse_than_the_unadapted_model(name):
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16)
    # What the guard falls back to: the source weights, normalised as the method normalises (batch statistics
    # for all but memo). Its predictions are the labels, so any damage done by adaptation shows.
    reference = tta.create_adapter("source" if name == "memo" else "norm", tiny_model(sharpness=20.0))
    labels = reference(x).argmax(1)
    adapter = tta.create_adapter(name, tiny_model(sharpness=20.0), lr=1e12, steps=3, **FAST.get(name, {}))
    accuracies = [(adapter(x).argmax(1) == labels).float().mean().item() for _ in range(3)]
    assert min(accuracies) == 1.0, f"{name} fell below the unadapted model: {accuracies}"
    assert sum(adapter.guard_events.values()) > 0, "the guard never intervened at lr 1e12"
    assert all(torch.isfinite(p).all() for _, p in adapter.adapted)


def test_without_the_guard_the_same_run_breaks():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16)
    labels = tta.create_adapter("norm", tiny_model(sharpness=20.0))(x).argmax(1)
    adapter = tta.create_adapter("tent", tiny_model(sharpness=20.0), lr=1e12, steps=3, guard=False)
    accuracies = [(adapter(x).argmax(1) == labels).float().mean().item() for _ in range(3)]
    assert min(accuracies) < 1.0 and adapter.guard_events == {}


def test_nonfinite_loss_skips_the_update():
    model = tiny_model()
    adapter = tta.create_adapter("tent", model)
    before = [p.detach().clone() for _, p in adapter.adapted]
    assert adapter.optimize(torch.tensor(float("nan"), requires_grad=True)) is False
    assert adapter.guard_events == {"nonfinite_loss": 1}
    assert all(torch.equal(a, p) for a, (_, p) in zip(before, adapter.adapted))


@pytest.mark.parametrize("name", ["it3", "slow_inference", "ttt_mae", "diffusion_tta"])
def test_nonfinite_gradients_skip_the_update_in_methods_with_their_own_loop(name):
    """Methods that run their own step loop go through the guard too: a NaN gradient never reaches the weights."""
    from conftest import model_and_config
    model, config, batch = model_and_config(name, episodic=False, steps=1)
    adapter = tta.create_adapter(name, model, **config)
    before = {n: p.detach().clone() for n, p in adapter.adapted}
    for _, p in adapter.adapted:
        p.register_hook(lambda g: torch.full_like(g, float("nan")))
    adapter(batch[:1])
    assert adapter.guard_events.get("nonfinite_grad", 0) >= 1
    assert all(torch.equal(before[n], p) for n, p in adapter.adapted)


@pytest.mark.parametrize("name", ["it3", "slow_inference", "ttt_mae", "diffusion_tta"])
def test_methods_that_predict_after_their_loop_fall_back_to_the_source_when_they_diverge(name):
    """A pathological learning rate blows the weights up; the prediction made after the loop is then the source
    model's (diffusion_tta and slow_inference once predicted from the blown-up weights)."""
    import copy
    from conftest import model_and_config
    model, config, batch = model_and_config(name, episodic=False, steps=2)
    reference = tta.create_adapter(name, copy.deepcopy(model), **{**config, "steps": 0})(batch[:1])
    adapter = tta.create_adapter(name, model, **{**config, "lr": 1e12, "optimizer": "sgd"})
    out = adapter(batch[:1])
    assert sum(adapter.guard_events.values()) > 0, "the guard never intervened at lr 1e12"
    assert torch.allclose(out, reference, atol=1e-5)


def test_finite_and_largest_sees_every_kind_of_non_finite_value():
    from tta.adapter import finite_and_largest
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([[1.0, -5.0, 2.0], [1.0, nan, 2.0], [inf, 0.0, 0.0], [0.0, -inf, 0.0], [nan, inf, -inf]])
    finite, largest = finite_and_largest(rows, per_slice=True)
    assert finite.tolist() == [True, False, False, False, False]
    assert float(largest[0]) == 5.0
    for row in rows:
        assert bool(finite_and_largest(row)[0]) == bool(torch.isfinite(row).all())
    assert bool(finite_and_largest(torch.empty(0))[0])
