"""Timestep and noise sampling for denoising losses, written once for Diffusion-TTA and the Diffusion Classifier.

Conventions: T is the number of training timesteps, t lies in [0, T), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
with a_t = alphas_cumprod[t] (the DDPM forward process every judge here was trained with).
Random draws take an optional `torch.Generator`, so a run can be repeated exactly with a seed.
"""
from __future__ import annotations

from typing import List, Literal, Optional, Sequence, Tuple, get_args

import torch

from ..registry import unknown_name_message

TimestepMode = Literal["uniform", "stratified", "grid"]
NoiseMode = Literal["independent", "shared"]
Loss = Literal["l2", "l1"]
TIMESTEP_MODES, NOISE_MODES, LOSSES = get_args(TimestepMode), get_args(NoiseMode), get_args(Loss)


def timestep_grid(num_train_timesteps: int, n: int) -> List[int]:
    """The Diffusion Classifier's evenly spaced grid of n timesteps: start T // n // 2, stride T // n."""
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"cannot place {n} timesteps on a grid over [0, {num_train_timesteps}); "
                         f"use 1 <= n <= {num_train_timesteps}")
    stride = num_train_timesteps // n
    return list(range(stride // 2, num_train_timesteps, stride))[:n]


def subgrid_positions(grid_length: int, n: int) -> List[int]:
    """Positions of n evenly spaced entries in a grid of `grid_length` (how each pruning stage picks its t's)."""
    n = min(n, grid_length)
    stride = grid_length // n
    return list(range(grid_length))[stride // 2::stride][:n]


def _draw_device(generator: Optional[torch.Generator], device: torch.device) -> torch.device:
    # A generator only draws on its own device; the draws are then moved where they are used.
    return generator.device if generator is not None else device


def sample_timesteps(batch: int, n: int, num_train_timesteps: int, mode: str = "uniform",
                     generator: Optional[torch.Generator] = None, device="cpu") -> torch.Tensor:
    """(batch, n) integer timesteps in [0, T).

    uniform: i.i.d. uniform (Diffusion-TTA's default); stratified: one uniform draw in each of n equal strata
    (lower variance, an option in the Diffusion-TTA code); grid: the Diffusion Classifier's evenly spaced grid.
    """
    T = num_train_timesteps
    device = torch.device(device)
    if mode == "uniform":
        t = torch.randint(0, T, (batch, n), generator=generator, device=_draw_device(generator, device))
    elif mode == "stratified":
        u = torch.rand(batch, n, generator=generator, device=_draw_device(generator, device))
        t = ((torch.arange(n, device=u.device) + u) * (T / n)).long().clamp_(0, T - 1)
    elif mode == "grid":
        t = torch.tensor(timestep_grid(T, n)).expand(batch, n)
    else:
        raise ValueError(unknown_name_message("timestep sampling mode", mode, TIMESTEP_MODES))
    return t.to(device)


def sample_noise(batch: int, n: int, shape: Sequence[int], mode: str = "independent",
                 generator: Optional[torch.Generator] = None, device="cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, n, *shape) Gaussian noise; `shared` reuses one draw for all n pairs of a sample."""
    device = torch.device(device)
    if mode not in NOISE_MODES:
        raise ValueError(unknown_name_message("noise sampling mode", mode, NOISE_MODES))
    draws = 1 if mode == "shared" else n
    noise = torch.randn(batch, draws, *shape, generator=generator, device=_draw_device(generator, device))
    return noise.expand(batch, n, *shape).to(device=device, dtype=dtype)


def sample_pairs(x0: torch.Tensor, n: int, num_train_timesteps: int, timesteps: str = "uniform",
                 noise: str = "independent", generator: Optional[torch.Generator] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """n (t, eps) pairs per sample of x0: t (B, n) then eps (B, n, *x0.shape[1:]), drawn in that order."""
    t = sample_timesteps(x0.shape[0], n, num_train_timesteps, timesteps, generator, x0.device)
    eps = sample_noise(x0.shape[0], n, x0.shape[1:], noise, generator, x0.device, x0.dtype)
    return t, eps


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The forward process x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, for t of shape (B,)."""
    a = alphas_cumprod.to(x0.device)[t].to(torch.float32).view(-1, *([1] * (x0.dim() - 1)))
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Mean squared (l2) or absolute (l1) error per sample, (B, ...) -> (B,), computed in float32."""
    diff = prediction.float() - target.float()
    if loss == "l2":
        err = diff.pow(2)
    elif loss == "l1":
        err = diff.abs()
    else:
        raise ValueError(unknown_name_message("denoising loss", loss, LOSSES))
    return err.reshape(err.shape[0], -1).mean(1)
