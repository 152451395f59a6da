"""Checking method configs, in one place: field types and the declared range of every numeric field.

A numeric field declares its range in its annotation, e.g. `lr: Rate = 1e-3`, with the constraint objects of
annotated_types (`Interval`), which pydantic v2 reads natively. pydantic validates every field: strict
`pydantic.TypeAdapter`s per (dataclass, field), built on first use and cached, one for the plain type (checked first,
so that a wrong type is reported as one) and one for the annotation with its range. Strict, because a config must
mean what it says: "1e-3" (YAML reads it as a string) is not a number and true is not 1, while an int is a float
(YAML's `1` for lr). The configs stay dataclasses rather than pydantic models because a result row's id is a hash of
`dataclasses.asdict(config)`: pydantic only checks the values, it never converts or stores them, so no id changes.
Lists and tuples are accepted for one another (YAML has only lists), and a nested dataclass of a benchmark file as
an instance or the mapping it is built from.

`check_config` runs from `AdapterConfig.__post_init__`, after a preset has filled the fields left unset, so every way
of building a config (`make_config`, the class itself, `dataclasses.replace`) and every preset's values are checked
the same way, before any model is touched. Ranges are annotations, not fields: they never change a config's values
or the id of a result row. The messages are ours, not pydantic's: they name the field, the value, the type or range
allowed and, for the usual YAML slips, how to write it.

A field that names one of a fixed set of choices is typed `Literal["a", "b"]` (Optional[...] where None means the
preset's value): pydantic refuses any other name, and the message lists the valid choices and the closest one. Code
that needs the names as a tuple takes them from the type (`typing.get_args`), and a mapping from the names to what
they select is checked against it (`named_by`), so the names are written once per meaning.

`check_field_types` also checks the benchmark file's dataclasses (tta.bench.fields.strict_dataclass).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
from typing import Annotated, Any, Callable, Dict, Iterator, List, Literal, Optional, Tuple, TypeVar, Union

import pydantic
import pydantic_core
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


# Config fields renamed after release, old name -> new name. The old name stays accepted wherever a config is given
# (make_config: create_adapter's keywords, `tta run --set`, a benchmark file's `config:`) and means the new one, so
# code and benchmark files written before the rename keep working; result rows keep their ids through
# tta.bench.results.RENAMED_FIELDS.
OLD_FIELD_NAMES: Dict[str, str] = {"backend": "judge", "adapt_backend": "adapt_judge", "backend_lr": "judge_lr"}


def with_new_names(config_cls, values: Dict[str, Any]) -> Dict[str, Any]:
    """`values` with every old field name (OLD_FIELD_NAMES) that `config_cls` has under its new name written with the
    new one; a field given under both names is refused. Other keys are left for make_config to accept or refuse."""
    valid = {f.name for f in dataclasses.fields(config_cls)}
    out = dict(values)
    for old, new in OLD_FIELD_NAMES.items():
        if old in out and new in valid and old not in valid:
            if new in out:
                raise TypeError(f"{config_cls.__qualname__}: {old!r} is the old name of {new!r}; give only {new!r}, "
                                f"not both (got {old}={out[old]!r} and {new}={out[new]!r})")
            out[new] = out.pop(old)
    return out


def make_config(config_cls, cfg=None, overrides: Optional[Dict[str, Any]] = None):
    """Build `config_cls` from an optional instance or dict plus keyword overrides; unknown keys are errors, and
    the values are checked by the class itself (see check_config). A field's old name (OLD_FIELD_NAMES) means its
    new one."""
    values: Dict[str, Any] = {}
    if isinstance(cfg, dict):
        values.update(with_new_names(config_cls, cfg))
    elif cfg is not None:
        values.update(dataclasses.asdict(cfg))
    values.update(with_new_names(config_cls, overrides or {}))
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise TypeError(f"unknown config key(s) {unknown} for {config_cls.__qualname__}; "
                        f"valid keys: {', '.join(valid)}")
    return config_cls(**values)


def fill_from_preset(config: Any, presets: Dict[str, Dict[str, Any]]) -> None:
    """Set the fields of `config` left unset (None) to the values of its named `preset` (a field typed with the
    Literal of the names of `presets`), so that a field given explicitly always wins over the preset. Call it in
    __post_init__ before the checks: the preset's values are then checked like the user's."""
    cls, where = type(config), type(config).__qualname__
    named_by(_hints(cls, False)["preset"], presets, f"{where}.preset")
    check_field_types(cls, {"preset": config.preset}, where)  # the name first: it says which values fill the rest
    for name, value in presets[config.preset].items():
        if getattr(config, name) is None:
            setattr(config, name, value)


V = TypeVar("V")


def literal_choices(hint: Any) -> Tuple[Any, ...]:
    """The values the Literal in `hint` allows (alone, Optional, in a Union or Annotated); () for other types."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return args
    if origin is Annotated:
        return literal_choices(args[0])
    return tuple(c for a in args for c in literal_choices(a)) if origin is Union else ()


