"""No state leaks: after an episodic run every method leaves the classifier (and an adapted diffusion judge) bit
for bit as it found it, and online adaptation never writes to the checkpoint files the weights came from."""
import hashlib
import os
from pathlib import Path

import pytest
import torch

import tta
from tta.generative import create_backend

from conftest import _tiny_judge_folder, model_and_config


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_identical(before, after, what):
    assert before.keys() == after.keys(), f"{what}: the state dict changed its keys"
    changed = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not changed, f"{what}: {changed[:5]} differ from the source after an episodic run"


SLOW = ("slow_inference", "ttt_mae")  # one step is enough to move their weights


@pytest.mark.parametrize("name", tta.list_adapters())
def test_episodic_runs_leave_the_classifier_bit_identical(name):
    model, config, batch = model_and_config(name, episodic=True, **({"steps": 1} if name in SLOW else {}))
    source = state(model)
    adapter = tta.create_adapter(name, model, **config)
    assert_bit_identical(source, state(adapter.model), f"{name} (construction)")
    x = batch[:2]  # two images keep the per-example methods quick
    for x in (x, torch.rand_like(x)):
        adapter(x)
    assert_bit_identical(source, state(adapter.model), name)


def test_episodic_diffusion_tta_leaves_an_adapted_judge_bit_identical():
    folder = _tiny_judge_folder()
    on_disk = state(create_backend(folder))
    model, config, batch = model_and_config("diffusion_tta", episodic=True, adapt_backend=True, lr=1e-2)
    source = state(model)
    adapter = tta.create_adapter("diffusion_tta", model, **config)
    assert any(n.startswith("backend.") for n in adapter.adapted_names), "the judge does not adapt"
    assert_bit_identical(on_disk, state(adapter.backend), "judge (construction)")
    judge = adapter.backend
    params = [p for n, p in adapter.adapted if n.startswith("backend.")]
    original = [p.detach().clone() for p in params]
    # Prove the judge really moves within a call: a step without the episodic reset changes it.
    adapter.cfg.episodic = False
    adapter(batch)
    assert any(not torch.equal(a, p) for a, p in zip(original, params)), "the judge never changed"
    adapter.reset()
    adapter.cfg.episodic = True
    for x in (batch, torch.rand_like(batch)):
        adapter(x)
    assert adapter.backend is judge
    assert_bit_identical(on_disk, state(adapter.backend), "judge")
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
    folder = Path(_tiny_judge_folder())
    before = fingerprint(folder)
    model, config, batch = model_and_config("diffusion_tta", episodic=False, adapt_backend=True, lr=1e-2)
    adapter = tta.create_adapter("diffusion_tta", model, **config)
    judge_before = state(adapter.backend)
    online(adapter, batch, 2)
    assert any(not torch.equal(judge_before[k], v) for k, v in state(adapter.backend).items())
    assert fingerprint(folder) == before, "online judge adaptation wrote to the judge's files"
    assert_bit_identical(judge_before, state(create_backend(str(folder))), "a fresh load of the judge")
