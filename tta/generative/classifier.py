"""The Diffusion Classifier's scorer (Li et al., ICCV 2023, arXiv:2303.16203), reusable with any class-conditional
or text-conditioned judge.

Prediction: argmin_c E_{t,eps} || eps_theta(x_t, t, c) - eps ||. For variance reduction every class sees the
same noise at a timestep, and timesteps lie on an evenly spaced grid (start T // n // 2, stride T // n).
Adaptive pruning scores all classes with a few (t, eps), keeps the best, and adds (t, eps) for survivors.
Scores are returned as logits = -error / temperature; the raw errors are badly calibrated (a near-uniform
softmax), so `fit_temperature` fits the temperature on held-out data.

Pruned classes are not evaluated on the later timesteps, so their errors are not directly comparable with the
survivors'. A class dropped at a stage gets the paired estimate e_w(all) + e_c(stage) - e_w(stage), with w the
final winner: its difference to the winner on the timesteps both saw, added to the winner's full estimate.
This keeps argmax(logits) equal to the pruning decision and reduces to the plain mean error without pruning.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Literal, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import named_by
from ..registry import unknown_name_message
from .base import DiffusionJudge, autocast_for, check_autocast
from .sampling import LOSSES, sample_noise, subgrid_positions, timestep_grid

class ClassifierPreset(NamedTuple):
    keep: Tuple[int, ...]     # classes kept after each stage (--to_keep)
    samples: Tuple[int, ...]  # cumulative (t, eps) samples per class at each stage (--n_samples)
    loss: str                 # --loss; eval_prob_adaptive.py's default is l2


# The authors' commands for Stable Diffusion (github.com/diffusion-classifier/diffusion-classifier, commands.md and
# README.md): each data set's schedule and the loss its command passes.
PruningPreset = Literal["cifar10", "pets", "flowers", "stl10", "food", "aircraft", "imagenet", "objectnet"]
PRUNING_PRESETS: Dict[str, ClassifierPreset] = named_by(PruningPreset, {
    "cifar10": ClassifierPreset((5, 1), (50, 500), "l1"),
    "pets": ClassifierPreset((5, 1), (25, 250), "l1"),
    "flowers": ClassifierPreset((20, 10, 5, 1), (20, 50, 100, 500), "l1"),
    "stl10": ClassifierPreset((5, 1), (100, 500), "l1"),
    "food": ClassifierPreset((20, 10, 5, 1), (20, 50, 100, 500), "l2"),
    "aircraft": ClassifierPreset((20, 10, 5, 1), (20, 50, 100, 500), "l2"),
    "imagenet": ClassifierPreset((500, 50, 10, 1), (50, 100, 500, 1000), "l2"),
    "objectnet": ClassifierPreset((25, 10, 5, 1), (50, 100, 500, 1000), "l2"),
})
DEFAULT_PRESET = "cifar10"  # what runs when neither a preset nor a schedule is given


def resolve_loss(preset: Optional[str] = None, samples: Optional[Sequence[int]] = None,
                 loss: Optional[str] = None) -> str:
    """The loss given; else the preset's (the default preset's when no schedule is given either); else l2, the
    authors' script's default, for a schedule given as keep/samples."""
    if loss is None:
        name = DEFAULT_PRESET if preset is None and not samples else preset
        if name is not None and name not in PRUNING_PRESETS:
            raise ValueError(unknown_name_message("pruning preset", name, PRUNING_PRESETS))
        loss = PRUNING_PRESETS[name].loss if name is not None else "l2"
    if loss not in LOSSES:
        raise ValueError(unknown_name_message("denoising loss", loss, LOSSES))
    return loss


def resolve_schedule(preset: Optional[str] = None, keep: Optional[Sequence[int]] = None,
                     samples: Optional[Sequence[int]] = None) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(keep, samples) from a preset name, or given directly; samples without keep means no pruning."""
    if preset is not None:
        if keep or samples:
            raise ValueError("pass either a pruning preset or keep/samples, not both")
        if preset not in PRUNING_PRESETS:
            raise ValueError(unknown_name_message("pruning preset", preset, PRUNING_PRESETS))
        return PRUNING_PRESETS[preset][:2]
    if not samples:
        return PRUNING_PRESETS[DEFAULT_PRESET][:2]
    samples = tuple(int(s) for s in samples)
    keep = tuple(int(k) for k in keep) if keep else (None,) * len(samples)
    if len(keep) != len(samples):
        raise ValueError(f"keep {keep} and samples {samples} need one entry per pruning stage")
    if any(b <= a for a, b in zip(samples, samples[1:])) or samples[0] < 1:
        raise ValueError(f"samples per stage must increase (they are cumulative), got {samples}")
    if any(k is not None and k < 1 for k in keep):
        raise ValueError(f"keep must hold positive class counts, got {keep}")
    return keep, samples


