"""diffusion_tta: test-time adaptation of discriminative models with diffusion feedback
(Prabhudesai et al., NeurIPS 2023, arXiv:2311.16102).

Adapts f on each test image by minimising the denoising loss of a conditional diffusion judge whose condition
is computed from f's output:  E_{t,eps} || eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c) - eps ||^2 with
c = backend.condition(softmax(f(x))) (soft class weights; the per-pixel softmax or the depth map for dense
tasks), so the gradient reaches f through the condition. x0 is the image (pixel judges) or its VAE latent,
encoded once. Builds on tta.generative (the judges and the (t, eps) sampling).

Defaults are the official code's DiT configuration (github.com/mihirp1998/Diffusion-TTA, preset "official-dit":
diff_tta/config/config.yaml with experiment/dit.yaml): per example (episodic), 5 SGD steps (lr 5e-3, momentum 0.9)
of 180 (t, eps) pairs each (input.batch_size 15 x accum_iter 12), t uniform over [0, T), in micro-batches of 15
with gradient accumulation, float32 throughout (the official code never autocasts), and:
- the classifier adapts all but its last layer (adapt="all_but_last"): config.yaml sets freeze_class_embeds: True,
  and build.py load_optimizer then gives the optimizer every leaf module but the last (for CLIP: all but the
  zero-shot head). adapt="all" adapts the last layer too;
- the judge's denoiser adapts with the classifier, at the same learning rate (adapt_backend=True): dit.yaml sets
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
compile and checkpointing act on the judge's denoiser (DiffusionBackend.use_fast_paths); per_example=True adapts
every image of a batch on its own parameter copy at once (torch.func), the same as one episodic run per image.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Annotated, Any, Dict, List, Optional, Tuple, Union

import torch
from annotated_types import Interval, doc
from torch import nn

from ..adapter import (Adapter, AdapterConfig, check_step_fits, explosion_limit, finite_and_largest,
                       register_adapter)
from ..config import MAX_PAIRS, Fraction, NonNegative, Pairs, Rate, Seed, Steps, make_config
from ..generative.base import autocast_for, check_autocast, denoiser_prefix, named_denoiser_parameters
from ..generative.loading import match_backend_to_model, model_task, resolve_backend
from ..generative.memory import micro_batch_from_memory
from ..generative.sampling import LOSSES, NOISE_MODES, TIMESTEP_MODES, sample_pairs
from ..models.wrapper import ImageModel
from ..params import enable_norm_affine
from ..registry import unknown_name_message

ADAPT_CHOICES = ("all_but_last", "all", "norm", "last", "lora")
# Named settings, each one official configuration; a preset fills only the fields the user left unset (None).
_DIT = {"optimizer": "sgd", "lr": 5e-3, "pairs": 180, "micro_batch": 15, "adapt_backend": True}
PRESETS: Dict[str, Dict[str, Any]] = {
    "official-dit": _DIT,                                                # experiment/dit.yaml (the default)
    "official-dit-adam": {**_DIT, "optimizer": "adamw", "lr": 1e-5},     # README: ResNet-18 / ConvNeXt-Tiny runs
    "official-sd": {**_DIT, "pairs": 192, "micro_batch": 16, "adapt_backend": False},  # experiment/sd.yaml (CLIP)
    "classifier-only": {**_DIT, "adapt_backend": False},                 # official-dit with the judge frozen
}


@dataclass
class DiffusionTTAConfig(AdapterConfig):
    preset: str = "official-dit"       # official-dit | official-dit-adam | official-sd | classifier-only
    steps: Steps = 5
    episodic: bool = True
    optimizer: Optional[str] = None    # None: the preset's (sgd; adamw for official-dit-adam)
    lr: Optional[Rate] = None          # None: the preset's (5e-3; 1e-5 for official-dit-adam)
    momentum: Fraction = 0.9
    backend: Optional[str] = None      # "<kind>:<hub id or folder>" or a folder, loaded with create_backend
    pairs: Optional[Pairs] = None      # (t, eps) pairs per optimizer step; None: the preset's (180; 192 for SD)
    # pairs per accumulation micro-step (per image); 0: sized from free memory
    micro_batch: Optional[Annotated[int, Interval(ge=0, le=MAX_PAIRS), doc("0: sized from free memory")]] = None
    # micro_batch=0: at most this much for the judge's activations
    memory_gb: Optional[Annotated[float, Interval(gt=0, le=1e6), doc("or null: half the free memory")]] = None
    timesteps: str = "uniform"         # uniform | stratified | grid
    noise: str = "independent"         # independent | shared (one eps for all pairs of a step)
    loss: str = "l2"                   # l2 | l1
    adapt: str = "all_but_last"        # all_but_last | all | norm | last | lora
    last_layer: Optional[str] = None   # the module adapt="last" adapts and adapt="all_but_last" leaves out
    lora_rank: Annotated[int, Interval(ge=1, le=4096)] = 8
    lora_alpha: NonNegative = 8.0
    adapt_backend: Optional[bool] = None  # also adapt the judge's denoiser (restored after every episode); None: preset
    backend_lr: Optional[Rate] = None  # the denoiser's learning rate (default: lr)
    seed: Optional[Seed] = None        # seed of the (t, eps) draws; None uses torch's global generator
    per_example: bool = False          # episodic: every image of a batch adapts its own copy, all at once
    autocast: Union[bool, str] = "off"  # judge precision: off (float32, as official) | auto (bf16 on CUDA) | bf16
    channels_last: bool = False        # the judge's convolutions in NHWC
    compile: bool = False              # torch.compile the judge's denoiser
    checkpointing: bool = False        # recompute the judge's activations in backward (less memory)

    def __post_init__(self):
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise ValueError(unknown_name_message("preset", self.preset, PRESETS))
        for name, value in PRESETS[self.preset].items():  # before validation, so preset values are checked too
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()
        for name, value, valid in (("adapt", self.adapt, ADAPT_CHOICES), ("timesteps", self.timesteps, TIMESTEP_MODES),
                                   ("noise", self.noise, NOISE_MODES), ("loss", self.loss, LOSSES)):
            if value not in valid:
                raise ValueError(unknown_name_message(name, value, valid))
        self.autocast = check_autocast(self.autocast)
        if self.per_example and (not self.episodic or self.adapt_backend):
            raise ValueError("per_example adapts a copy of the model per image and drops it after the call: it needs "
                             "episodic=True and a frozen judge: adapt_backend=False, or preset 'classifier-only' "
                             "(the default preset, 'official-dit', adapts the judge)")


# ---- LoRA: low-rank updates of attention q/v projections, applied without changing the model --------------
class LoRA(nn.Module):
    """delta = B @ A * alpha / rank on row blocks of one weight matrix (B starts at zero: delta starts at 0)."""

    def __init__(self, weight: torch.Tensor, row_blocks: List[Tuple[int, int]], rank: int, alpha: float):
        super().__init__()
        self.row_blocks = row_blocks
        self.scale = alpha / rank
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for r0, r1 in row_blocks:
            a = torch.empty(rank, weight.shape[1], dtype=weight.dtype, device=weight.device)
            nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # as peft and the LoRA paper's code
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(r1 - r0, rank, dtype=weight.dtype, device=weight.device)))

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        pieces, row = [], 0
        for (r0, r1), a, b in zip(self.row_blocks, self.A, self.B):
            if r0 > row:
                pieces.append(weight.new_zeros(r0 - row, weight.shape[1]))
            pieces.append(b @ a * self.scale)
            row = r1
        if row < weight.shape[0]:
            pieces.append(weight.new_zeros(weight.shape[0] - row, weight.shape[1]))
        return torch.cat(pieces)


def lora_targets(model: nn.Module) -> Dict[str, List[Tuple[int, int]]]:
    """Attention query and value projections: packed (nn.MultiheadAttention, timm's qkv) or separate layers."""
    targets: Dict[str, List[Tuple[int, int]]] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention):
            e = m.embed_dim
            if m.in_proj_weight is not None:
                targets[prefix + "in_proj_weight"] = [(0, e), (2 * e, 3 * e)]
            else:
                targets[prefix + "q_proj_weight"] = [(0, m.q_proj_weight.shape[0])]
                targets[prefix + "v_proj_weight"] = [(0, m.v_proj_weight.shape[0])]
        elif isinstance(m, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "qkv" and m.out_features % 3 == 0:
                e = m.out_features // 3
                targets[prefix + "weight"] = [(0, e), (2 * e, 3 * e)]
            elif leaf in ("q", "v", "q_proj", "v_proj", "query", "value", "to_q", "to_v"):
                targets[prefix + "weight"] = [(0, m.out_features)]
    return targets


class LoRASet(nn.Module):
    """LoRA updates for a model, applied through torch.func.functional_call: the model itself is never modified,
    so its state dict stays the source's and reset only has to zero these parameters' updates."""

    def __init__(self, model: nn.Module, rank: int, alpha: float):
        super().__init__()
        targets = lora_targets(model)
        if not targets:
            raise ValueError("adapt='lora' adapts attention q/v projections and this model has none; "
                             "use adapt='all', 'norm' or 'last'")
        params = dict(model.named_parameters())
        self.names = sorted(targets)
        self.updates = nn.ModuleList(LoRA(params[n], targets[n], rank, alpha) for n in self.names)

    def forward(self, model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        params = dict(model.named_parameters())
        merged = {n: params[n] + lora.delta(params[n]) for n, lora in zip(self.names, self.updates)}
        return torch.func.functional_call(model, merged, (x,), kwargs)


def last_layer_parameters(model: nn.Module, name: Optional[str] = None) -> List[Tuple[str, nn.Parameter]]:
    """The final prediction layer: the projection of a CLIP zero-shot image tower, else the last Linear/Conv."""
    modules = dict(model.named_modules())
    if name is None:
        for mname, m in modules.items():
            proj = getattr(getattr(m, "visual", None), "proj", None)
            if hasattr(m, "text_embeddings") and isinstance(proj, nn.Parameter):
                return [(f"{mname}.visual.proj".lstrip("."), proj)]
        layers = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if not layers:
            raise ValueError("adapt='last' found no Linear or Conv layer; name one with last_layer=<module name>")
        name = layers[-1]
    if name not in modules:
        raise ValueError(unknown_name_message("module", name, [n for n in modules if n]))
    prefix = f"{name}." if name else ""
    return [(prefix + n, p) for n, p in modules[name].named_parameters()]


def all_but_last_parameters(model: nn.Module, name: Optional[str] = None) -> List[Tuple[str, nn.Parameter]]:
    """What the official Diffusion-TTA code adapts (diff_tta/models/build.py, load_optimizer with
    freeze_class_embeds: True): the parameters of every leaf module (a module without children) except the last
    one in registration order, which for the torchvision ResNets, ViTs and ConvNeXts it runs is the classification
    layer. Parameters held by a module that has children are in no leaf and stay fixed there, so here too: a ViT's
    class token and position embedding, ConvNeXt's layer scales, nn.MultiheadAttention's packed q/k/v projection.
    The last leaf is the last one that holds parameters (the same on those models); `name` picks the left-out
    module instead. A CLIP zero-shot model's last layer is its fixed text head (the official final_fc), a buffer
    here, so every leaf of its image tower adapts, as there."""
    modules = dict(model.named_modules())
    if name is not None and name not in modules:
        raise ValueError(unknown_name_message("module", name, [n for n in modules if n]))
    leaves = [(n, m) for n, m in modules.items()
              if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None]
    clip_head = any(hasattr(m, "text_embeddings") and hasattr(m, "visual") for m in modules.values())
    if name is not None:
        left_out = {id(p) for p in modules[name].parameters()}
    elif clip_head:
        left_out = set()
    elif leaves:
        left_out = {id(p) for p in leaves[-1][1].parameters()}
    else:
        raise ValueError("adapt='all_but_last' found no module holding parameters; use adapt='all'")
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = {id(p): p for _, m in leaves for p in m.parameters(recurse=False) if id(p) not in left_out}
    return [(names[i], p) for i, p in chosen.items()]


# ---- the adapter ---------------------------------------------------------------------------------------------
class JudgedAdapter(Adapter):
    """An Adapter with a diffusion judge under `judge_prefix`. The judge is a submodule (it moves with .to()), but
    only the parts of it that adapt are snapshotted and restored: a frozen DiT or SD judge is never copied, and an
    adapted one has its denoiser copied, not its VAE or text encoder."""
    judge_prefix = "backend."

    def adapted_judge_prefixes(self) -> Tuple[str, ...]:
        return ()

    @classmethod
    def load_judge(cls, model: nn.Module, cfg: Any, backend: Any, overrides: Dict[str, Any]):
        """(config, judge): the judge from a backend= object, a backend= string or the config's `backend` field,
        checked against the model; the config records where the judge came from, so result rows say it."""
        config = make_config(cls.Config, cfg, overrides)
        if isinstance(backend, (str, os.PathLike)):  # a string is the config field; an object is used as it is
            config, backend = dataclasses.replace(config, backend=os.fspath(backend)), None
        judge = resolve_backend(backend, config.backend, cls.name, device=_device_of(model))
        if config.backend is None:
            config = dataclasses.replace(config, backend=judge.source)
        match_backend_to_model(model, judge, cls.name)
        return config, judge

    def _capture_state(self) -> Dict[str, Any]:
        keep = self.adapted_judge_prefixes()
        module_state = {k: v.detach().clone() for k, v in self.state_dict().items()
                        if not k.startswith(self.judge_prefix) or k.startswith(keep)}
        optim_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        return {"module": module_state, "optimizer": optim_state}

    def reset(self) -> None:
        missing, unexpected = self.load_state_dict(self._source_state["module"], strict=False)
        missing = [k for k in missing if not k.startswith(self.judge_prefix)]
        if missing or unexpected:
            raise RuntimeError(f"reset() found a changed module structure: missing {missing}, unexpected {unexpected}")
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._source_state["optimizer"]))
        self.reset_extra_state()


