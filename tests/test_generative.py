"""Diffusion backends: loading through diffusers' from_pretrained, soft conditions, sampling, errors.

The tiny random judges (fixtures.py) are saved with save_pretrained and re-loaded through create_backend, so the
real loading path runs.
"""

import pytest
import torch

import tta.generative as gen
from tta.generative.sampling import subgrid_positions

from fixtures import save_dit_judge, save_map_judge, save_pixel_judge, save_sd_judge

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="session")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    return {"pixel-unet": save_pixel_judge(root / "pixel"), "dit": save_dit_judge(root / "dit"),
            "sd": save_sd_judge(root / "sd"), "map-unet": save_map_judge(root / "map")}


def load(judges, kind, **kw):
    kw = {"class_names": ["cat", "dog", "car"], **kw} if kind == "sd" else kw
    return gen.create_backend(judges[kind], **kw)


# ---- loading -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pixel-unet", "dit", "sd", "map-unet"])
def test_kind_is_detected_from_the_folder_and_prefix_agrees(judges, kind):
    assert gen.detect_kind(judges[kind]) == kind
    backend = load(judges, kind)
    assert backend.kind == kind and backend.source == f"{kind}:{judges[kind]}"
    assert all(not p.requires_grad for p in backend.parameters()), "judges load frozen"
    prefixed = gen.create_backend(f"{kind}:{judges[kind]}", **({"class_names": ["a", "b"]} if kind == "sd" else {}))
    assert type(prefixed) is type(backend)


def test_flat_folder_and_metadata_class_names(tmp_path):
    path = save_pixel_judge(tmp_path / "flat", num_classes=3, flat=True, class_names=["x", "y", "z"])
    backend = gen.create_backend(path)
    assert backend.kind == "pixel-unet" and backend.class_names == ["x", "y", "z"]


def test_dit_reads_class_names_from_id2label(judges):
    assert load(judges, "dit").class_names == [f"thing{i}" for i in range(5)]


@pytest.mark.parametrize("kind", ["pixel-unet", "dit", "sd", "map-unet"])
def test_denoising_error_is_per_sample_and_differentiable_in_the_condition(judges, kind):
    backend = load(judges, kind)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 20, 20)  # not the judge's size: encode resizes
    x0 = backend.encode(images)
    assert not x0.requires_grad
    if kind == "map-unet":
        weights = torch.rand(2, 5, 10, 10).softmax(1).requires_grad_()
    else:
        weights = torch.randn(2, backend.num_classes).softmax(1).requires_grad_()
    t = torch.tensor([3, 700])
    err = backend.denoising_error(x0, backend.condition(weights), t, torch.randn_like(x0))
    assert err.shape == (2,) and torch.isfinite(err).all()
    err.sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in backend.parameters()), "a frozen judge accumulates no gradient"


@pytest.mark.parametrize("kind", ["pixel-unet", "dit", "sd"])
def test_one_hot_soft_condition_equals_the_hard_label(judges, kind):
    backend = load(judges, kind)
    x0 = backend.encode(torch.rand(3, 3, 16, 16))
    labels = torch.tensor([2, 0, 1])
    t, noise = torch.tensor([5, 400, 999]), torch.randn_like(x0)
    one_hot = torch.nn.functional.one_hot(labels, backend.num_classes).float()
    soft = backend.denoising_error(x0, backend.condition(one_hot), t, noise)
    hard = backend.denoising_error(x0, backend.class_condition(labels), t, noise)
    assert torch.allclose(soft, hard, atol=1e-6)
    if kind != "sd":  # against the model's own integer-label path, with no hooks of ours
        from tta.generative.sampling import add_noise
        x_t = add_noise(x0, noise, t, backend.alphas_cumprod)
        if kind == "pixel-unet":
            own = backend.unet(x_t, t, class_labels=labels).sample
        else:
            own = backend.transformer(x_t, timestep=t, class_labels=labels).sample[:, :4]
        ours = backend.predict_noise(x_t, t, backend.class_condition(labels))
        assert torch.allclose(own, ours, atol=1e-5)


@pytest.mark.parametrize("kind", ["pixel-unet", "dit"])
def test_no_forward_hooks_are_left_behind(judges, kind):
    backend = load(judges, kind)
    x0 = backend.encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(RuntimeError):  # also on error: a wrong-width condition fails inside the hooked call
        backend.predict_noise(x0, torch.tensor([1]), torch.randn(1, 3))
    backend.denoising_error(x0, backend.class_condition(torch.tensor([0])), torch.tensor([1]), torch.randn_like(x0))
    if kind == "dit":  # DiT's hooks live as long as the call's labels (gradient checkpointing re-runs blocks in
        import gc      # backward), and no longer
        gc.collect()
        assert not any(m._forward_hooks for m in backend.label_tables())
    assert all(not m._forward_hooks for m in backend.modules())