def named_by(choices: Any, mapping: Dict[str, V], what: str = "") -> Dict[str, V]:
    """`mapping`, whose keys must be exactly the names the Literal `choices` allows: what each choice of a config
    field selects (a preset's values, a loss function), kept from drifting apart from the field's type."""
    names = literal_choices(choices)
    if set(names) != set(mapping):
        raise TypeError(f"{what or 'a mapping'} has the names {sorted(mapping)}, its Literal type {sorted(names)}")
    return mapping


def check_config(config: Any) -> None:
    """Refuse a config dataclass whose values have the wrong type or lie outside their declared range; the message
    names the field, the value and what is allowed."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    check_field_types(type(config), values, type(config).__qualname__)


def check_field_types(cls, values: Dict[str, Any], where: str) -> None:
    """Refuse values for dataclass `cls` of the wrong type (a string for a number, "false" for a boolean) before they
    silently mean something else, then values outside a declared range. pydantic decides; the message names the
    field, the value, what is allowed and how to write it."""
    hints = _hints(cls, False)
    for key, value in values.items():  # every type first: a wrong type is the likelier slip
        if key in hints and not _accepts(_validator(cls, key, False), value):
            raise ValueError(_wrong_type(cls, key, value, where))
    for key, value in values.items():
        if key in hints:
            try:
                _validator(cls, key, True).validate_python(value)
            except pydantic.ValidationError as err:  # only ranges are left to fail: the message is _range_error's
                error = err.errors(include_url=False)[0]
                inside = "".join(f"[{i}]" for i in error["loc"] if isinstance(i, int))
                raise ValueError(f"{where}: {key}{inside} {error['msg']}, got {error['input']!r}") from None


def _wrong_type(cls, key: str, value: Any, where: str) -> str:
    """The message for a value of field `key` of the wrong type, or a name that is not among its choices."""
    hint, how = _hints(cls, False)[key], _how_to_write(_validator(cls, key, False), value)
    names = literal_choices(hint)
    if names and isinstance(value, str):  # an unknown name: the valid ones, the closest, what else is allowed
        union = typing.get_origin(hint) is Union
        others = [a for a in typing.get_args(hint) if not literal_choices(a)] if union else []
        also = f" (or {' or '.join(_describe(a) for a in others)})" if others else ""
        why = "".join(f"; {d}" for d in _docs(_hints(cls, True)[key]))
        return f"{where}: {unknown_name_message(key, value, names)}{also}{how}{why}"
    return f"{where}: {key} must be {_describe(hint)}, got {type(value).__name__} {value!r}{how}"


def _docs(hint: Any) -> Iterator[str]:
    if typing.get_origin(hint) is Annotated:
        yield from (m.documentation for m in hint.__metadata__ if isinstance(m, DocInfo))
    for arg in typing.get_args(hint):
        if typing.get_origin(hint) is not Literal and arg is not Ellipsis and not isinstance(arg, (Interval, DocInfo)):
            yield from _docs(arg)


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


def describe_interval(interval: Interval) -> str:
    """[0, 1), (0, 1e+12] and so on."""
    def number(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else f"{v:,}".replace(",", "_") if v >= 10_000 else str(v)
    lo = f"[{number(interval.ge)}" if interval.ge is not None else f"({number(interval.gt)}"
    hi = f"{number(interval.le)}]" if interval.le is not None else f"{number(interval.lt)})"
    return f"{lo}, {hi}"


# ---- pydantic, one validator per (dataclass, field) -------------------------------------------------------------
_STRICT = pydantic.ConfigDict(strict=True, arbitrary_types_allowed=True)


@functools.lru_cache(maxsize=None)
def _hints(cls, with_ranges: bool) -> Dict[str, Any]:
    """The annotations of dataclass `cls`, or its plain types (Annotated stripped: no ranges)."""
    return typing.get_type_hints(cls, include_extras=with_ranges)


@functools.lru_cache(maxsize=None)
def _validator(cls, name: str, with_ranges: bool) -> pydantic.TypeAdapter:
    """Field `name` of `cls` with its declared ranges, or its plain type (the annotations stripped)."""
    return pydantic.TypeAdapter(_as_pydantic(_hints(cls, with_ranges)[name]), config=_STRICT)


def _as_pydantic(hint: Any) -> Any:
    """`hint` as pydantic should check it: a list or a tuple for either; a nested dataclass as an instance or a
    mapping, without building it (its own __post_init__ does, later); a value out of range reported with the whole
    range and why it is bounded."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        why = [m.documentation for m in hint.__metadata__ if isinstance(m, DocInfo)]
        whole_range = [pydantic.WrapValidator(_range_error(args[0], m, why))
                       for m in hint.__metadata__ if isinstance(m, Interval)]
        return Annotated[(_as_pydantic(args[0]), *hint.__metadata__, *whole_range)]
    if origin is Union:
        return Union[tuple(_as_pydantic(a) for a in args)]
    if origin in (tuple, list):
        inner = origin[tuple(a if a is Ellipsis else _as_pydantic(a) for a in args)] if args else origin
        return Annotated[inner, pydantic.BeforeValidator(lambda v: origin(v) if isinstance(v, (tuple, list)) else v)]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return Union[pydantic.InstanceOf[hint], dict]
    if hint is int:  # numpy's integers too, as Python's own checks take them (strict pydantic does not)
        return Annotated[int, pydantic.BeforeValidator(_as_int)]
    return hint


