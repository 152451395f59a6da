"""The `--device` of `tta run` and `tta bench`: checked once, before any model or data is touched, so that a typo
or a missing GPU is one clear error rather than a traceback from deep inside torch."""
from __future__ import annotations

from typing import Optional, Union

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """`device` as a torch.device that this machine has; None means the default (cuda when present, else cpu)."""
    if device is None:
        device = default_device()
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device))
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N (N a GPU index)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else \
                "no CUDA GPU or driver is usable on this machine"
            raise ValueError(f"--device {device}: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: Apple's MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: tta runs on cpu, cuda or mps, not {dev.type}")
    return dev