def test_sd_v_prediction_is_converted_to_epsilon(tmp_path):
    folder = save_sd_judge(tmp_path / "sdv", prediction_type="v_prediction")
    backend = gen.create_backend(folder, class_names=["a", "b"])
    x_t, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    v = torch.randn_like(x_t)
    a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = backend.to_epsilon(v, x_t, t)
    x0 = a.sqrt() * x_t - (1 - a).sqrt() * v  # the definition of v, solved for x0 and eps
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)


def test_map_judge_resizes_and_ranges_the_map(tmp_path):
    backend = gen.create_backend(save_map_judge(tmp_path / "depth", map_channels=1, map_range=[0.0, 10.0]))
    assert backend.map_kind == "depth" and backend.num_classes is None
    cond = backend.condition(torch.full((2, 1, 32, 32), 10.0))
    assert cond.shape == (2, 1, 16, 16) and torch.allclose(cond, torch.ones_like(cond))
    with pytest.raises(ValueError, match="1, H, W"):
        backend.condition(torch.rand(2, 3, 16, 16))


def test_grey_scale_judge_takes_colour_images(tmp_path):
    backend = gen.create_backend(save_pixel_judge(tmp_path / "grey", channels=1, size=8))
    x0 = backend.encode(torch.ones(2, 3, 28, 28))
    assert x0.shape == (2, 1, 8, 8) and torch.allclose(x0, torch.ones_like(x0), atol=1e-5)


# ---- errors ------------------------------------------------------------------------------------------------------
def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        gen.create_backend(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no folder"):
        gen.create_backend(f"dit:{tmp_path / 'nowhere'}")


def test_wrong_files_say_what_the_kind_needs(tmp_path, judges):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="kind"):
        gen.create_backend(str(empty))
    with pytest.raises(OSError, match="transformer/"):
        gen.create_backend(f"dit:{judges['pixel-unet']}")
    with pytest.raises(KeyError, match="diffusion backend"):
        gen.create_backend(judges["dit"], kind="ditt")
    with pytest.raises(ValueError, match="map-unet"):
        gen.PixelUNetBackend.from_pretrained(judges["map-unet"])


# ---- sampling ----------------------------------------------------------------------------------------------------
def test_timestep_grid_is_the_papers():
    assert gen.timestep_grid(1000, 4) == [125, 375, 625, 875]
    assert gen.timestep_grid(1000, 1000) == list(range(1000))
    grid = gen.timestep_grid(1000, 500)
    assert grid[0] == 1 and grid[1] - grid[0] == 2 and len(grid) == 500
    assert subgrid_positions(500, 50) == list(range(5, 500, 10))
    with pytest.raises(ValueError):
        gen.timestep_grid(1000, 0)


def test_timestep_and_noise_modes():
    g = torch.Generator().manual_seed(0)
    t = gen.sample_timesteps(3, 10, 1000, "stratified", g)
    assert ((t >= torch.arange(10) * 100) & (t < (torch.arange(10) + 1) * 100)).all()
    u = gen.sample_timesteps(2, 500, 1000, "uniform", g)
    assert u.min() >= 0 and u.max() < 1000 and len(u.unique()) > 100
    assert (gen.sample_timesteps(2, 4, 1000, "grid") == torch.tensor([125, 375, 625, 875])).all()
    shared = gen.sample_noise(2, 5, (3, 4, 4), "shared", g)
    assert torch.equal(shared[:, 0], shared[:, 4]) and not torch.equal(shared[0, 0], shared[1, 0])
    independent = gen.sample_noise(2, 5, (3, 4, 4), "independent", g)
    assert not torch.equal(independent[:, 0], independent[:, 1])
    with pytest.raises(ValueError, match="Valid choices"):
        gen.sample_timesteps(1, 1, 1000, "log")


def test_sample_pairs_is_reproducible_and_ordered():
    x0 = torch.zeros(2, 3, 4, 4)
    t1, n1 = gen.sample_pairs(x0, 6, 1000, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(t1, torch.randint(0, 1000, (2, 6), generator=g))
    assert torch.equal(n1, torch.randn(2, 6, 3, 4, 4, generator=g))


def test_add_noise_is_the_forward_process():
    a = torch.linspace(0.99, 0.01, 1000)
    x0, eps, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 999])
    expected = a[t, None].sqrt() * x0 + (1 - a[t, None]).sqrt() * eps
    assert torch.allclose(gen.add_noise(x0, eps, t, a), expected)
