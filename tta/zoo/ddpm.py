"""The training recipe shared by the zoo's diffusion judges, and how a judge folder is written.

DDPM epsilon prediction over 1000 linear-beta steps, AdamW 1e-3 with 100 warm-up steps and cosine decay, an EMA
of the weights (what is saved), saved every `save_every` steps so an interrupted run leaves a usable judge.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def log_progress(step: int, total: int, start: float, **values) -> None:
    rate = (time.perf_counter() - start) / max(step, 1)
    shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
    print(f"step {step}/{total} {shown} ({rate:.2f} s/step, eta {rate * (total - step) / 60:.1f} min)", flush=True)


def train_ddpm(build_unet: Callable[[], nn.Module], num_examples: int,
               batch: Callable[[torch.Tensor], Tuple[torch.Tensor, object]],
               denoise: Callable[[nn.Module, torch.Tensor, torch.Tensor, object], torch.Tensor],
               save: Callable[[nn.Module, object, Dict], None], steps: int, batch_size: int, seed: int,
               device: str = "cpu", save_every: int = 250) -> Dict:
    """`batch(indices) -> (x0 in [-1, 1], condition)`; `denoise(unet, x_t, t, condition) -> predicted noise`;
    `save(ema_unet, scheduler, training_info)` writes the judge. Seeded: one generator draws indices, t, noise."""
    from diffusers import DDPMScheduler
    torch.manual_seed(seed)
    unet = build_unet().to(device)
    ema = build_unet().to(device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    alphas = scheduler.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(unet.parameters(), 1e-3, weight_decay=0.0)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    running = None
    for step in range(1, steps + 1):
        idx = torch.randint(0, num_examples, (batch_size,), generator=gen)
        x0, cond = batch(idx)
        x0 = x0.to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(denoise(unet, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.mul_(decay).add_(p, alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps:
            log_progress(step, steps, start, loss=running)
        if step % save_every == 0 or step == steps:
            save(ema, scheduler, {"steps_done": step, "steps": steps, "loss_ema": running})
    return {"steps": steps, "final_loss_ema": running, "seconds": time.perf_counter() - start}


def save_judge_folder(unet: nn.Module, scheduler, out: Path, meta: Dict) -> None:
    """unet/ + scheduler/ + tta_backend.json, written to a temporary folder then renamed, so a crash mid-save
    never leaves a half-written judge."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "tta_backend.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