# Fewer held-out images than this give a temperature that is mostly noise: refused rather than fitted.
MIN_CALIBRATION_IMAGES = 10
# The search spans this many e-folds of 1/temperature either side of 1/(spread of the errors); an optimum at an end
# means the likelihood has no finite optimum (see fit_temperature).
SEARCH_HALF_WIDTH = 12.0


def check_calibration_size(n: int) -> None:
    """Refuse a calibration set of n images that is too small to fit a temperature from."""
    if n < MIN_CALIBRATION_IMAGES:
        raise ValueError(f"calibrating the temperature needs at least {MIN_CALIBRATION_IMAGES} labelled held-out "
                         f"images, got {n}; pass more (a few hundred give a stable temperature)")


def fit_temperature(errors: torch.Tensor, labels: torch.Tensor, iterations: int = 100) -> float:
    """The temperature that minimises the NLL of softmax(-errors / temperature) on held-out (errors, labels).

    The NLL is convex in 1/temperature, so a golden-section search over log(1/temperature) finds it. Degenerate
    fits are refused with a ValueError rather than returned: fewer than MIN_CALIBRATION_IMAGES images; every image
    already ranked right (the NLL then keeps falling as the temperature goes to 0, so any "fit" is an arbitrarily
    overconfident one); or an optimum at the end of the search range (errors that carry no information about the
    labels give an infinite temperature).
    """
    errors = errors.detach().double()
    labels = labels.to(errors.device).long()
    if errors.dim() != 2 or labels.shape != errors.shape[:1]:
        raise ValueError(f"errors must be (N, K) and labels (N,), got {tuple(errors.shape)} and {tuple(labels.shape)}")
    n = errors.shape[0]
    check_calibration_size(n)
    if labels.min() < 0 or labels.max() >= errors.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {errors.shape[1] - 1}], got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    true_error = errors.gather(1, labels[:, None])
    others = errors.scatter(1, labels[:, None], float("inf"))
    if bool((true_error < others.min(1, keepdim=True).values).all()):
        raise ValueError(f"all {n} calibration images are classified correctly, so no temperature can be fitted: "
                         "the likelihood keeps improving as the temperature goes to 0 (an arbitrarily confident "
                         "classifier); calibrate on more held-out images, including some the classifier gets wrong")
    z = -(errors - errors.mean(1, keepdim=True))

    def nll(log_scale: float) -> float:
        logits = z * math.exp(log_scale)
        return float((torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None])[:, 0]).mean())

    spread = float(z.std().clamp_min(1e-12))
    lo, hi = -math.log(spread) - SEARCH_HALF_WIDTH, -math.log(spread) + SEARCH_HALF_WIDTH
    bounds = lo, hi
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    best = (lo + hi) / 2
    if min(best - bounds[0], bounds[1] - best) < 1e-2:
        raise ValueError(f"the temperature fit on {n} images ran to the end of its range "
                         f"(temperature {math.exp(-best):.3g}): the errors carry almost no information about these "
                         "labels; check that the labels index the classifier's classes in its order "
                         "(model.class_names), and calibrate on more held-out images")
    return math.exp(-best)


# The DiffusionClassifier arguments a config or a `diffusion:` model name may set (the rest is the judge's).
CLASSIFIER_OPTIONS = ("preset", "keep", "samples", "loss", "temperature", "micro_batch", "n_trials", "seed",
                      "autocast")


