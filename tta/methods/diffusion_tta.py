"""diffusion_tta: test-time adaptation of discriminative models with diffusion feedback
(Prabhudesai et al., NeurIPS 2023, arXiv:2311.16102).

Adapts f on each test image by minimising the denoising loss of a conditional diffusion judge whose condition
is computed from f's output:  E_{t,eps} || eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c) - eps ||^2 with
c = judge.condition(softmax(f(x))) (soft class weights; the per-pixel softmax or the depth map for dense
tasks), so the gradient reaches f through the condition. x0 is the image (pixel judges) or its VAE latent,
encoded once. Builds on tta.generative (the judges and the (t, eps) sampling).

Defaults are the official code's DiT configuration (github.com/mihirp1998/Diffusion-TTA, preset "official-dit":
diff_tta/config/config.yaml with experiment/dit.yaml): per example (episodic), 5 SGD steps (lr 5e-3, momentum 0.9)
of 180 (t, eps) pairs each (input.batch_size 15 x accum_iter 12), t uniform over [0, T), in micro-batches of 15
with gradient accumulation, float32 throughout (the official code never autocasts), and:
- the classifier adapts all but its last layer (adapt="all_but_last"): config.yaml sets freeze_class_embeds: True,
  and build.py load_optimizer then gives the optimizer every leaf module but the last (for CLIP: all but the
  zero-shot head). adapt="all" adapts the last layer too;
- the judge's denoiser adapts with the classifier, at the same learning rate (adapt_judge=True): dit.yaml sets
  adapt_only_classifier: False, and the official README says both models' weights are updated. It is restored
  after every image, as the official loop reloads the whole state dict.
Other named settings (the `preset` field; a field given explicitly overrides its preset's value):
"official-dit-adam" is the README's commands for ResNet-18 and ConvNeXt-Tiny (optimizer adam, which build.py
makes torch.optim.AdamW with weight_decay 0, lr 1e-5); "official-sd" is experiment/sd.yaml, the CLIP runs with
Stable Diffusion (judge frozen, adapt_only_classifier: True; 16 x 12 = 192 pairs per step); "classifier-only" is
"official-dit" with the judge frozen. The paper's CLIP runs are described with LoRA on q/v (adapt="lora"); the
released code adapts the image tower as above.

Gradient accumulation without repeated classifier passes: the classifier runs once per step, the judge's
gradient is accumulated on a detached copy of the condition over the micro-batches, and one backward pass
carries it into the classifier. By the chain rule this is the same gradient as the paper's, which re-runs the
classifier in every micro-step.

Speed and memory (all off by default, so the paper's structure and float32 numbers are what runs unless asked):
micro_batch=0 sizes micro-batches from free memory (tta.generative.memory); autocast="auto" runs the judge in bf16
on CUDA and autocast="bf16" also on CPUs with native bf16 (the default "off" is the official float32); channels_last,
compile and checkpointing act on the judge's denoiser (DiffusionJudge.use_fast_paths); per_example=True adapts
every image of a batch on its own parameter copy at once (torch.func), the same as one episodic run per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple

import torch
from annotated_types import Interval, doc
from torch import nn

from ..adapter import AdapterConfig, Optimizer, register_adapter
from ..config import MAX_PAIRS, Fraction, NonNegative, Pairs, Rate, Seed, Steps, fill_from_preset
from ..generative.base import AutocastSetting, autocast_for, check_autocast
from ..generative.loading import condition_weights
from ..generative.memory import MicroBatchSizer
from ..generative.sampling import Loss, NoiseMode, TimestepMode, sample_pairs
from ..lora import LoRASet
from ..models.wrapper import ImageModel
from ..params import all_but_last_parameters, enable_adapted  # noqa: F401  (tests import it from here)
from ..per_example import adapt_per_example
from .judged import JudgedAdapter, device_of

Adapt = Literal["all_but_last", "all", "norm", "last", "lora"]
Preset = Literal["official-dit", "official-dit-adam", "official-sd", "classifier-only"]
# Named settings, each one official configuration; a preset fills only the fields the user left unset (None).
_DIT = {"optimizer": "sgd", "lr": 5e-3, "pairs": 180, "micro_batch": 15, "adapt_judge": True}
PRESETS: Dict[str, Dict[str, Any]] = {
    "official-dit": _DIT,                                                # experiment/dit.yaml (the default)
    "official-dit-adam": {**_DIT, "optimizer": "adamw", "lr": 1e-5},     # README: ResNet-18 / ConvNeXt-Tiny runs
    "official-sd": {**_DIT, "pairs": 192, "micro_batch": 16, "adapt_judge": False},  # experiment/sd.yaml (CLIP)
    "classifier-only": {**_DIT, "adapt_judge": False},                   # official-dit with the judge frozen
}


@dataclass
class DiffusionTTAConfig(AdapterConfig):
    preset: Preset = "official-dit"
    steps: Steps = 5
    episodic: bool = True
    optimizer: Optional[Optimizer] = None  # None: the preset's (sgd; adamw for official-dit-adam)
    lr: Optional[Rate] = None          # None: the preset's (5e-3; 1e-5 for official-dit-adam)
    momentum: Fraction = 0.9
    judge: Optional[str] = None        # "<kind>:<hub id or folder>" or a folder, loaded with create_judge
    pairs: Optional[Pairs] = None      # (t, eps) pairs per optimizer step; None: the preset's (180; 192 for SD)
    # pairs per accumulation micro-step (per image); 0: sized from free memory
    micro_batch: Optional[Annotated[int, Interval(ge=0, le=MAX_PAIRS), doc("0: sized from free memory")]] = None
    # micro_batch=0: at most this much for the judge's activations
    memory_gb: Optional[Annotated[float, Interval(gt=0, le=1e6), doc("or null: half the free memory")]] = None
    timesteps: TimestepMode = "uniform"
    noise: NoiseMode = "independent"   # shared: one eps for all pairs of a step
    loss: Loss = "l2"
    adapt: Adapt = "all_but_last"
    last_layer: Optional[str] = None   # the module adapt="last" adapts and adapt="all_but_last" leaves out
    lora_rank: Annotated[int, Interval(ge=1, le=4096)] = 8
    lora_alpha: NonNegative = 8.0
    adapt_judge: Optional[bool] = None  # also adapt the judge's denoiser (restored after every episode); None: preset
    judge_lr: Optional[Rate] = None    # the denoiser's learning rate (default: lr)
    seed: Optional[Seed] = None        # seed of the (t, eps) draws; None uses torch's global generator
    per_example: bool = False          # episodic: every image of a batch adapts its own copy, all at once
    autocast: AutocastSetting = "off"  # judge precision: off (float32, as official) | auto (bf16 on CUDA) | bf16
    channels_last: bool = False        # the judge's convolutions in NHWC
    compile: bool = False              # torch.compile the judge's denoiser
    checkpointing: bool = False        # recompute the judge's activations in backward (less memory)

    def __post_init__(self):
        fill_from_preset(self, PRESETS)  # before validation, so preset values are checked too
        super().__post_init__()
        self.autocast = check_autocast(self.autocast)
        if self.per_example and (not self.episodic or self.adapt_judge):
            raise ValueError("per_example adapts a copy of the model per image and drops it after the call: it needs "
                             "episodic=True and a frozen judge: adapt_judge=False, or preset 'classifier-only' "
                             "(the default preset, 'official-dit', adapts the judge)")


# ---- the adapter ---------------------------------------------------------------------------------------------
@register_adapter("diffusion_tta")
class DiffusionTTA(JudgedAdapter):
    Config = DiffusionTTAConfig
    records_steps = True

    @property
    def one_example_per_call(self) -> bool:
        # The paper adapts per image; per_example gives every image of a batch its own copy at once, which is faster.
        return not self.cfg.per_example

    def __init__(self, model: nn.Module, cfg: Any = None, judge: Any = None, **overrides):
        super().__init__(model, cfg, judge, **overrides)
        self._generator = None
        if self.cfg.seed is not None:
            device = device_of(self.judge) or torch.device("cpu")
            self._generator = torch.Generator(device=device).manual_seed(self.cfg.seed)
        self._x0 = None  # the encoded images of the current call, for every step
        self.last_loss: Optional[float] = None
        self.last_losses: Optional[torch.Tensor] = None  # per image, of the last step
        self.micro_batch_used: Optional[int] = None  # the micro-batch of the last step (sized when micro_batch=0)
        self.micro_batch_sizer = MicroBatchSizer()

    # ---- what adapts -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()  # eval mode: per-example batches cannot give batch statistics
        self.freeze_judge()  # but for its denoiser with adapt_judge (JudgedAdapter)
        self.judge.use_fast_paths(self.cfg.channels_last, self.cfg.compile, self.cfg.checkpointing)
        if self.cfg.adapt == "lora":
            self.lora = LoRASet(self.model, self.cfg.lora_rank, self.cfg.lora_alpha)
        else:
            enable_adapted(self.model, self.cfg.adapt, self.cfg.last_layer)

    def collect_params(self) -> List[Tuple[str, nn.Parameter]]:
        own = [(f"lora.{n}", p) for n, p in self.lora.named_parameters()] if self.cfg.adapt == "lora" else \
            super().collect_params()
        return own + self.judge_params()  # the judge's denoiser with adapt_judge, at judge_lr (JudgedAdapter)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The (adapted) model's output; with LoRA the low-rank updates are applied on the fly."""
        return self.lora(self.model, x) if self.cfg.adapt == "lora" else self.model(x)

    # ---- the loss ------------------------------------------------------------------------------------------------
    def compute_gradients(self, x: torch.Tensor, x0: Optional[torch.Tensor] = None,
                          predict=None) -> torch.Tensor:
        """Accumulate the gradient of one step's loss (mean over images and `pairs` (t, eps) pairs) into the
        adapted parameters without applying it; returns the model's outputs. With `predict` (per-example copies
        of the parameters, see adapt_per_example) the loss is the sum over images of each image's mean, so every
        copy gets the gradient it would get alone."""
        judge, cfg = self.judge, self.cfg
        device = judge.alphas_cumprod.device
        if x0 is None:
            x0 = judge.encode(x.to(device))
        outputs = (predict or self.predict)(x)
        with autocast_for(device, cfg.autocast):
            cond = judge.condition(condition_weights(self.model, judge, outputs, self.name).to(device))
        # The judge's gradient is gathered on a detached condition, micro-batch by micro-batch, then carried into
        # the model in one backward pass (see the module doc).
        cond_leaf = cond.detach().requires_grad_(True)
        b, n = x0.shape[0], cfg.pairs
        t, noise = sample_pairs(x0, n, judge.num_train_timesteps, cfg.timesteps, cfg.noise, self._generator)

        def judge_error(start: int, m: int) -> torch.Tensor:
            with autocast_for(device, cfg.autocast):
                return judge.denoising_error(x0.repeat_interleave(m, 0), cond_leaf.repeat_interleave(m, 0),
                                             t[:, start:start + m].reshape(-1),
                                             noise[:, start:start + m].reshape(b * m, *x0.shape[1:]), cfg.loss)

        def one_image(m: int) -> torch.Tensor:  # m passes of the first image: what sizing measures
            with autocast_for(device, cfg.autocast):
                return judge.denoising_error(x0[:1].expand(m, *x0.shape[1:]), cond_leaf[:1].expand(m, -1),
                                             t[0, :m], noise[0, :m], cfg.loss)
        micro = self.micro_batch_used = self.micro_batch_sizer(cfg.micro_batch, n, tuple(x0.shape), one_image, device,
                                                               cfg.memory_gb)
        per_image = torch.zeros(b, device=device)
        images = 1 if predict is not None else b
        for start in range(0, n, micro):
            m = min(micro, n - start)
            err = judge_error(start, m)
            (err.sum() / (images * n)).backward()
            per_image += err.detach().float().view(b, m).sum(1)  # pairs are image-major (repeat_interleave)
        if cond.requires_grad:
            cond.backward(cond_leaf.grad.to(cond.dtype))
        self.last_losses = per_image / n
        self.last_loss = float(per_image.sum() / (b * n))
        return outputs

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.compute_gradients(x, self._x0)
        self.step_guarded(self.last_loss)
        return outputs

    def adapt_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.steps == 0:
            with torch.no_grad():
                outputs = self.predict(x)
            if self.outputs_by_step is not None:
                self.outputs_by_step.append(outputs)
            return outputs
        if self.cfg.per_example and x.shape[0] > 1:
            if self.outputs_by_step is not None:
                raise ValueError("diffusion_tta: per_example adapts every image at once and cannot report each "
                                 "step's outputs; set per_example: false to record steps")
            return self.adapt_per_example(x)
        with torch.no_grad():
            self._x0 = self.judge.encode(x.to(self.judge.alphas_cumprod.device))  # once per image
        log = self.outputs_by_step
        try:
            with torch.enable_grad():  # adapt even when called under torch.no_grad()
                for _ in range(self.cfg.steps):
                    outputs = self.forward_and_adapt(x)  # computed before this step's update
                    if log is not None:
                        log.append(outputs.detach())
        finally:
            self._x0 = None
        outputs = self.predict_guarded(lambda: self.predict(x))  # the adapted model's prediction, as in the paper
        if log is not None:
            log.append(outputs)
        return outputs

    def adapt_per_example(self, x: torch.Tensor) -> torch.Tensor:
        """Every image of the batch adapted episodically on its own copy of the adapted parameters (of the LoRA
        updates with adapt="lora"), in one pass (tta.per_example): the judge sees all images' pairs together."""
        with torch.no_grad():
            x0 = self.judge.encode(x.to(self.judge.alphas_cumprod.device))

        def step(predict):
            self.compute_gradients(x, x0, predict=predict)
            return self.last_losses
        lora = self.cfg.adapt == "lora"
        # The adapter checked the whole batch; ImageModel's own checks branch on values, which vmap cannot do.
        unchecked = {"check": False} if isinstance(self.model, ImageModel) else {}
        return adapt_per_example(self, x, step, self.lora if lora else self.model, self.predict,
                                 lead=(self.model,) if lora else (), call_kwargs=unchecked)
