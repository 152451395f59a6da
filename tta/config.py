"""Checking method configs, in one place: field types and the declared range of every numeric field.

A numeric field declares its range in its annotation, e.g. `lr: Rate = 1e-3`, with the constraint objects of
annotated_types (`Interval`) that pydantic v2 reads too: a move of the configs to pydantic models keeps these
annotations as they are. `check_config` runs from `AdapterConfig.__post_init__`, so every way of building a config
(`make_config`, the class itself, `dataclasses.replace`) is checked the same way, before any model is touched.
Ranges are annotations, not fields: they never change a config's values or the id of a result row.

`check_field_types` also checks the benchmark file's dataclasses (tta.bench.fields.strict_dataclass).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Annotated, Any, Dict, Iterator, Optional, Tuple, Union

from annotated_types import DocInfo, Interval, doc

from .registry import unknown_name_message

# Rates and weights with no natural maximum (learning rates, weight decay, loss weights) stop at LARGE: nothing near
# it is ever useful, and it keeps every number an optimizer step multiplies by (lr / (1 - betas[0]) for Adam, lr x
# weight_decay for AdamW) far inside float32's range for any allowed beta, so a step can never overflow there.
LARGE = 1e12
# Counts that set how much work one call does (and views held in memory at once) stop at sizes far beyond every
# published setting, so that a typo such as 10**9 is refused at once instead of hanging or allocating gigabytes.
MAX_STEPS = 10_000   # published settings: 1 to 150 steps per call
MAX_VIEWS = 1_024    # augmented or masked copies of an image per forward pass; published: 32 to 128
MAX_PAIRS = 10_000   # Diffusion-TTA (t, eps) pairs per step, Diffusion Classifier samples per class; published <= 1000

Steps = Annotated[int, Interval(ge=0, le=MAX_STEPS), doc("optimizer steps per call; each runs the model")]
Rate = Annotated[float, Interval(ge=0, le=LARGE)]
Fraction = Annotated[float, Interval(ge=0, le=1)]    # momenta, EMA weights, probabilities, confidences
Beta = Annotated[float, Interval(ge=0, lt=1)]        # Adam's moment decays: 1 would divide by zero
NonNegative = Annotated[float, Interval(ge=0, le=LARGE)]
Positive = Annotated[float, Interval(gt=0, le=LARGE)]
Views = Annotated[int, Interval(ge=1, le=MAX_VIEWS), doc("copies of each image held in memory and run at once")]
Pairs = Annotated[int, Interval(ge=1, le=MAX_PAIRS), doc("each is one pass of the diffusion judge")]
Seed = Annotated[int, Interval(ge=0, le=2 ** 64 - 1), doc("what torch.Generator.manual_seed takes")]


def make_config(config_cls, cfg=None, overrides: Optional[Dict[str, Any]] = None):
    """Build `config_cls` from an optional instance or dict plus keyword overrides; unknown keys are errors, and
    the values are checked by the class itself (see check_config)."""
    values: Dict[str, Any] = {}
    if isinstance(cfg, dict):
        values.update(cfg)
    elif cfg is not None:
        values.update(dataclasses.asdict(cfg))
    values.update(overrides or {})
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise TypeError(f"unknown config key(s) {unknown} for {config_cls.__qualname__}; "
                        f"valid keys: {', '.join(valid)}")
    return config_cls(**values)


def fill_from_preset(config: Any, presets: Dict[str, Dict[str, Any]]) -> None:
    """Set the fields of `config` left unset (None) to the values of its named `preset`, so that a field given
    explicitly always wins over the preset. Call it in __post_init__ before the checks: the preset's values are
    then checked like the user's."""
    if not isinstance(config.preset, str) or config.preset not in presets:
        raise ValueError(f"{type(config).__qualname__}: " + unknown_name_message("preset", config.preset, presets))
    for name, value in presets[config.preset].items():
        if getattr(config, name) is None:
            setattr(config, name, value)


