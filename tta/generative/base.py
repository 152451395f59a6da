"""The DiffusionJudge protocol: one operation shared by Diffusion-TTA and the Diffusion Classifier.

Both methods reduce to the error between predicted and true noise for an image x0, a timestep t, a noise eps
and a condition. A judge encodes an image once (pixels in [-1, 1], or VAE latents scaled as its model
expects), turns soft condition weights into its model's native condition and predicts the noise. Native
conditions are tensors with the batch first, so callers can repeat them over (t, eps) pairs.

Judges load through diffusers' own `from_pretrained`, from a hub id or a local folder in the
`save_pretrained` layout. diffusers and transformers are imported inside the loaders, so `import tta` needs
only torch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from typing import (Annotated, Any, Callable, Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Tuple, Union,
                    get_args)

import torch
import torch.nn.functional as F
from annotated_types import doc
from torch import nn

from ..models.wrapper import check_images, standardise_each_image
from ..registry import Registry, unknown_name_message
from .sampling import add_noise, per_sample_error

JUDGES = Registry("diffusion judge")
METADATA_FILE = "tta_backend.json"  # optional, beside the model files: {"kind": ..., "class_names": [...], ...}
CONDITIONINGS = ("class", "text", "map")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, to show a grey-scale judge a colour image


def register_judge(kind: str):
    """Class decorator: register a DiffusionJudge subclass under `kind` (also sets its `kind`)."""
    def decorator(cls):
        cls.kind = kind
        return JUDGES.register(kind)(cls)
    return decorator


class DiffusionJudge(nn.Module):
    """A conditional noise predictor with its noise schedule, encoder and conditioning.

    Subclasses set `conditioning` ("class": a fixed table of K class embeddings; "text": prompts built from
    class names, any K; "map": a per-pixel map concatenated to the noisy input) and implement `encode`,
    `condition` and `predict_noise`; `denoiser` is the network that Diffusion-TTA may adapt.
    """
    kind = "judge"
    conditioning = "class"

    def __init__(self, scheduler, image_size: Tuple[int, int], image_channels: int,
                 class_names: Optional[Sequence[str]] = None):
        super().__init__()
        config = scheduler.config
        self.num_train_timesteps = int(config.num_train_timesteps)
        self.prediction_type = getattr(config, "prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config; "
                             "expected epsilon, v_prediction or sample")
        # Not persistent: the schedule never changes, so snapshots and state dicts need not carry it.
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().clone().float(), persistent=False)
        self.image_size = tuple(image_size)
        self.image_channels = int(image_channels)
        self.class_names = list(class_names) if class_names is not None else None
        self.source = self.kind  # create_judge records "<kind>:<path>" here, for result rows

    # ---- the protocol ------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        """The noise-prediction network (UNet or transformer): what `adapt_judge` trains."""
        raise NotImplementedError

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.class_names) if self.class_names is not None else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, C, H, W) -> x0 the model denoises; no gradient, once per image."""
        raise NotImplementedError

    def condition(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, K) soft class weights, or a (B, C, H, W) map -> the native condition, differentiable in weights."""
        raise NotImplementedError

    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Native condition of hard labels (B,); the Diffusion Classifier scores every class with it."""
        return self.condition(F.one_hot(labels, self.num_classes).to(self.alphas_cumprod.dtype))

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The model's noise prediction eps_theta(x_t, t, cond), converted to epsilon whatever it predicts."""
        raise NotImplementedError

    def denoising_error(self, x0: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                        loss: str = "l2") -> torch.Tensor:
        """(B,) per-sample error || eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, cond) - eps ||, mean over
        elements; differentiable in cond (and in the denoiser's parameters)."""
        x_t = add_noise(x0, noise, t, self.alphas_cumprod)
        return per_sample_error(self.predict_noise(x_t, t, cond), noise, loss)

    def use_fast_paths(self, channels_last: bool = False, compile: bool = False,
                       checkpointing: bool = False) -> "DiffusionJudge":
        """Speed and memory options for the denoiser, in place (a judge shared by several adapters gets them too).
        channels_last: NHWC convolutions (faster on GPUs with tensor cores; not on this project's test CPU).
        compile: torch.compile the denoiser (the first calls compile; worth it on GPUs for long runs).
        checkpointing: recompute the denoiser's activations in the backward pass instead of keeping them (less
        memory, about a third more time): for large judges, adapted (adapt_judge) or not, since the gradient
        to the condition also needs them. Outputs and gradients are unchanged up to rounding."""
        net = self.denoiser
        if checkpointing:
            if not getattr(net, "_supports_gradient_checkpointing", False):
                raise ValueError(f"checkpointing: the {type(net).__name__} denoiser of this {self.kind} judge does "
                                 "not support gradient checkpointing; turn it off")
            net.enable_gradient_checkpointing()
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if compile:
            net.compile()
        return self

    def set_class_names(self, class_names: Sequence[str]) -> None:
        """Text-conditioned judges embed any class names; class-table judges only accept their own count."""
        if self.num_classes is not None and len(class_names) != self.num_classes:
            raise ValueError(f"this {self.kind} judge has {self.num_classes} classes and cannot take "
                             f"{len(class_names)} class names")
        self.class_names = list(class_names)

    # ---- shared helpers ----------------------------------------------------------------------------------
    def to_epsilon(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Turn a v- or x0-prediction into the epsilon-prediction the loss compares with the true noise."""
        if self.prediction_type == "epsilon":
            return output
        a = self.alphas_cumprod[t].view(-1, *([1] * (x_t.dim() - 1))).to(output.dtype)
        if self.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0 => eps = sqrt(a) v + sqrt(1-a) x_t
            return a.sqrt() * output + (1 - a).sqrt() * x_t
        return (x_t - a.sqrt() * output) / (1 - a).sqrt()  # sample prediction

    def check_weights(self, weights: torch.Tensor) -> None:
        if weights.dim() != 2 or (self.num_classes is not None and weights.shape[1] != self.num_classes):
            raise ValueError(f"the {self.kind} judge takes (B, {self.num_classes}) class weights, got shape "
                             f"{tuple(weights.shape)}; the classifier and the judge must share one class list")

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, conditioning={self.conditioning}, image_size={self.image_size}, "
                f"channels={self.image_channels}, classes={self.num_classes}, T={self.num_train_timesteps}, "
                f"prediction_type={self.prediction_type}")


def square_size(size: Any) -> Tuple[int, int]:
    """A diffusers `sample_size` (one int for square models, or (H, W)) as (H, W)."""
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))


def prepare_images(images: torch.Tensor, size: Sequence[int], channels: int) -> torch.Tensor:
    """[0, 1] images -> the judge's resolution and channel count, scaled to [-1, 1] as diffusion models expect."""
    check_images(images)
    c = images.shape[1]
    if c != channels:
        if c == 3 and channels == 1:
            images = (images * images.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif c == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"the judge takes {channels}-channel images, got {c} channels; pass images with "
                             f"{channels} channels")
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return images * 2 - 1


# A judge that sees every image at one contrast and brightness: each image is shifted to zero mean and scaled to
# this standard deviation (in the [-1, 1] range), the average per-image standard deviation of Fashion-MNIST's clean
# training images at 16x16, so the noise schedule meets signals of the scale it was designed for.
STANDARD_IMAGE_STD = 0.58
INPUT_NORMS = ("none", "per-image")


def check_input_norm(input_norm: str) -> str:
    if input_norm not in INPUT_NORMS:
        raise ValueError(unknown_name_message("judge input_norm", input_norm, INPUT_NORMS))
    return input_norm


def normalise_judge_input(images: torch.Tensor, input_norm: str) -> torch.Tensor:
    """`per-image`: each [-1, 1] image standardised on its own (tta.models.wrapper.standardise_each_image) and
    scaled to STANDARD_IMAGE_STD, which makes the judge blind to an image's overall brightness and contrast;
    `none`: unchanged."""
    if check_input_norm(input_norm) == "none":
        return images
    return standardise_each_image(images) * STANDARD_IMAGE_STD


def labels_with_outputs(modules: Iterable[nn.Module], labels: torch.Tensor,
                        output: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """`labels`, given to the network in place of its integer labels, makes each of `modules` (label-embedding
    tables inside the network's blocks, as DiT's) return output(module); calls with other labels behave as usual.

    `replaced_outputs` hooks only while its block runs; a block under gradient checkpointing re-runs its forward
    during backward, after such hooks are gone, and would then embed the plain labels. These hooks live as long as
    `labels` does: the checkpointed re-run passes that very tensor again (the autograd graph keeps it), and once
    the caller and the graph let go of it, the hooks are removed, so none stay on the network.
    """
    import weakref
    ref = weakref.ref(labels)

    def hook(module: nn.Module, args, out):
        return output(module) if args and args[0] is ref() else None

    handles = [m.register_forward_hook(hook) for m in modules]
    weakref.finalize(labels, lambda: [h.remove() for h in handles])
    return labels


@contextlib.contextmanager
def replaced_outputs(modules: Iterable[nn.Module], output: Callable[[nn.Module], torch.Tensor]) -> Iterator[None]:
    """Within the block, each module's forward returns output(module) instead of its own result.

    This is how soft labels enter models that only take integer labels: the label-embedding lookup is
    replaced by a weighted sum of the embedding rows. The hooks are removed on exit, also on error.
    """
    handles = [m.register_forward_hook(lambda module, args, out: output(module)) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


Autocast = Literal["auto", "bf16", "off"]
AUTOCAST_MODES = get_args(Autocast)
# A config's `autocast` field: the judge's precision (see autocast_for)
AutocastSetting = Annotated[Union[bool, Autocast], doc(
    "true means auto, false off: 'auto' is bf16 on CUDA only, 'bf16' also on CPUs with native bf16, 'off' is float32 "
    "everywhere")]


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast makes the judge faster
    rather than slower. Asks oneDNN once (autocast_for runs per micro-batch); False when torch cannot tell."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_autocast(mode: Any) -> str:
    """The autocast setting as one of AUTOCAST_MODES; True and False (older configs) mean "auto" and "off"."""
    if isinstance(mode, bool):
        return "auto" if mode else "off"
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {AUTOCAST_MODES} (or true/false), got {mode!r}: 'auto' is bf16 "
                         "on CUDA only, 'bf16' also on CPUs with native bf16, 'off' is float32 everywhere")
    return mode


def autocast_for(device: torch.device, mode: Any = "auto"):
    """The judge's precision. "auto": bf16 autocast on CUDA, float32 on the CPU, so CPU results are the same on
    every machine; "bf16": also bf16 on CPUs with native bf16 (about 1.7x faster on the zoo judge, step losses
    3e-3 to 7e-3 relative from float32 in results/perf.md; CPUs without it stay float32, where bf16 would be
    slower); "off": float32 everywhere."""
    mode = check_autocast(mode)
    if mode != "off" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if mode == "bf16" and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- loading ---------------------------------------------------------------------------------------------
def is_local(path: str) -> bool:
    """A string that names a folder (absolute, relative with ./ or ../, ~ or existing) rather than a hub id."""
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)


def read_metadata(path: str) -> Dict[str, Any]:
    """The optional tta_backend.json of a local folder (kind, class names, prompt, map range)."""
    file = os.path.join(os.path.expanduser(path), METADATA_FILE)
    if is_local(path) and os.path.isfile(file):
        return read_json_file(file, "a judge's metadata (kind, class names)")
    return {}


def read_json_file(file: str, what: str) -> Dict[str, Any]:
    """A JSON object from a judge folder; a damaged file is an error that names it."""
    try:
        with open(file, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); it should hold {what}: restore it from the judge's "
                         "source, or save the judge again with save_pretrained") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} holds a JSON {type(value).__name__}, not an object; it should hold {what}")
    return value


