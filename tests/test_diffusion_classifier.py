"""The Diffusion Classifier: Bayes-optimal decisions on a judge with a closed-form noise prediction, pruning vs
exhaustive scoring, the paper's grid and shared noise, calibration, and its faces as model source and method."""
import math

import pytest
import torch

import tta
import tta.methods.diffusion_classifier  # noqa: F401  (registers the method and the model source)
from tta.generative import DiffusionClassifier, fit_temperature, timestep_grid
from tta.generative.classifier import PRUNING_PRESETS

from fixtures import gaussian_problem, save_dit_judge, save_pixel_judge, save_sd_judge, tiny_model

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def test_picks_the_bayes_optimal_class():
    judge, images, bayes = gaussian_problem()
    clf = DiffusionClassifier(judge, samples=(200,), seed=0, micro_batch=500)
    assert torch.equal(clf(images).argmax(1), bayes)


@pytest.mark.parametrize("preset", ["cifar10", "food"])
def test_adaptive_pruning_agrees_with_exhaustive_scoring(preset):
    judge, images, bayes = gaussian_problem(k=25, s=0.1, seed=1)
    samples = PRUNING_PRESETS[preset].samples
    exhaustive = DiffusionClassifier(judge, samples=(max(samples),), seed=0, micro_batch=1000)(images).argmax(1)
    adaptive = DiffusionClassifier(judge, preset=preset, seed=0, micro_batch=1000)(images).argmax(1)
    assert torch.equal(adaptive, exhaustive) and torch.equal(adaptive, bayes)


def test_pruning_costs_fewer_evaluations_and_encodes_once():
    judge, images, _ = gaussian_problem(k=10)
    DiffusionClassifier(judge, preset="cifar10", micro_batch=50)(images[:3])
    # per image: 10 classes x 50 timesteps, then 5 survivors x 450 new ones = 2750 evaluations in batches of 50
    assert judge.encodes == 1 and judge.predictions == 3 * math.ceil(500 / 50) + 3 * math.ceil(2250 / 50)


def test_errors_are_the_mean_over_the_grid_with_noise_shared_across_classes():
    judge, images, _ = gaussian_problem(k=4, n=2)
    clf = DiffusionClassifier(judge, samples=(8,), seed=3, micro_batch=5)
    errors = clf.errors(images)
    grid = timestep_grid(1000, 8)
    assert grid == [62, 187, 312, 437, 562, 687, 812, 937]
    x0 = images * 2 - 1
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(8, 3, 4, 4, generator=g) for _ in range(2)]  # one draw per image, in order
    for i, noise in enumerate(noises):
        for c in range(4):
            per_t = judge.denoising_error(x0[i:i + 1].expand(8, -1, -1, -1), judge.means[c].expand(8, -1, -1, -1),
                                          torch.tensor(grid), noise)
            assert torch.allclose(errors[i, c], per_t.mean(), atol=1e-6)
    smaller_batches = DiffusionClassifier(judge, samples=(8,), seed=3, micro_batch=3)
    assert torch.allclose(clf.errors(images), smaller_batches.errors(images))


def test_logits_keep_the_pruning_decision_and_scale_with_temperature():
    judge, images, _ = gaussian_problem(k=12, s=0.3, n=6, seed=4)
    clf = DiffusionClassifier(judge, keep=(6, 3, 1), samples=(4, 8, 16), seed=0, temperature=0.01)
    errors = clf.errors(images)
    assert torch.allclose(clf(images), -errors / 0.01, atol=1e-4)
    assert torch.isfinite(errors).all()


def test_fit_temperature_recovers_the_generating_temperature():
    g = torch.Generator().manual_seed(0)
    errors = torch.rand(4000, 10, generator=g) * 0.01
    labels = torch.distributions.Categorical(logits=-errors / 0.002).sample()
    assert abs(fit_temperature(errors, labels) / 0.002 - 1) < 0.15


def test_calibrate_sets_the_temperature():
    judge, images, bayes = gaussian_problem(n=24)
    labels = torch.where(torch.arange(24) % 4 == 0, (bayes + 1) % 10, bayes)  # some images wrong: a finite optimum
    clf = DiffusionClassifier(judge, samples=(20,), seed=0, micro_batch=200)
    temperature = clf.calibrate(images, labels)
    assert clf.temperature == temperature and temperature < 1.0  # raw errors give a near-uniform softmax