def _as_int(value: Any) -> Any:
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _range_error(kind: Any, interval: Interval, why: List[str]) -> Callable[[Any, Any], Any]:
    """A wrap validator that turns pydantic's "less than or equal to 1" into "a number in [0, 1]"."""
    text = f"must be {'an integer' if kind is int else 'a number'} in {describe_interval(interval)}"
    text += "".join(f" ({w})" for w in why)

    def whole_range(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except pydantic.ValidationError:
            raise pydantic_core.PydanticCustomError("out_of_range", text) from None
    return whole_range


def _accepts(validator: pydantic.TypeAdapter, value: Any) -> bool:
    try:
        validator.validate_python(value)
        return True
    except pydantic.ValidationError:
        return False


def _how_to_write(validator: pydantic.TypeAdapter, value: Any) -> str:
    """The YAML slip behind a refused string, when it is one."""
    if isinstance(value, str) and _accepts(validator, 1.0):
        try:
            float(value)
            return " (YAML reads 1e-3 as a string: write 1.0e-3)"
        except ValueError:
            return ""
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no") and _accepts(validator, True):
        return " (write true or false without quotes)"
    return ""


def _describe(hint: Any) -> str:
    """A plain annotation in words, for messages."""
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
        return "a mapping with string keys" if args[:1] == (str,) else "a mapping"
    if origin is Literal:
        return f"one of {', '.join(map(str, args))}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def numeric_fields(cls) -> Tuple[str, ...]:
    """The fields of dataclass `cls` that hold numbers (alone, optional or in a tuple): each must declare a range."""
    def numeric(hint: Any) -> bool:
        if hint in (int, float):
            return True
        return any(numeric(a) for a in typing.get_args(hint) if a is not Ellipsis)
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls) if numeric(hints[f.name]))
