"""The divergence guard: non-finite losses skip the update, diverged or collapsed states restore the source."""
import pytest
import torch

import tta

from fixtures import FAST, methods, model_and_config, tiny_model


@pytest.mark.parametrize("name", methods("entropy"))
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
    assert all(torch.isfinite(p).all() for _, p in adapter.adapted_params)


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
    before = [p.detach().clone() for _, p in adapter.adapted_params]
    assert adapter.optimize(torch.tensor(float("nan"), requires_grad=True)) is False
    assert adapter.guard_events == {"nonfinite_loss": 1}
    assert all(torch.equal(a, p) for a, (_, p) in zip(before, adapter.adapted_params))


@pytest.mark.parametrize("name", methods("own_loop"))
def test_nonfinite_gradients_skip_the_update_in_methods_with_their_own_loop(name):
    """Methods that run their own step loop go through the guard too: a NaN gradient never reaches the weights."""
    model, config, batch = model_and_config(name, episodic=False, steps=1)
    adapter = tta.create_adapter(name, model, **config)
    before = {n: p.detach().clone() for n, p in adapter.adapted_params}
    for _, p in adapter.adapted_params:
        p.register_hook(lambda g: torch.full_like(g, float("nan")))
    adapter(batch[:1])
    assert adapter.guard_events.get("nonfinite_grad", 0) >= 1
    assert all(torch.equal(before[n], p) for n, p in adapter.adapted_params)


@pytest.mark.parametrize("name", methods("own_loop"))
def test_methods_that_predict_after_their_loop_fall_back_to_the_source_when_they_diverge(name):
    """A pathological learning rate blows the weights up; the prediction made after the loop is then the source
    model's (diffusion_tta and slow_inference once predicted from the blown-up weights)."""
    import copy
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


