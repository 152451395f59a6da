"""Zoo bookkeeping: member name -> (builder, trainer), checkpoint location, the `zoo:` model and judge sources."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from ..generative.loading import JUDGE_SOURCES
from ..models.sources import MODEL_LISTERS, MODEL_SOURCES
from ..registry import Registry

ZOO = Registry("zoo model")
CHECKPOINTS = Path(__file__).parent / "checkpoints"


@dataclass
class ZooMember:
    name: str
    description: str
    train: Callable[..., dict]           # train(out: Path, steps: Optional[int], device: str, seed: int) -> metrics
    load: Optional[Callable] = None      # load(path) -> ImageModel, for members that are discriminative models
    filename: str = ""                   # checkpoint file or folder name under CHECKPOINTS


def register_member(member: ZooMember) -> ZooMember:
    return ZOO.register(member.name)(member)


def checkpoint_path(name: str) -> Path:
    member = ZOO.get(name)
    return CHECKPOINTS / (member.filename or name)


def list_zoo() -> List[str]:
    return ZOO.names()


def train(name: str, out: Optional[Path] = None, steps: Optional[int] = None, device: str = "cpu",
          seed: int = 0, resume: bool = False) -> dict:
    member = ZOO.get(name)
    kwargs = {"resume": True} if resume else {}
    if resume and "resume" not in inspect.signature(member.train).parameters:
        raise ValueError(f"zoo member {name!r} trains in minutes and cannot resume; run it without --resume")
    return member.train(Path(out) if out else checkpoint_path(name), steps=steps, device=device, seed=seed,
                        **kwargs)


def _zoo_model_names(pattern: str) -> List[str]:
    """Zoo members that are discriminative models (`zoo:<name>`), not judges."""
    import fnmatch
    return [n for n in ZOO.names() if ZOO.get(n).load is not None and fnmatch.fnmatch(n, pattern)]


MODEL_LISTERS["zoo"] = _zoo_model_names


@MODEL_SOURCES.register("zoo")
def zoo_model(name: str, pretrained: bool = True, weights=None, **kwargs):
    """`zoo:fmnist-cnn`: a classifier of the project's zoo, from its committed checkpoint (or `weights`)."""
    member = ZOO.get(name)
    if member.load is None:
        raise ValueError(f"zoo member {name!r} is not a discriminative model; zoo models: "
                         f"{', '.join(n for n in ZOO.names() if ZOO.get(n).load)}")
    if kwargs:
        raise TypeError(f"zoo model {name!r} takes no model arguments, got {sorted(kwargs)}")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weight file {str(path)!r} does not exist; pass a checkpoint written by "
                                    f"`tta zoo train {name} --out FILE`, or drop weights to use the shipped one")
        return member.load(path)
    path = checkpoint_path(name)
    if pretrained and not path.exists():
        raise FileNotFoundError(f"no checkpoint for zoo model {name!r} at {path}; "
                                f"create it with `tta zoo train {name}`")
    return member.load(path if pretrained else None)


@JUDGE_SOURCES.register("zoo")
def zoo_judge(name: str) -> Path:
    """`zoo:fmnist-judge`: the folder of a diffusion judge of the project's zoo, for create_judge."""
    return checkpoint_path(name)
