"""What a benchmark file's `model.factory` may call.

A factory is "package.module:function", imported and called with the file's `kwargs`, so a benchmark file that
names one is code: `factory: os:system` would run a shell command. By default only callables defined in the
packages that build networks (this package, timm, torchvision, open_clip, segmentation_models_pytorch, diffusers)
may be named; anything else needs the user's explicit consent (`tta bench --allow-code`, `allow_code=True`).
"""
from __future__ import annotations

import importlib
from typing import Callable

ALLOWED_FACTORY_PACKAGES = ("tta", "timm", "torchvision", "open_clip", "segmentation_models_pytorch", "diffusers")


def _in_allowed_package(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in ALLOWED_FACTORY_PACKAGES)


def _refusal(factory: str, where: str, why: str) -> ValueError:
    return ValueError(
        f"{where} {factory!r} {why}; a benchmark file with a factory runs code, so by default it may only call "
        f"functions of {', '.join(ALLOWED_FACTORY_PACKAGES)}. If you trust this file, rerun with --allow-code "
        "(tta bench) or allow_code=True (Runner, run_benchmark)")


def check_factory(factory: str, allow_code: bool = False, where: str = "model.factory") -> None:
    """Refuse, before anything is imported, a factory outside the allowed packages unless `allow_code`."""
    module = factory.partition(":")[0]
    if not allow_code and not _in_allowed_package(module):
        raise _refusal(factory, where, f"is in module {module!r}, outside the allowed packages")


def resolve_factory(factory: str, allow_code: bool = False, where: str = "model.factory") -> Callable:
    """The callable named by "package.module:function", checked against the allowed packages."""
    check_factory(factory, allow_code, where)
    module, _, name = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {where} {factory!r} ({err}); install the package that defines it or fix "
                         "the name") from err
    if not callable(fn) or type(fn).__name__ == "module":
        raise ValueError(f"{where} {factory!r} is not a function or class; name one that returns an nn.Module")
    # An allowed module may import a callable from elsewhere (`from os import system`): what counts is where the
    # callable is defined, not the module it is reached through.
    defined_in = getattr(fn, "__module__", None) or ""
    if not allow_code and not _in_allowed_package(defined_in):
        raise _refusal(factory, where, f"is defined in {defined_in or 'an unknown module'!r}, outside the allowed "
                       "packages")
    return fn