# ---- a huge but finite learning rate ---------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, lr", [("adam", 1e38), ("sgd", 1e39)])
@pytest.mark.parametrize("name", methods("optimizing"))
def test_a_learning_rate_no_step_survives_is_refused_before_anything_runs(name, optimizer, lr):
    """Once: 'value cannot be converted to type float without overflow' half-way through the first step."""
    model, config, _ = model_and_config(name)
    with pytest.raises(ValueError, match=r"lr must be a number in \[0, 1e\+12\], got 1e\+3[89]"):
        tta.create_adapter(name, model, **{**config, "optimizer": optimizer, "lr": lr})


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_step_that_would_overflow_is_refused_and_changes_nothing(optimizer):
    """An lr raised past what the weights' dtype can hold after construction: the step is refused before the
    optimizer touches anything (tent's momentum buffers were once left changed), and the batch-norm counters the
    forward pass moved are put back."""
    x = torch.rand(16, 3, 16, 16)
    adapter = tta.create_adapter("tent", tiny_model(), optimizer=optimizer)
    adapter(x)  # the optimizer has state (momentum buffers, moments) now
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    moments = [v.clone() for s in adapter.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    adapter.optimizer.param_groups[0]["lr"] = 1e39 if optimizer == "sgd" else 1e38
    with pytest.raises(ValueError, match="beyond that type's largest value"):
        adapter(x)
    assert all(torch.equal(v, state[k]) for k, v in adapter.state_dict().items())
    after = [v for s in adapter.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(moments, after))
    assert all(p.grad is None or not p.grad.any() for _, p in adapter.adapted_params)


def test_float16_weights_refuse_a_learning_rate_their_step_cannot_hold():
    with pytest.raises(ValueError, match=r"float16 weights by lr = 100000.*float32"):
        tta.create_adapter("tent", tiny_model().half(), lr=1e5)
    tta.create_adapter("tent", tiny_model().half(), lr=1e3)


# ---- a collapse to one class -------------------------------------------------------------------------------------
def fashion_batches(n, size=20):
    from tta.data.fashion_mnist_subset import load_subset
    images, _ = load_subset()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return [images[order[i * size:(i + 1) * size]] for i in range(n)]


def one_class(outputs):
    return bool((outputs.argmax(1) == outputs.argmax(1)[0]).all())


def several_classes(outputs):
    return int(torch.bincount(outputs.argmax(1)).max()) <= outputs.shape[0] // 2


@pytest.mark.parametrize("name, config", [("eata", {"lr": 1e4}), ("sar", {"lr": 100.0}),
                                          ("tent", {"optimizer": "adam", "lr": 1.0})])
def test_a_collapse_to_one_class_restores_the_source(name, config):
    """Batches of 20 Fashion-MNIST images all predicted as one class, with a mean entropy above 1e-3, while the
    source model spreads them over several classes: once returned without a guard event."""
    torch.manual_seed(0)
    adapter = tta.create_adapter(name, tta.create_model("zoo:fmnist-cnn"), **config)
    source = tta.create_adapter("norm", tta.create_model("zoo:fmnist-cnn"))  # the source as these methods run it
    for i, x in enumerate(fashion_batches(6)):
        before = adapter.guard_events.get("collapsed", 0)
        out, reference = adapter(x), source(x)
        assert not (one_class(out) and several_classes(reference)), f"{name}: batch {i} collapsed unnoticed"
        if adapter.guard_events.get("collapsed", 0) > before:
            assert torch.equal(out.argmax(1), reference.argmax(1)), "a collapse must predict with the source"
    assert adapter.guard_events.get("collapsed", 0) >= 1


def test_the_collapse_rule():
    """One class for a whole batch of 16 or more is a collapse when the entropy is near zero, or when the source
    gives no class more than half of the batch; a batch of one class to the source too, or a smaller batch, is not.
    Judging it leaves the adapted state as it was."""
    adapter = tta.create_adapter("tent", tiny_model())
    one = torch.zeros(16, 5)
    one[:, 2] = 1.0  # one class, entropy well above 1e-3
    spread = torch.eye(5)[torch.arange(16) % 5]
    mostly_two = torch.eye(5)[torch.tensor([2] * 9 + [0] * 7)]
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    assert adapter.collapsed(one, lambda: spread)
    assert not adapter.collapsed(one, lambda: mostly_two)
    assert not adapter.collapsed(one[:15], lambda: spread[:15])
    assert not adapter.collapsed(one)  # no source to ask: the entropy rule only
    assert adapter.collapsed(one * 100)  # near-zero entropy
    assert not adapter.collapsed(spread, lambda: spread)
    assert all(torch.equal(v, state[k]) for k, v in adapter.state_dict().items())


def test_the_source_prediction_is_taken_with_the_source_weights_and_the_adapted_ones_come_back():
    adapter = tta.create_adapter("tent", tiny_model(), lr=1.0)
    x = torch.rand(16, 3, 16, 16)
    source = adapter.predict_with_source(lambda: adapter.model(x))
    adapter(x)
    adapted = {k: v.clone() for k, v in adapter.state_dict().items()}
    assert torch.equal(adapter.predict_with_source(lambda: adapter.model(x)), source)
    assert all(torch.equal(v, adapted[k]) for k, v in adapter.state_dict().items())


def test_it3_judges_its_final_prediction_not_the_pass_before_its_last_update():
    """One step that leaves finite, unexploded weights but makes every image of a batch of 16 one class with near
    zero entropy: a collapse the guard must see in the prediction made after the update (it once judged the outputs
    of the pass before it and returned the collapsed prediction)."""
    import copy
    model, config, _ = model_and_config("it3", steps=1)
    batch = torch.rand(16, 3, 16, 16)
    reference = tta.create_adapter("it3", copy.deepcopy(model), **{**config, "steps": 0})(batch)
    adapter = tta.create_adapter("it3", model, **config)

    def push_class_0(optimizer, args, kwargs):  # after the real step: a finite, 50-logit lead for class 0
        with torch.no_grad():
            model.net[7].bias[0] += 50.0
    adapter.optimizer.register_step_post_hook(push_class_0)
    out = adapter(batch)
    assert adapter.guard_events.get("collapsed", 0) == 1
    assert torch.allclose(out, reference, atol=1e-5)