def check_config(config: Any) -> None:
    """Refuse a config dataclass whose values have the wrong type or lie outside their declared range; the message
    names the field, the value and what is allowed."""
    where = type(config).__qualname__
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    check_field_types(type(config), values, where)
    check_ranges(type(config), values, where)


# ---- declared ranges ------------------------------------------------------------------------------------------
def declared_ranges(cls) -> Dict[str, Any]:
    """field name -> its annotation, for the fields of dataclass `cls` whose annotation declares a range (an
    Interval, possibly inside Optional or a tuple)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if any(True for _ in _intervals(hints[f.name]))}


def _intervals(hint: Any) -> Iterator[Interval]:
    if typing.get_origin(hint) is Annotated:
        yield from (m for m in hint.__metadata__ if isinstance(m, Interval))
    for arg in typing.get_args(hint):
        if arg is not Ellipsis and not isinstance(arg, (Interval, DocInfo)):
            yield from _intervals(arg)


def check_ranges(cls, values: Dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(cls, include_extras=True)
    for key, value in values.items():
        if key in hints:
            _check_range(key, value, hints[key], where)


def _check_range(name: str, value: Any, hint: Any, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None:
            return
        hint = next((a for a in args if a is not type(None)), hint)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list) and isinstance(value, (tuple, list)):
        element_hints = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        for i, (v, h) in enumerate(zip(value, element_hints)):
            _check_range(f"{name}[{i}]", v, h, where)
        return
    if origin is not Annotated or not isinstance(value, numbers.Real) or isinstance(value, bool):
        return
    for interval in (m for m in hint.__metadata__ if isinstance(m, Interval)):
        if not _inside(value, interval):
            kind = "an integer" if args[0] is int else "a number"
            why = next((f" ({m.documentation})" for m in hint.__metadata__ if isinstance(m, DocInfo)), "")
            raise ValueError(f"{where}: {name} must be {kind} in {describe_interval(interval)}{why}, got {value!r}")


def _inside(value: numbers.Real, interval: Interval) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False  # NaN compares false with everything, and no range here reaches infinity
    return ((interval.ge is None or value >= interval.ge) and (interval.gt is None or value > interval.gt)
            and (interval.le is None or value <= interval.le) and (interval.lt is None or value < interval.lt))


def describe_interval(interval: Interval) -> str:
    """[0, 1), (0, 1e+12] and so on."""
    def number(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else f"{v:,}".replace(",", "_") if v >= 10_000 else str(v)
    lo = f"[{number(interval.ge)}" if interval.ge is not None else f"({number(interval.gt)}"
    hi = f"{number(interval.le)}]" if interval.le is not None else f"{number(interval.lt)})"
    return f"{lo}, {hi}"


# ---- types ------------------------------------------------------------------------------------------------------
def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint` (the types config and spec dataclasses use); an annotation this
    does not know is not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict))  # a nested spec section, built from its mapping
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def check_field_types(cls, values: Dict[str, Any], where: str) -> None:
    """Refuse values of the wrong type (a string for a number, "false" for a boolean) before they silently mean
    something else; the message names the field, the expected type and how to write it."""
    hints = typing.get_type_hints(cls)  # ranges (Annotated) stripped: the plain types
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None or _matches(value, hint):
            continue
        hint_text = ""
        if isinstance(value, str) and _matches(1.0, hint):
            try:
                float(value)
                hint_text = " (YAML reads 1e-3 as a string: write 1.0e-3)"
            except ValueError:
                pass
        elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no") and _matches(True, hint):
            hint_text = " (write true or false without quotes)"
        raise ValueError(f"{where}: {key} must be {_describe(hint)}, got {type(value).__name__} {value!r}{hint_text}")


def numeric_fields(cls) -> Tuple[str, ...]:
    """The fields of dataclass `cls` that hold numbers (alone, optional or in a tuple): each must declare a range."""
    def numeric(hint: Any) -> bool:
        if hint in (int, float):
            return True
        return any(numeric(a) for a in typing.get_args(hint) if a is not Ellipsis)
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls) if numeric(hints[f.name]))
