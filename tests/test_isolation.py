"""No state leaks: reset() is bit-exact, after an episodic run every method leaves the classifier (and an adapted
diffusion judge) bit for bit as it found it, and online adaptation never writes to the checkpoint files the weights
came from."""
import copy
import hashlib
import os
from pathlib import Path

import pytest
import torch

import tta
from tta.generative import create_judge

from fixtures import FAST, make_adapter, methods, model_and_config, tiny_judge_folder, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_identical(before, after, what):
    assert before.keys() == after.keys(), f"{what}: the state dict changed its keys"
    changed = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not changed, f"{what}: {changed[:5]} differ from the source after an episodic run"


SLOW = ("slow_inference", "ttt_mae")  # one step is enough to move their weights


# ---- every registered method ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", tta.list_adapters())
def test_every_adapter_resets_exactly_and_isolates_episodes(name):
    """For every registered method, on a model it accepts: the trainable set is the adapted set, only it
    changes, reset() is bit-exact, and episodic calls leave every weight as it was."""
    model, config, batch = model_and_config(name, episodic=False)
    source = copy.deepcopy(model.state_dict())
    adapter = tta.create_adapter(name, model, **config)
    adapted = set(adapter.adapted_names)
    # Diffusion-TTA's default (the official DiT setting) also adapts its judge, named "judge.<name>".
    judge = getattr(adapter, "judge", None)
    judge_adapted = {f"judge.{n}" for n, p in judge.named_parameters() if p.requires_grad} if judge else set()
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
    # Episodes in a row, on a fresh model, leave it as it was from construction on.
    model, config, batch = model_and_config(name, episodic=True, **({"steps": 1} if name in SLOW else {}))
    source = state(model)
    adapter = tta.create_adapter(name, model, **config)
    assert_bit_identical(source, state(adapter.model), f"{name} (construction)")
    x = batch[:2]  # two images keep the per-example methods quick
    for x in (x, torch.rand_like(x)):
        adapter(x)
    assert_bit_identical(source, state(adapter.model), name)


# ---- the baselines, step by step -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", methods("baseline"))
def test_reset_is_bit_exact(name, images):
    model, adapter = make_adapter(name, lr=0.05, steps=2, episodic=False)
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


@pytest.mark.parametrize("name", methods("baseline"))
def test_episodic_mode_leaves_the_model_unchanged(name, images):
    model, adapter = make_adapter(name, lr=0.05, episodic=True)
    source = copy.deepcopy(model.state_dict())
    first = adapter(images)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), f"{name}: {k} leaked out of an episode"
    torch.manual_seed(0)
    again = adapter(images)
    if name not in ("memo", "cotta"):  # random augmentations make those two differ run to run
        assert torch.allclose(first, again, atol=1e-6)


# ---- Diffusion-TTA's judge -------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapt_judge", [False, True])
def test_episodic_diffusion_tta_leaves_classifier_and_judge_bit_identical(images, adapt_judge):
    model, images = tiny_model(), images[:2]
    adapter = tta.create_adapter("diffusion_tta", model, judge=tiny_judge_folder(), adapt_judge=adapt_judge,
                                 steps=2, pairs=4, micro_batch=2, lr=0.5)
    model_state = copy.deepcopy(model.state_dict())
    judge_state = copy.deepcopy(adapter.judge.state_dict())
    with torch.no_grad():
        source_out = model(images)
    out = adapter(images)
    assert out.shape == (2, 5) and not out.requires_grad
    assert not torch.allclose(out, source_out), "the prediction comes from the adapted model"
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_state[k]), k
    for k, v in adapter.judge.state_dict().items():
        assert torch.equal(v, judge_state[k]), k
    assert not adapter.optimizer.state


def test_online_diffusion_tta_keeps_adapting_and_reset_restores_classifier_and_judge(images):
    model, images = tiny_model(), images[:2]
    adapter = tta.create_adapter("diffusion_tta", model, judge=tiny_judge_folder(), episodic=False,
                                 adapt_judge=True, steps=1, pairs=4, micro_batch=4, lr=0.5)
    model_state = copy.deepcopy(model.state_dict())
    judge_state = copy.deepcopy(adapter.judge.state_dict())
    adapter(images)
    assert any(not torch.equal(v, model_state[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, judge_state[k]) for k, v in adapter.judge.state_dict().items())
    adapter.reset()
    assert all(torch.equal(v, model_state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, judge_state[k]) for k, v in adapter.judge.state_dict().items())


def test_episodic_diffusion_tta_leaves_an_adapted_judge_bit_identical():
    folder = tiny_judge_folder()
    on_disk = state(create_judge(folder))
    model, config, batch = model_and_config("diffusion_tta", episodic=True, adapt_judge=True, lr=1e-2)
    source = state(model)
    adapter = tta.create_adapter("diffusion_tta", model, **config)
    assert any(n.startswith("judge.") for n in adapter.adapted_names), "the judge does not adapt"
    assert_bit_identical(on_disk, state(adapter.judge), "judge (construction)")
    judge = adapter.judge
    params = [p for n, p in adapter.adapted_params if n.startswith("judge.")]
    original = [p.detach().clone() for p in params]
    # Prove the judge really moves within a call: a step without the episodic reset changes it.
    adapter.cfg.episodic = False
    adapter(batch)
    assert any(not torch.equal(a, p) for a, p in zip(original, params)), "the judge never changed"
    adapter.reset()
    adapter.cfg.episodic = True
    for x in (batch, torch.rand_like(batch)):
        adapter(x)
    assert adapter.judge is judge
    assert_bit_identical(on_disk, state(adapter.judge), "judge")
    assert_bit_identical(source, state(adapter.model), "classifier")


# ---- checkpoint files are read, never written ------------------------------------------------------------------
def fingerprint(path: Path):
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_mtime_ns) for p in files}


def online(adapter, x, calls=3):
    for _ in range(calls):
        out = adapter(x)
    return out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_online_adaptation_never_touches_the_weights_file(tmp_path, suffix):
    packaged = Path(tta.zoo.checkpoint_path("fmnist-cnn"))
    packaged_before = fingerprint(packaged)
    path = tmp_path / f"cnn{suffix}"
    weights = tta.create_model("zoo:fmnist-cnn").net.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    else:
        torch.save(weights, path)
    before = fingerprint(path)
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    for name, config in (("tent", {"lr": 1e-1}), ("cotta", {"n_augmentations": 2, "lr": 1e-1})):  # cotta: all weights
        model = tta.create_model("zoo:fmnist-cnn", weights=path)
        loaded = state(model)
        adapter = tta.create_adapter(name, model, **config)
        online(adapter, x, 2)
        assert any(not torch.equal(loaded[k], v) for k, v in state(model).items()), f"{name} did not adapt"
    assert fingerprint(path) == before, "online adaptation wrote to the checkpoint it was loaded from"
    assert fingerprint(packaged) == packaged_before, "the packaged zoo checkpoint changed"


def test_online_judge_adaptation_never_touches_the_judge_folder():
    folder = Path(tiny_judge_folder())
    before = fingerprint(folder)
    model, config, batch = model_and_config("diffusion_tta", episodic=False, adapt_judge=True, lr=1e-2)
    adapter = tta.create_adapter("diffusion_tta", model, **config)
    judge_before = state(adapter.judge)
    online(adapter, batch, 2)
    assert any(not torch.equal(judge_before[k], v) for k, v in state(adapter.judge).items())
    assert fingerprint(folder) == before, "online judge adaptation wrote to the judge's files"
    assert_bit_identical(judge_before, state(create_judge(str(folder))), "a fresh load of the judge")