def subfolder(path: str, name: str) -> Optional[str]:
    """`name` for the pipeline layout (path/unet/...), None for a flat folder holding one model's files."""
    local = os.path.expanduser(path)
    if is_local(path) and not os.path.isdir(os.path.join(local, name)) and (
            os.path.isfile(os.path.join(local, "config.json"))
            or os.path.isfile(os.path.join(local, "scheduler_config.json"))):
        return None
    return name


def load_component(cls, path: str, name: str, kind: str, layout: str, **kwargs):
    """`cls.from_pretrained(path, subfolder=name)` with an error that says which files a `kind` folder needs."""
    local = os.path.expanduser(path)
    if is_local(path) and not os.path.isdir(local):
        raise FileNotFoundError(f"no folder at {path!r}; pass a local folder in the save_pretrained layout "
                                f"({layout}) or a hub id such as the ones in the README")
    if cls.__module__.startswith("diffusers") and importlib.util.find_spec("accelerate") is None:
        kwargs.setdefault("low_cpu_mem_usage", False)  # what diffusers falls back to anyway, minus its warning
    try:
        return cls.from_pretrained(local if is_local(path) else path, subfolder=subfolder(path, name), **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise OSError(f"could not load the {name} ({cls.__name__}) of a {kind!r} diffusion judge from {path!r}: "
                      f"{e}\nA {kind} judge is a folder (or hub repository) laid out as {layout}, written with "
                      f"save_pretrained; pass such a folder, or another kind with create_judge(..., kind=...)") from e


def load_scheduler(path: str, kind: str, layout: str):
    """The noise schedule: any diffusers scheduler config (DDPM, DDIM, PNDM, ...) read as a DDPMScheduler."""
    from diffusers import DDPMScheduler
    config = load_component(_ConfigOnly(DDPMScheduler), path, "scheduler", kind, layout)
    return DDPMScheduler.from_config(config)


class _ConfigOnly:
    """Adapts a scheduler class's `load_config` to `load_component`'s from_pretrained call (with its errors)."""

    def __init__(self, cls):
        self.cls = cls
        self.__name__ = f"{cls.__name__} config"

    def from_pretrained(self, path, subfolder=None, **kwargs):
        config = self.cls.load_config(path, subfolder=subfolder, **kwargs)
        # Keys that DDPMScheduler does not take (PNDM's skip_prk_steps, ...) would only produce warnings.
        import inspect
        valid = set(inspect.signature(self.cls.__init__).parameters)
        return {k: v for k, v in config.items() if k in valid}


def denoiser_prefix(judge: DiffusionJudge) -> str:
    """The denoiser's module name inside the judge ("unet", "transformer")."""
    return next(n for n, m in judge.named_modules() if m is judge.denoiser)


def named_denoiser_parameters(judge: DiffusionJudge) -> List[Tuple[str, nn.Parameter]]:
    """The denoiser's parameters, named as they are inside the judge module."""
    prefix = denoiser_prefix(judge)
    return [(f"{prefix}.{n}" if prefix else n, p) for n, p in judge.denoiser.named_parameters()]

# deprecated aliases, kept for existing code
BACKENDS = JUDGES
DiffusionBackend = DiffusionJudge
register_backend = register_judge