class DiffusionClassifier(nn.Module):
    """A zero-shot classifier from a diffusion judge: [0, 1] images (B, C, H, W) -> (B, K) logits."""

    def __init__(self, judge: DiffusionJudge, preset: Optional[str] = None, keep: Optional[Sequence[int]] = None,
                 samples: Optional[Sequence[int]] = None, loss: Optional[str] = None, temperature: float = 1.0,
                 micro_batch: int = 32, n_trials: int = 1, seed: Optional[int] = None, autocast: Any = "auto"):
        super().__init__()
        if judge.conditioning not in ("class", "text"):
            raise ValueError(f"the Diffusion Classifier needs a class- or text-conditioned judge, got a "
                             f"{judge.conditioning}-conditioned {judge.kind!r} one")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if micro_batch < 1 or n_trials < 1:
            raise ValueError("micro_batch and n_trials must be positive")
        self.judge = judge
        self.keep, self.samples = resolve_schedule(preset, keep, samples)
        timestep_grid(judge.num_train_timesteps, max(self.samples))  # fail early on an impossible grid
        self.loss = resolve_loss(preset, samples, loss)  # a preset brings its command's loss unless one is given
        self.temperature = float(temperature)
        self.micro_batch = int(micro_batch)
        self.n_trials = int(n_trials)
        self.seed = seed
        self.autocast = check_autocast(autocast)

    @property
    def class_names(self):
        return self.judge.class_names

    @property
    def num_classes(self) -> int:
        if self.judge.num_classes is None:
            raise ValueError("the judge has no classes; call judge.set_class_names(names) first")
        return self.judge.num_classes

    backend = property(lambda self: self.judge)  # deprecated alias, kept for existing code

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return -self.errors(images) / self.temperature

    @torch.no_grad()
    def errors(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K) estimated denoising error per class (paired estimates for pruned classes, see the module doc)."""
        device = self.judge.alphas_cumprod.device
        generator = torch.Generator(device=device).manual_seed(self.seed) if self.seed is not None else None
        with autocast_for(device, self.autocast):
            x0 = self.judge.encode(images.to(device))  # once per image, for every class and timestep
            return torch.stack([self._errors_one(x0[i:i + 1], generator) for i in range(x0.shape[0])]).float()

    def _errors_one(self, x0: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        judge, K, trials = self.judge, self.num_classes, self.n_trials
        grid = timestep_grid(judge.num_train_timesteps, max(self.samples))
        # One noise per (grid position, trial), shared by every class: the variance reduction of the paper.
        noise = sample_noise(1, len(grid) * trials, x0.shape[1:], "independent", generator, x0.device, x0.dtype)[0]
        errors = torch.full((K, len(grid) * trials), float("nan"), device=x0.device)
        remaining = list(range(K))
        evaluated: list = []
        stage_columns = []  # cumulative evaluated columns after each stage
        dropped_at: Dict[int, int] = {}
        for stage, (n, keep) in enumerate(zip(self.samples, self.keep)):
            new = [p for p in subgrid_positions(len(grid), n) if p not in evaluated]
            jobs = [(c, p * trials + r) for c in remaining for p in new for r in range(trials)]
            self._evaluate(x0, grid, trials, noise, jobs, errors)
            evaluated += new
            cols = torch.tensor([p * trials + r for p in evaluated for r in range(trials)], device=x0.device)
            stage_columns.append(cols)
            means = errors[remaining][:, cols].mean(1)
            k = len(remaining) if keep is None else min(keep, len(remaining))
            order = torch.argsort(means, stable=True).tolist()
            for i in order[k:]:
                dropped_at[remaining[i]] = stage
            remaining = [remaining[i] for i in order[:k]]
        final = stage_columns[-1]
        winner = remaining[0]
        out = torch.empty(K, device=x0.device)
        out[remaining] = errors[remaining][:, final].mean(1)
        for c, stage in dropped_at.items():
            cols = stage_columns[stage]
            out[c] = out[winner] + errors[c, cols].mean() - errors[winner, cols].mean()
        return out

    def _evaluate(self, x0, grid, trials, noise, jobs, errors) -> None:
        judge = self.judge
        for i in range(0, len(jobs), self.micro_batch):
            chunk = jobs[i:i + self.micro_batch]
            classes = torch.tensor([c for c, _ in chunk], device=x0.device)
            columns = torch.tensor([col for _, col in chunk], device=x0.device)
            t = torch.tensor([grid[col // trials] for _, col in chunk], device=x0.device)
            err = judge.denoising_error(x0.expand(len(chunk), *x0.shape[1:]), judge.class_condition(classes),
                                        t, noise[columns], self.loss)
            errors[classes, columns] = err.float()

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> float:
        """Fit and set the temperature on held-out labelled images; returns it. A degenerate fit (too few images,
        or all of them right) is refused with a ValueError and leaves the temperature as it was (fit_temperature)."""
        labels = torch.as_tensor(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"calibrate needs one label per image: {len(images)} images, labels of shape "
                             f"{tuple(labels.shape)}")
        check_calibration_size(len(images))  # before the costly scoring
        errors = torch.cat([self.errors(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        self.temperature = fit_temperature(errors, labels)
        return self.temperature

    def extra_repr(self) -> str:
        return (f"keep={self.keep}, samples={self.samples}, loss={self.loss}, temperature={self.temperature:.4g}, "
                f"micro_batch={self.micro_batch}, n_trials={self.n_trials}")
