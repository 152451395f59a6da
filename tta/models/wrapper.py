"""ImageModel: the one wrapper every model source returns.

Images go in as float tensors in [0, 1] of shape (B, C, H, W); the wrapper checks them, applies its own
model's normalisation and returns a plain tensor: logits (B, K), dense logits (B, K, H, W) or a regression map.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

TASKS = ("classification", "segmentation", "depth")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def standardise_each_image(x: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Each image of a batch shifted to zero mean and scaled to unit standard deviation on its own (all channels
    together): blind to its overall brightness and contrast. `eps` keeps a flat image flat (all zeros)."""
    flat = x.flatten(1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - flat.mean(1).view(shape)) / (flat.std(1, unbiased=False).view(shape) + eps)


def check_images(x: torch.Tensor, channels: Optional[int] = None, name: str = "images") -> None:
    """Images must be float (B, C, H, W) in [0, 1]; the messages say how to fix the common mistakes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch; pass at least one image")
    if channels is not None and x.shape[1] != channels:
        hint = " (channels last? use x.permute(0, 3, 1, 2))" if x.shape[-1] == channels else ""
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(x.shape)}{hint}")
    if x.numel() == 0:
        raise ValueError(f"{name} have no pixels, got shape {tuple(x.shape)}; pass images of at least 1x1")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be float in [0, 1], got {x.dtype}; use x.float() / 255")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; clean or drop those images")
    lo, hi = x.min().item(), x.max().item()
    if hi > 1.0 + 1e-3 or lo < -1e-3:
        hint = " (it looks like 0..255: divide by 255)" if hi > 2 else " (already normalised? pass raw [0, 1] images)"
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")


class ImageModel(nn.Module):
    """A discriminative network plus its input normalisation, class names and input size."""

    def __init__(self, net: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 class_names: Optional[Sequence[str]] = None, input_size: Tuple[int, int, int] = (3, 224, 224),
                 task: str = "classification", name: str = "model"):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if len(mean) != input_size[0] or len(std) != input_size[0]:
            raise ValueError(f"mean/std need {input_size[0]} values (one per channel), got {len(mean)}/{len(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.class_names = list(class_names) if class_names is not None else None
        self.input_size = tuple(input_size)
        self.task = task
        self.name = name

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.class_names) if self.class_names is not None else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        """[0, 1] images -> the network's output. check=False skips the input checks, for callers that checked
        the batch already and run under torch.func.vmap (which cannot branch on tensor values)."""
        if check:
            check_images(x, self.input_size[0])
        dtype = next((p.dtype for p in self.net.parameters() if p.is_floating_point()), None)
        if dtype is not None and x.dtype != dtype:  # float64 / float16 images for a float32 network, and so on
            x = x.to(dtype)
        try:
            out = self.net(self.normalize(x))
        except RuntimeError as err:
            size = tuple(self.input_size[1:])
            if tuple(x.shape[-2:]) == size or isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            raise ValueError(f"{self.name} cannot take images of size {tuple(x.shape[-2:])} ({err}); it was built for "
                             f"{size}: resize the images to {size} (e.g. tta.data.images.fit_to_size)") from err
        if isinstance(out, dict):  # torchvision segmentation models return {"out": ..., "aux": ...}
            out = out["out"]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out

    def extra_repr(self) -> str:
        k = self.num_classes
        return f"name={self.name!r}, task={self.task}, input_size={self.input_size}, classes={k}"


def wrap_model(net: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               class_names: Optional[Sequence[str]] = None, input_size: Tuple[int, int, int] = (3, 224, 224),
               task: str = "classification", name: str = "custom") -> ImageModel:
    """Bring your own network: it then takes [0, 1] images like every model of `tta.create_model`."""
    return ImageModel(net, mean, std, class_names, input_size, task, name)
