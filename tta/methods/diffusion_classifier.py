"""diffusion_classifier: zero-shot classification with a diffusion model (Li et al., ICCV 2023, arXiv:2303.16203).

Predicts argmin_c E_{t,eps} || eps_theta(x_t, t, c) - eps || with the same noise for every class at a
timestep, timesteps on an evenly spaced grid and adaptive multi-stage pruning of classes. Logits are
-error / temperature; fit the temperature on held-out data (`model.calibrate(images, labels)` on the model the
`diffusion:` source returns, DiffusionClassifierModel) for calibrated probabilities.

Defaults and presets follow the authors' commands (github.com/diffusion-classifier/diffusion-classifier,
commands.md, run with eval_prob_adaptive.py): `preset` names a data set and sets its pruning schedule and its
loss (cifar10, pets, flowers, stl10 pass --loss l1; food, aircraft, imagenet, objectnet use the script's l2;
tta.generative.PRUNING_PRESETS); a `loss` given explicitly wins. Without a preset or a schedule the cifar10 preset
runs (l1); a schedule given as keep/samples without a loss uses l2, the script's default. Precision: the script
runs Stable Diffusion in float16 by default (--dtype float16); the closest setting here is autocast="auto" (bf16
on CUDA, float32 on the CPU), the default; autocast="off" is its --dtype float32.
Known difference: the authors give each data set its own prompt file (prompts/<dataset>_prompts.csv, e.g.
"a blurry photo of a {}." for CIFAR-10, "a photo of a {}, a type of pet." for Pets, "a photo of {}, a type of
food." for Food-101, and class names written for the prompts); a Stable Diffusion judge here builds every class's
prompt from one template (the judge's `prompt` option, default "a photo of a {}."). Pass that data set's
template as `prompt` to match the authors' prompts; their per-class names and several prompts per class are not
reproduced.

Two faces of one scorer (tta.generative.classifier.DiffusionClassifier):
- a model source (tta.generative.classifier_model), `tta.create_model("diffusion:<kind>@<folder or hub id>")`,
  an nn.Module from [0, 1] images to (B, K) logits;
- a method for comparisons, `tta.create_adapter("diffusion_classifier", model, judge=...)`: it ignores the
  wrapped discriminative model's prediction (it only borrows its class names, for text-conditioned judges)
  and has no trainable parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, List, Optional, Tuple

import torch
from annotated_types import Interval
from torch import nn

from ..adapter import AdapterConfig, register_adapter
from ..config import MAX_PAIRS, Pairs, Positive, Seed, Steps
from ..generative.base import AutocastSetting, check_autocast
from ..generative.classifier import (CLASSIFIER_OPTIONS, DiffusionClassifier, PruningPreset, resolve_loss,
                                     resolve_schedule)
from ..generative.sampling import Loss
from .judged import JudgedAdapter


@dataclass
class DiffusionClassifierConfig(AdapterConfig):
    steps: Steps = 0                       # nothing adapts
    judge: Optional[str] = None            # "<kind>:<hub id or folder>" or a folder, loaded with create_judge
    preset: Optional[PruningPreset] = None  # a data set of PRUNING_PRESETS: its keep/samples per stage and its loss
    # classes kept after each stage (default: the cifar10 preset)
    keep: Optional[Tuple[Annotated[int, Interval(ge=1, le=1_000_000)], ...]] = None
    samples: Optional[Tuple[Pairs, ...]] = None  # cumulative (t, eps) samples per class at each stage
    loss: Optional[Loss] = None            # None: the preset's (cifar10's without a schedule), else l2
    temperature: Positive = 1.0            # logits = -error / temperature; fit it with calibrate()
    micro_batch: Annotated[int, Interval(ge=1, le=MAX_PAIRS)] = 32  # judge evaluations per forward pass
    n_trials: Annotated[int, Interval(ge=1, le=1000)] = 1  # noises per timestep: multiplies the judge's work
    seed: Optional[Seed] = None            # seed of the shared noise; None uses torch's global generator
    autocast: AutocastSetting = "auto"     # judge precision: auto (bf16 on CUDA) | bf16 (also native-bf16 CPUs) | off

    def __post_init__(self):
        super().__post_init__()
        self.keep = tuple(self.keep) if self.keep is not None else None
        self.samples = tuple(self.samples) if self.samples is not None else None
        resolve_schedule(self.preset, self.keep, self.samples)
        self.loss = resolve_loss(self.preset, self.samples, self.loss)  # recorded as run, in every result row
        self.autocast = check_autocast(self.autocast)


@register_adapter("diffusion_classifier")
class DiffusionClassifierAdapter(JudgedAdapter):
    Config = DiffusionClassifierConfig
    one_example_per_call = True  # it scores image by image anyway
    judge_prefix = "classifier."

    @classmethod
    def judge_module(cls, judge: nn.Module, config: DiffusionClassifierConfig) -> nn.Module:
        return DiffusionClassifier(judge, **{k: getattr(config, k) for k in CLASSIFIER_OPTIONS})

    def collect_params(self) -> List:
        return []

    def adapt_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier(x)