def _device_of(model: nn.Module) -> Optional[torch.device]:
    p = next(model.parameters(), None)
    return p.device if p is not None else None


@register_adapter("diffusion_tta")
class DiffusionTTA(JudgedAdapter):
    Config = DiffusionTTAConfig

    @property
    def one_example_per_call(self) -> bool:
        # The paper adapts per image; with per_example the method gives every image of a batch its own copy itself,
        # at once, which is faster than one image per call.
        return not self.cfg.per_example

    def __init__(self, model: nn.Module, cfg: Any = None, backend: Any = None, **overrides):
        config, judge = self.load_judge(model, cfg, backend, overrides)
        super().__init__(model, config)
        self.backend = judge.eval().requires_grad_(False)
        judge.use_fast_paths(config.channels_last, config.compile, config.checkpointing)
        if config.adapt_backend:
            named = [(f"backend.{n}", p) for n, p in named_denoiser_parameters(judge)]
            for _, p in named:
                p.requires_grad_(True)
            self.adapted = self.adapted + named
            group = {"params": [p for _, p in named], "lr": config.backend_lr if config.backend_lr is not None
                     else config.lr}
            if self.optimizer is None:
                self.optimizer = self.build_optimizer(group["params"])
                self.optimizer.param_groups[0]["lr"] = group["lr"]
            else:
                self.optimizer.add_param_group(group)
            check_step_fits(self.optimizer)  # backend_lr for the judge's dtype, before anything runs
        self._generator = None
        if config.seed is not None:
            device = _device_of(judge) or torch.device("cpu")
            self._generator = torch.Generator(device=device).manual_seed(config.seed)
        self._x0 = None
        self.last_loss: Optional[float] = None
        self.last_losses: Optional[torch.Tensor] = None  # per image, of the last step
        self.micro_batch_used: Optional[int] = None  # the micro-batch of the last step (sized when micro_batch=0)
        self._sized_for: Optional[Tuple[int, ...]] = None
        self._source_state = self._capture_state()  # now with the judge, when it adapts

    def adapted_judge_prefixes(self) -> Tuple[str, ...]:
        if not self.cfg.adapt_backend or "backend" not in self._modules:  # the base class snapshots before it is set
            return ()
        return (f"backend.{denoiser_prefix(self.backend)}.",)

    # ---- what adapts -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()  # eval mode: per-example batches cannot give batch statistics
        adapt = self.cfg.adapt
        if adapt == "all_but_last":
            for _, p in all_but_last_parameters(self.model, self.cfg.last_layer):
                p.requires_grad_(True)
        elif adapt == "all":
            self.model.requires_grad_(True)
        elif adapt == "norm":
            if not enable_norm_affine(self.model):
                raise ValueError("adapt='norm' found no normalisation layers in this model; use adapt='all' or 'last'")
        elif adapt == "last":
            for _, p in last_layer_parameters(self.model, self.cfg.last_layer):
                p.requires_grad_(True)
        else:
            self.lora = LoRASet(self.model, self.cfg.lora_rank, self.cfg.lora_alpha)

    def collect_params(self) -> List[Tuple[str, nn.Parameter]]:
        if self.cfg.adapt == "lora":
            return [(f"lora.{n}", p) for n, p in self.lora.named_parameters()]
        return super().collect_params()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The (adapted) model's output; with LoRA the low-rank updates are applied on the fly."""
        return self.lora(self.model, x) if self.cfg.adapt == "lora" else self.model(x)

    # ---- the loss ------------------------------------------------------------------------------------------------
    def condition_weights(self, outputs: torch.Tensor) -> torch.Tensor:
        """Soft class weights (softmax over dim 1) for classifiers and segmenters, the map itself for depth."""
        task = model_task(self.model) or ("classification" if outputs.dim() == 2 else
                                          "depth" if outputs.shape[1] == 1 else "segmentation")
        if task == "depth":
            return outputs.unsqueeze(1) if outputs.dim() == 3 else outputs
        k = self.backend.map_channels if self.backend.conditioning == "map" else self.backend.num_classes
        if outputs.dim() < 2 or outputs.shape[1] != k:
            raise ValueError(f"diffusion_tta: the model's output {tuple(outputs.shape)} does not give the {k} "
                             f"class scores the {self.backend.kind} judge is conditioned on")
        return outputs.softmax(1)

    def compute_gradients(self, x: torch.Tensor, x0: Optional[torch.Tensor] = None,
                          predict=None) -> torch.Tensor:
        """Accumulate the gradient of one step's loss (mean over images and `pairs` (t, eps) pairs) into the
        adapted parameters without applying it; returns the model's outputs. With `predict` (per-example copies
        of the parameters, see adapt_per_example) the loss is the sum over images of each image's mean, so every
        copy gets the gradient it would get alone."""
        backend, cfg = self.backend, self.cfg
        device = backend.alphas_cumprod.device
        if x0 is None:
            x0 = backend.encode(x.to(device))
        outputs = (predict or self.predict)(x)
        with autocast_for(device, cfg.autocast):
            cond = backend.condition(self.condition_weights(outputs).to(device))
        # The judge's gradient is gathered on a detached condition, micro-batch by micro-batch, then carried into
        # the model in one backward pass (see the module doc).
        cond_leaf = cond.detach().requires_grad_(True)
        b, n = x0.shape[0], cfg.pairs
        t, noise = sample_pairs(x0, n, backend.num_train_timesteps, cfg.timesteps, cfg.noise, self._generator)

        def judge_error(start: int, m: int) -> torch.Tensor:
            with autocast_for(device, cfg.autocast):
                return backend.denoising_error(x0.repeat_interleave(m, 0), cond_leaf.repeat_interleave(m, 0),
                                               t[:, start:start + m].reshape(-1),
                                               noise[:, start:start + m].reshape(b * m, *x0.shape[1:]), cfg.loss)

        def one_image(m: int) -> torch.Tensor:  # m passes of the first image: what sizing measures
            with autocast_for(device, cfg.autocast):
                return backend.denoising_error(x0[:1].expand(m, *x0.shape[1:]), cond_leaf[:1].expand(m, -1),
                                               t[0, :m], noise[0, :m], cfg.loss)
        micro = self.micro_batch_for(tuple(x0.shape), one_image)
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

    def micro_batch_for(self, shape: Tuple[int, ...], run_pairs) -> int:
        """The configured micro-batch, or with micro_batch=0 the one sized from free memory for this input shape
        (measured once per shape, see tta.generative.memory)."""
        if self.cfg.micro_batch:
            self.micro_batch_used = self.cfg.micro_batch
        elif self._sized_for != shape:
            device = self.backend.alphas_cumprod.device
            budget = self.cfg.memory_gb * 2 ** 30 if self.cfg.memory_gb is not None else None
            self.micro_batch_used = micro_batch_from_memory(run_pairs, self.cfg.pairs, device, budget_bytes=budget,
                                                            images=shape[0])
            self._sized_for = shape
        return self.micro_batch_used

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.compute_gradients(x, self._x0)
        self.step_guarded(self.last_loss)
        return outputs

    def adapt_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.steps == 0:
            with torch.no_grad():
                return self.predict(x)
        if self.cfg.per_example and x.shape[0] > 1:
            return self.adapt_per_example(x)
        with torch.no_grad():
            self._x0 = self.backend.encode(x.to(self.backend.alphas_cumprod.device))  # once per image
        try:
            with torch.enable_grad():  # adapt even when called under torch.no_grad()
                for _ in range(self.cfg.steps):
                    self.forward_and_adapt(x)
        finally:
            self._x0 = None
        return self.predict_guarded(lambda: self.predict(x))  # the adapted model's prediction, as in the paper

    def adapt_per_example(self, x: torch.Tensor) -> torch.Tensor:
        """Episodic adaptation of every image of the batch on its own copy of the adapted parameters, in one pass.

        The copies are stacked along a new first dimension and the model runs once per copy through torch.func
        (vmap over functional_call); the judge sees all images' pairs together. Each image's loss depends only on
        its own copy, and SGD and Adam update element by element, so this is B independent episodic runs of batch
        1 done at once (same result, fewer and larger judge calls). The model's own parameters never change; with
        LoRA the copies are of the low-rank updates."""
        from torch.func import functional_call, vmap
        b = x.shape[0]
        lora = self.cfg.adapt == "lora"
        owner = self.lora if lora else self.model  # the module whose parameters adapt
        named = dict(owner.named_parameters())
        adapted = [n for n, p in named.items() if p.requires_grad]
        copies = {n: named[n].detach().unsqueeze(0).repeat(b, *([1] * named[n].dim())).requires_grad_(True)
                  for n in adapted}
        fixed = {**{n: p.detach() for n, p in named.items() if n not in copies}, **dict(owner.named_buffers())}
        optimizer = self.build_optimizer(list(copies.values()))
        # The adapter checked the whole batch; ImageModel's own checks branch on values, which vmap cannot do.
        unchecked = {"check": False} if isinstance(self.model, ImageModel) else {}

        def one(params, image):
            args = (self.model, image.unsqueeze(0)) if lora else (image.unsqueeze(0),)
            return functional_call(owner, {**fixed, **params}, args, unchecked).squeeze(0)

        def predict(images):
            # Under vmap nn.MultiheadAttention cannot tell that its weights need gradients and takes its inference
            # fast path, which has no backward: keep it on the regular path for this call.
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return vmap(one)(copies, images)
            except RuntimeError as e:  # vmap cannot batch every operation (in-place updates, data-dependent code)
                raise RuntimeError(f"per_example=True could not run this model under torch.func.vmap ({e}); "
                                   "use per_example=False and batches of one image") from e
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        with torch.no_grad():
            x0 = self.backend.encode(x.to(self.backend.alphas_cumprod.device))
        with torch.enable_grad():
            for _ in range(self.cfg.steps):
                self.compute_gradients(x, x0, predict=predict)
                self._step_copies(optimizer, copies, self.last_losses)
        with torch.no_grad():
            outputs = predict(x)
            if self.cfg.guard:
                bad = self._diverged_copies(copies, named, outputs)
                if bad.any():  # as a batch-1 run's guard does: those images get the source model's prediction
                    outputs[bad] = self.predict(x[bad]).to(outputs.dtype)
            return outputs

    # ---- the divergence guard, image by image, for the per-example copies --------------------------------------
    def _step_copies(self, optimizer: torch.optim.Optimizer, copies: Dict[str, torch.Tensor],
                     losses: torch.Tensor) -> None:
        """The optimizer step on the stacked copies. With the guard on, an image whose loss or gradient is not
        finite keeps its parameters and optimizer state, as the guard of a batch-1 run skips that run's update
        (exactly so for SGD; Adam's step count is shared by the copies, so a skip shifts that image's bias
        correction)."""
        bad = torch.zeros_like(losses, dtype=torch.bool)
        if self.cfg.guard:
            bad_loss = ~torch.isfinite(losses)
            bad |= bad_loss
            for p in copies.values():
                if p.grad is not None:
                    bad |= ~finite_and_largest(p.grad, per_slice=True)[0]
            self._count("nonfinite_loss", int(bad_loss.sum()))
            self._count("nonfinite_grad", int((bad & ~bad_loss).sum()))
        if not bad.any():  # the usual case (and always without the guard): a plain step
            optimizer.step()
            optimizer.zero_grad()
            return
        kept = {}
        for p in copies.values():
            state = {k: v[bad].clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.dim() > 0}
            kept[p] = (p.detach()[bad].clone(), state)
            if p.grad is not None:
                p.grad[bad] = 0  # so a NaN cannot reach the other images through shared optimizer arithmetic
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for p, (value, state) in kept.items():
                p[bad] = value
                for k, v in optimizer.state[p].items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        # state made by this step (the first): a skipped image has none yet, which is zeros
                        v[bad] = state[k] if k in state else 0

    def _diverged_copies(self, copies: Dict[str, torch.Tensor], source: Dict[str, torch.Tensor],
                         outputs: torch.Tensor) -> torch.Tensor:
        """Per image: non-finite weights or outputs, or weights that grew a thousandfold beyond the source's scale
        (Adapter.diverged's checks for a batch of one; a collapse needs a batch of 16 or more)."""
        bad = ~finite_and_largest(outputs, per_slice=True)[0]
        exploded = torch.zeros_like(bad)
        for name, p in copies.items():
            finite, largest = finite_and_largest(p.detach(), per_slice=True)
            bad |= ~finite
            exploded |= largest > explosion_limit(source[name])
        self._count("diverged", int(bad.sum()))
        self._count("exploded", int((exploded & ~bad).sum()))
        return bad | exploded
