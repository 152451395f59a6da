"""The scene task: composer, zoo members (scenes-seg, scenes-judge, scenes-slots), data kind, quick-scenes suite."""
import json

import pytest
import torch

import tta
import tta.zoo.scenes  # noqa: F401  (registers the scene members, also before tta.zoo imports them)
from tta.data import scenes as scene_data
from tta.data.scenes import CLASS_NAMES, compose_scenes
from tta.segmentation_metrics import adjusted_rand_index
from tta.zoo import checkpoint_path


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def test_composer_is_deterministic_for_a_seed():
    a, b, c = scene_data.test_scenes(16, seed=3), scene_data.test_scenes(16, seed=3), scene_data.test_scenes(16, seed=4)
    for name in ("images", "masks", "instances", "item_classes"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.images, c.images)


def test_masks_match_the_pasted_items():
    s = scene_data.test_scenes(64, seed=0)
    assert s.images.shape == (64, 1, 24, 24) and s.masks.shape == s.instances.shape == (64, 24, 24)
    assert s.masks.dtype == torch.long and 0 <= s.images.min() and s.images.max() <= 1
    fg = s.masks > 0
    assert torch.equal(fg, s.instances > 0)
    assert (s.images[:, 0][~fg] == 0).all() and (s.images[:, 0][fg] > 0.1).all()  # background black, items > 0.1
    for i in range(64):
        classes = s.item_classes[i]
        assert classes[0] != classes[1]  # distinct classes: the semantic mask is an instance partition
        for j in range(2):
            pixels = s.instances[i] == j + 1
            assert pixels.sum() > 0
            assert (s.masks[i][pixels] == classes[j] + 1).all()
    assert torch.allclose(adjusted_rand_index(s.instances, s.masks), torch.ones(64, dtype=torch.float64))


def test_compose_scenes_from_given_items():
    images = torch.zeros(4, 1, 28, 28)
    images[:, :, 4:24, 4:24] = 0.8
    s = compose_scenes(images, torch.tensor([0, 1, 7, 8]), 5, seed=0, canvas=32, item=16)
    assert s.images.shape == (5, 1, 32, 32) and set(s.masks.unique().tolist()) <= set(range(len(CLASS_NAMES)))
    with pytest.raises(ValueError, match="distinct classes"):
        compose_scenes(images, torch.tensor([0, 1, 7, 8]), 1, classes=(0,))


@pytest.mark.parametrize("name", ["scenes-seg", "scenes-judge", "scenes-slots"])
def test_zoo_checkpoints_are_shipped(name):
    assert checkpoint_path(name).exists(), f"run `tta zoo train {name}`"


def test_zoo_members_load_and_run():
    x = scene_data.test_scenes(2, seed=0).images
    seg = tta.create_model("zoo:scenes-seg").eval()
    assert seg.task == "segmentation" and seg.class_names == list(CLASS_NAMES) and seg.input_size == (1, 24, 24)
    assert seg(x).shape == (2, len(CLASS_NAMES), 24, 24)
    slots = tta.create_model("zoo:scenes-slots")
    assert slots.task == "object_discovery" and slots.predict(x).shape == (2, 3, 24, 24)
    from tta.generative import create_judge
    judge = create_judge("zoo:scenes-judge")
    assert judge.kind == "map-unet" and judge.map_channels == len(CLASS_NAMES) and judge.image_size == (24, 24)
    cond = judge.condition(seg(x).softmax(1))
    err = judge.denoising_error(judge.encode(x), cond, torch.tensor([100, 500]), torch.randn(2, 1, 24, 24))
    assert err.shape == (2,) and torch.isfinite(err).all()


def test_data_kind_yields_images_and_masks():
    from tta.bench.datasets import BuildContext, build_domains, parse_data_config
    cfg = parse_data_config({"kind": "fashion-mnist-scenes", "scenes": 10, "clean": True,
                             "corruptions": ["gaussian_noise"], "severities": [5]})
    domains = build_domains(cfg, BuildContext((1, 24, 24)))
    assert [d.name for d in domains] == ["scenes", "gaussian_noise"]
    x, y = domains[1].dataset[0]
    clean_x, clean_y = domains[0].dataset[0]
    assert x.shape == (1, 24, 24) and y.shape == (24, 24) and y.dtype == torch.long
    assert torch.equal(y, clean_y) and not torch.equal(x, clean_x)
    with pytest.raises(ValueError, match="scenes-seg"):
        build_domains(cfg, BuildContext((1, 28, 28)))


@pytest.mark.slow  # the whole quick-scenes spec through the runner
def test_quick_scenes_suite_end_to_end(tmp_path):
    from tta.bench.runner import run_benchmark
    from tta.bench.spec import load_spec
    spec = load_spec("quick-scenes")
    out = tmp_path / "scenes.jsonl"
    counts = run_benchmark(spec, out, limit=1, progress=False, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["written"] == len(rows) == 4 * 4
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    assert set(by_method) == {"source", "diffusion_tta", "slots-source", "slow_inference"}
    for m in ("source", "diffusion_tta"):
        assert all(r["task"] == "segmentation" and r["metrics"]["miou"] is not None for r in by_method[m])
    for m in ("slots-source", "slow_inference"):
        assert all(r["task"] == "object_discovery" and r["primary_metric"] == "fg_ari" for r in by_method[m])
        assert all(-1 <= r["metrics"]["ari"] <= 1 for r in by_method[m])
