"""Map-conditioned UNet judge for dense tasks (segmentation, depth), as in Diffusion-TTA's dense experiments.

The condition is the predicted map (per-pixel class probabilities, or depth) concatenated to the noisy image
as extra input channels: a diffusers UNet2DModel with in_channels = image channels + map channels and
out_channels = image channels. The map is resized to the judge's resolution, and depth may be mapped to
[-1, 1] by a `map_range` the judge was trained with. The authors never released this part; such judges are
trained by the project.
Folder layout: unet/ + scheduler/ (or flat), with an optional tta_backend.json holding
{"map_kind": "probabilities" | "depth", "map_range": [lo, hi], "class_names": [...]}.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import (DiffusionJudge, load_component, load_scheduler, prepare_images, read_metadata, register_judge,
                   square_size)

LAYOUT = "unet/ (UNet2DModel, in_channels = image + map channels) + scheduler/, or a flat folder"
MAP_KINDS = ("probabilities", "depth")


@register_judge("map-unet")
class MapUNetJudge(DiffusionJudge):
    conditioning = "map"

    def __init__(self, unet: nn.Module, scheduler, map_kind: Optional[str] = None,
                 map_range: Optional[Tuple[float, float]] = None, class_names: Optional[Sequence[str]] = None):
        image_channels = unet.config.out_channels
        map_channels = unet.config.in_channels - image_channels
        if map_channels < 1:
            raise ValueError(f"a map-unet judge has in_channels = image channels + map channels; this UNet has "
                             f"in_channels={unet.config.in_channels}, out_channels={image_channels}, so no map input")
        if getattr(unet, "class_embedding", None) is not None:
            raise ValueError("this UNet has a class embedding; use kind='pixel-unet' for class-conditional judges")
        map_kind = map_kind or ("depth" if map_channels == 1 else "probabilities")
        if map_kind not in MAP_KINDS:
            raise ValueError(f"map_kind must be one of {MAP_KINDS}, got {map_kind!r}")
        if map_kind == "probabilities" and class_names is not None and len(class_names) != map_channels:
            raise ValueError(f"{len(class_names)} class names for a judge with {map_channels} map channels")
        if map_kind == "probabilities" and class_names is None:
            class_names = [f"class_{i}" for i in range(map_channels)]
        super().__init__(scheduler, square_size(unet.config.sample_size), image_channels,
                         class_names if map_kind == "probabilities" else None)
        self.unet = unet.eval().requires_grad_(False)
        self.map_channels = map_channels
        self.map_kind = map_kind
        self.map_range = tuple(map_range) if map_range is not None else None

    @classmethod
    def from_pretrained(cls, path: str, map_kind: Optional[str] = None, map_range=None,
                        class_names: Optional[Sequence[str]] = None, torch_dtype=None, **kwargs) -> "MapUNetJudge":
        from diffusers import UNet2DModel
        meta = read_metadata(path)
        extra = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        unet = load_component(UNet2DModel, path, "unet", cls.kind, LAYOUT, **extra, **kwargs)
        scheduler = load_scheduler(path, cls.kind, LAYOUT)
        return cls(unet, scheduler, map_kind or meta.get("map_kind"), map_range or meta.get("map_range"),
                   class_names or meta.get("class_names"))

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_images(images, self.image_size, self.image_channels).to(self.unet.dtype)

    def condition(self, weights: torch.Tensor) -> torch.Tensor:
        if weights.dim() != 4 or weights.shape[1] != self.map_channels:
            raise ValueError(f"the map-unet judge takes a (B, {self.map_channels}, H, W) map "
                             f"({self.map_kind}), got shape {tuple(weights.shape)}")
        cond = weights
        if tuple(cond.shape[-2:]) != self.image_size:
            cond = F.interpolate(cond, size=self.image_size, mode="bilinear", align_corners=False)
        if self.map_range is not None:
            lo, hi = self.map_range
            cond = (cond - lo) / (hi - lo) * 2 - 1
        return cond.to(self.unet.dtype)

    def class_condition(self, labels: torch.Tensor) -> torch.Tensor:
        raise TypeError("a map-conditioned judge scores maps, not image-level classes; "
                        "the Diffusion Classifier needs a pixel-unet, dit or sd judge")

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.unet(torch.cat([x_t, cond.to(x_t.dtype)], 1), t).sample
        return self.to_epsilon(out, x_t, t)

MapUNetBackend = MapUNetJudge  # deprecated alias, kept for existing code
