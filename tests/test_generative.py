"""Diffusion judges: loading through diffusers' from_pretrained, soft conditions, sampling, errors.

The tiny random judges (fixtures.py) are saved with save_pretrained and re-loaded through create_judge, so the
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
    return gen.create_judge(judges[kind], **kw)


# ---- loading -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pixel-unet", "dit", "sd", "map-unet"])
def test_kind_is_detected_from_the_folder_and_prefix_agrees(judges, kind):
    assert gen.detect_kind(judges[kind]) == kind
    judge = load(judges, kind)
    assert judge.kind == kind and judge.source == f"{kind}:{judges[kind]}"
    assert all(not p.requires_grad for p in judge.parameters()), "judges load frozen"
    prefixed = gen.create_judge(f"{kind}:{judges[kind]}", **({"class_names": ["a", "b"]} if kind == "sd" else {}))
    assert type(prefixed) is type(judge)


def test_flat_folder_and_metadata_class_names(tmp_path):
    path = save_pixel_judge(tmp_path / "flat", num_classes=3, flat=True, class_names=["x", "y", "z"])
    judge = gen.create_judge(path)
    assert judge.kind == "pixel-unet" and judge.class_names == ["x", "y", "z"]


def test_dit_reads_class_names_from_id2label(judges):
    assert load(judges, "dit").class_names == [f"thing{i}" for i in range(5)]


@pytest.mark.parametrize("kind", ["pixel-unet", "dit", "sd", "map-unet"])
def test_denoising_error_is_per_sample_and_differentiable_in_the_condition(judges, kind):
    judge = load(judges, kind)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 20, 20)  # not the judge's size: encode resizes
    x0 = judge.encode(images)
    assert not x0.requires_grad
    if kind == "map-unet":
        weights = torch.rand(2, 5, 10, 10).softmax(1).requires_grad_()
    else:
        weights = torch.randn(2, judge.num_classes).softmax(1).requires_grad_()
    t = torch.tensor([3, 700])
    err = judge.denoising_error(x0, judge.condition(weights), t, torch.randn_like(x0))
    assert err.shape == (2,) and torch.isfinite(err).all()
    err.sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in judge.parameters()), "a frozen judge accumulates no gradient"


@pytest.mark.parametrize("kind", ["pixel-unet", "dit", "sd"])
def test_one_hot_soft_condition_equals_the_hard_label(judges, kind):
    judge = load(judges, kind)
    x0 = judge.encode(torch.rand(3, 3, 16, 16))
    labels = torch.tensor([2, 0, 1])
    t, noise = torch.tensor([5, 400, 999]), torch.randn_like(x0)
    one_hot = torch.nn.functional.one_hot(labels, judge.num_classes).float()
    soft = judge.denoising_error(x0, judge.condition(one_hot), t, noise)
    hard = judge.denoising_error(x0, judge.class_condition(labels), t, noise)
    assert torch.allclose(soft, hard, atol=1e-6)
    if kind != "sd":  # against the model's own integer-label path, with no hooks of ours
        from tta.generative.sampling import add_noise
        x_t = add_noise(x0, noise, t, judge.alphas_cumprod)
        if kind == "pixel-unet":
            own = judge.unet(x_t, t, class_labels=labels).sample
        else:
            own = judge.transformer(x_t, timestep=t, class_labels=labels).sample[:, :4]
        ours = judge.predict_noise(x_t, t, judge.class_condition(labels))
        assert torch.allclose(own, ours, atol=1e-5)


@pytest.mark.parametrize("kind", ["pixel-unet", "dit"])
def test_no_forward_hooks_are_left_behind(judges, kind):
    judge = load(judges, kind)
    x0 = judge.encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(RuntimeError):  # also on error: a wrong-width condition fails inside the hooked call
        judge.predict_noise(x0, torch.tensor([1]), torch.randn(1, 3))
    judge.denoising_error(x0, judge.class_condition(torch.tensor([0])), torch.tensor([1]), torch.randn_like(x0))
    if kind == "dit":  # DiT's hooks live as long as the call's labels (gradient checkpointing re-runs blocks in
        import gc      # backward), and no longer
        gc.collect()
        assert not any(m._forward_hooks for m in judge.label_tables())
    assert all(not m._forward_hooks for m in judge.modules())


def test_sd_v_prediction_is_converted_to_epsilon(tmp_path):
    folder = save_sd_judge(tmp_path / "sdv", prediction_type="v_prediction")
    judge = gen.create_judge(folder, class_names=["a", "b"])
    x_t, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    v = torch.randn_like(x_t)
    a = judge.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = judge.to_epsilon(v, x_t, t)
    x0 = a.sqrt() * x_t - (1 - a).sqrt() * v  # the definition of v, solved for x0 and eps
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)


def test_map_judge_resizes_and_ranges_the_map(tmp_path):
    judge = gen.create_judge(save_map_judge(tmp_path / "depth", map_channels=1, map_range=[0.0, 10.0]))
    assert judge.map_kind == "depth" and judge.num_classes is None
    cond = judge.condition(torch.full((2, 1, 32, 32), 10.0))
    assert cond.shape == (2, 1, 16, 16) and torch.allclose(cond, torch.ones_like(cond))
    with pytest.raises(ValueError, match="1, H, W"):
        judge.condition(torch.rand(2, 3, 16, 16))


def test_grey_scale_judge_takes_colour_images(tmp_path):
    judge = gen.create_judge(save_pixel_judge(tmp_path / "grey", channels=1, size=8))
    x0 = judge.encode(torch.ones(2, 3, 28, 28))
    assert x0.shape == (2, 1, 8, 8) and torch.allclose(x0, torch.ones_like(x0), atol=1e-5)


# ---- errors ------------------------------------------------------------------------------------------------------
def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        gen.create_judge(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no folder"):
        gen.create_judge(f"dit:{tmp_path / 'nowhere'}")


def test_wrong_files_say_what_the_kind_needs(tmp_path, judges):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="kind"):
        gen.create_judge(str(empty))
    with pytest.raises(OSError, match="transformer/"):
        gen.create_judge(f"dit:{judges['pixel-unet']}")
    with pytest.raises(KeyError, match="diffusion judge"):
        gen.create_judge(judges["dit"], kind="ditt")
    with pytest.raises(ValueError, match="map-unet"):
        gen.PixelUNetJudge.from_pretrained(judges["map-unet"])


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