def test_degenerate_calibration_is_refused_and_changes_nothing():
    labels = torch.arange(12) % 3
    separated = torch.ones(12, 3)
    separated[torch.arange(12), labels] = 0.0  # every image right, with margin: the NLL falls as temperature -> 0
    with pytest.raises(ValueError, match="at least 10 labelled held-out images, got 4"):
        fit_temperature(separated[:4], labels[:4])
    with pytest.raises(ValueError, match="all 12 calibration images are classified correctly"):
        fit_temperature(separated, labels)
    with pytest.raises(ValueError, match="end of its range"):  # every image wrong: the best fit is uniform
        fit_temperature(1.0 - separated, labels)
    judge, images, bayes = gaussian_problem(n=4)
    clf = DiffusionClassifier(judge, samples=(20,), seed=0, micro_batch=200, temperature=0.5)
    with pytest.raises(ValueError, match="got 4"):
        clf.calibrate(images, bayes)
    assert clf.temperature == 0.5


def test_clear_errors():
    judge, _, _ = gaussian_problem()
    with pytest.raises(ValueError, match="Valid choices"):
        DiffusionClassifier(judge, preset="mnist")
    with pytest.raises(ValueError, match="increase"):
        DiffusionClassifier(judge, keep=(5, 1), samples=(50, 20))
    with pytest.raises(ValueError, match="either"):
        DiffusionClassifier(judge, preset="cifar10", samples=(10,))


# ---- with real (tiny) judges loaded from folders -------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dc")
    return {"pixel-unet": save_pixel_judge(root / "pixel", num_classes=5, size=16),
            "dit": save_dit_judge(root / "dit"), "sd": save_sd_judge(root / "sd")}


@pytest.mark.parametrize("kind", ["pixel-unet", "dit", "sd"])
def test_model_source(folders, kind):
    extra = {"class_names": ["cat", "dog", "car"]} if kind == "sd" else {}
    model = tta.create_model(f"diffusion:{kind}@{folders[kind]}", keep=(2, 1), samples=(2, 4), seed=0,
                             micro_batch=8, **extra)
    k = 3 if kind == "sd" else 5
    assert model.num_classes == k and model.task == "classification"
    out = model(torch.rand(2, 3, *model.input_size[1:]))
    assert out.shape == (2, k) and torch.isfinite(out).all()


def test_the_model_of_the_diffusion_source_calibrates(folders):
    model = tta.create_model(f"diffusion:pixel-unet@{folders['pixel-unet']}", samples=(2,), seed=0, micro_batch=10)
    images = torch.rand(12, 3, 16, 16)
    predictions = model(images).argmax(1)
    with pytest.raises(ValueError, match="classified correctly"):
        model.calibrate(images, predictions)
    labels = predictions.clone()
    labels[0] = (labels[0] + 1) % 5  # one image wrong: the fit has a finite optimum
    temperature = model.calibrate(images, labels)
    assert model.temperature == model.net.temperature == temperature != 1.0
    assert torch.equal(model(images).argmax(1), predictions)  # calibration changes probabilities, not decisions
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.calibrate(images * 255, labels)


def test_method_ignores_the_model_and_has_nothing_to_train(folders):
    images = torch.rand(2, 3, 16, 16)
    adapter = tta.create_adapter("diffusion_classifier", tiny_model(), judge=folders["pixel-unet"],
                                 samples=(6,), seed=0, micro_batch=10)
    assert adapter.adapted_names == [] and adapter.optimizer is None
    assert not any(k.startswith("classifier.") for k in adapter.source_state_dict), "the judge is not copied"
    reference = DiffusionClassifier(tta.generative.create_judge(folders["pixel-unet"]), samples=(6,), seed=0)
    assert torch.allclose(adapter(images), reference(images), atol=1e-5)
    assert adapter.cfg.judge == folders["pixel-unet"]


def test_method_needs_a_matching_judge(folders):
    with pytest.raises(ValueError, match="judge="):
        tta.create_adapter("diffusion_classifier", tiny_model())
    with pytest.raises(ValueError, match="knows 5"):
        tta.create_adapter("diffusion_classifier", tiny_model(num_classes=3), judge=folders["pixel-unet"])


def test_config_round_trips_with_the_judge_as_a_string(folders):
    import dataclasses
    adapter = tta.create_adapter("diffusion_classifier", tiny_model(), judge=folders["pixel-unet"], preset="pets")
    values = dataclasses.asdict(adapter.cfg)
    assert type(adapter.cfg)(**values) == adapter.cfg
    assert tta.create_adapter("diffusion_classifier", tiny_model(), **values).cfg == adapter.cfg
    assert (adapter.classifier.keep, adapter.classifier.samples) == ((5, 1), (25, 250))
