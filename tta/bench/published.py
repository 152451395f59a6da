"""Published numbers to set beside a run: tables in benchmarks/published/*.yaml, one entry per (method, setting,
source), each source with its citation, backbone and images. `tta report --published FILE` reads one
(load_published) and report.published_section puts each entry beside the user's runs of the same method and
setting.

    benchmark: cifar10-c          # the result rows it is compared with (their `benchmark`)
    dataset: CIFAR-10-C
    severity: 5
    unit: error                   # or accuracy; in percent, as the papers print them
    corruptions: standard         # or a list of corruption names
    sources:
      tent-readme: {citation: "...", url: ..., backbone: WRN-28-10, images: all 10,000 per corruption}
    entries:
      - {method: tent, setting: reset_per_shift, source: tent-readme, values: {gaussian_noise: 24.8, ...}, mean: 18.6}

A table is checked whole when it is read: unknown keys, methods, settings or corruption names, a source without a
citation, a value outside 0-100 or a printed mean that disagrees with its own per-corruption values are errors that
name the file and the entry, so a typo never puts a wrong number beside a user's run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

UNITS = ("error", "accuracy")
ANY_SETTING = "any"  # a stateless method (source; norm with test-batch statistics): the same in every setting
MEAN_TOLERANCE = 0.1  # points: printed means are rounded to one decimal, as are the values they average

_TOP_KEYS = {"benchmark", "dataset", "severity", "unit", "corruptions", "sources", "entries"}
_SOURCE_KEYS = {"citation", "url", "backbone", "images", "batch_size", "note"}
_ENTRY_KEYS = {"method", "setting", "source", "values", "mean", "note", "backbone", "images"}


@dataclass
class PublishedEntry:
    """One published row: per-corruption values (any subset of the table's corruptions) and/or the printed mean,
    in the table's unit (percent)."""
    method: str
    setting: str
    source: str
    citation: str
    backbone: str
    images: str
    values: Dict[str, float] = field(default_factory=dict)
    printed_mean: Optional[float] = None
    note: str = ""
    url: str = ""

    def mean(self, corruptions: List[str]) -> Optional[float]:
        """The printed mean, else the mean of the values when every corruption has one, else None."""
        if self.printed_mean is not None:
            return self.printed_mean
        if all(c in self.values for c in corruptions):
            return sum(self.values[c] for c in corruptions) / len(corruptions)
        return None

    def matches(self, method: str, setting: str) -> bool:
        return self.method == method and self.setting in (setting, ANY_SETTING)

    @property
    def label(self) -> str:
        return f"{self.method}, {self.setting} [{self.source}]"


@dataclass
class PublishedTable:
    path: str
    benchmark: str
    dataset: str
    severity: int
    unit: str
    corruptions: List[str]
    sources: Dict[str, Dict[str, str]]
    entries: List[PublishedEntry]

    def from_accuracy(self, accuracy: float) -> float:
        """A result row's accuracy (a fraction) in this table's unit (percent): explicit, as the tables mix both."""
        return 100.0 * (1.0 - accuracy) if self.unit == "error" else 100.0 * accuracy


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def _unknown_keys(where: str, values: dict, allowed: set) -> None:
    extra = sorted(set(values) - allowed)
    if extra:
        raise _fail(where, f"unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(sorted(allowed))}")


def _percent(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 100:
        raise _fail(where, f"{value!r} is not a percentage between 0 and 100; copy the number as printed")
    return float(value)


def _text(where: str, values: dict, key: str) -> str:
    value = values.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"needs `{key}` (text)")
    return " ".join(value.split())


def parse_published(values, path: str = "published table") -> PublishedTable:
    """A published table from its YAML data, checked whole (see the module docstring)."""
    from ..adapter import ADAPTERS
    from ..data.corruptions import EXTRA, STANDARD
    from ..data.streams import SETTINGS
    from ..registry import unknown_name_message
    if not isinstance(values, dict):
        raise _fail(path, "a published table holds a mapping at the top level")
    _unknown_keys(path, values, _TOP_KEYS)
    missing = sorted(k for k in _TOP_KEYS if k not in values)
    if missing:
        raise _fail(path, f"missing key(s) {', '.join(missing)}")
    unit = values["unit"]
    if unit not in UNITS:
        raise _fail(path, f"unit must be one of {', '.join(UNITS)} (in percent), got {unit!r}")
    severity = values["severity"]
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise _fail(path, f"severity must be 1 to 5, got {severity!r}")
    corruptions = values["corruptions"]
    if corruptions == "standard":
        corruptions = list(STANDARD)
    if not isinstance(corruptions, list) or not corruptions:
        raise _fail(path, "corruptions must be `standard` or a list of corruption names")
    for c in corruptions:
        if c not in STANDARD + EXTRA:
            raise _fail(path, "corruptions: " + unknown_name_message("corruption", c, STANDARD + EXTRA))

    sources = values["sources"]
    if not isinstance(sources, dict) or not sources:
        raise _fail(path, "sources must map a short name to {citation, backbone, images, ...}")
    parsed_sources: Dict[str, Dict[str, str]] = {}
    for name, source in sources.items():
        where = f"{path}: sources.{name}"
        if not isinstance(source, dict):
            raise _fail(where, "must be a mapping with citation, backbone and images")
        _unknown_keys(where, source, _SOURCE_KEYS)
        parsed_sources[name] = {k: " ".join(str(v).split()) for k, v in source.items()}
        _text(where, source, "citation")  # a number without its citation is never shown

    entries_in = values["entries"]
    if not isinstance(entries_in, list) or not entries_in:
        raise _fail(path, "entries must be a list of {method, setting, source, values and/or mean}")
    entries: List[PublishedEntry] = []
    seen = set()
    for i, e in enumerate(entries_in):
        where = f"{path}: entries[{i}]"
        if not isinstance(e, dict):
            raise _fail(where, "must be a mapping {method, setting, source, values and/or mean}")
        _unknown_keys(where, e, _ENTRY_KEYS)
        method, setting, source = _text(where, e, "method"), _text(where, e, "setting"), _text(where, e, "source")
        where = f"{path}: entries[{i}] ({method}, {setting}, {source})"
        if method not in ADAPTERS:
            raise _fail(where, unknown_name_message("method", method, ADAPTERS.names()))
        if setting not in SETTINGS + (ANY_SETTING,):
            raise _fail(where, unknown_name_message("setting", setting, SETTINGS + (ANY_SETTING,)))
        if source not in parsed_sources:
            raise _fail(where, f"source {source!r} is not among `sources` ({', '.join(parsed_sources)}); add it "
                               "there with its citation, backbone and images")
        if (method, setting, source) in seen:
            raise _fail(where, "appears twice; give one entry per (method, setting, source)")
        seen.add((method, setting, source))
        merged = {**parsed_sources[source], **{k: e[k] for k in ("backbone", "images") if k in e}}
        backbone, images = _text(where, merged, "backbone"), _text(where, merged, "images")
        raw = e.get("values") or {}
        if not isinstance(raw, dict):
            raise _fail(where, "values must map corruption names to numbers")
        for c in raw:
            if c not in corruptions:
                raise _fail(where, "values: " + unknown_name_message("corruption", c, corruptions))
        entry_values = {c: _percent(f"{where}: values.{c}", v) for c, v in raw.items()}
        mean = _percent(f"{where}: mean", e["mean"]) if e.get("mean") is not None else None
        if mean is None and not entry_values:
            raise _fail(where, "needs `values` (per corruption) and/or `mean`")
        if mean is not None and all(c in entry_values for c in corruptions):
            average = sum(entry_values[c] for c in corruptions) / len(corruptions)
            if abs(average - mean) > MEAN_TOLERANCE:
                raise _fail(where, f"mean {mean} disagrees with the mean of its values ({average:.2f}); one of them "
                                   "is mistyped: check the source")
        entries.append(PublishedEntry(method, setting, source, parsed_sources[source]["citation"], backbone, images,
                                      entry_values, mean, " ".join(str(e.get("note", "")).split()),
                                      parsed_sources[source].get("url", "")))
    return PublishedTable(str(path), str(values["benchmark"]), str(values["dataset"]), severity, unit,
                          list(corruptions), parsed_sources, entries)


def load_published(path) -> PublishedTable:
    """A published table file (benchmarks/published/*.yaml), read as plain YAML data and checked whole."""
    from .spec import read_yaml
    path = Path(path)
    if not path.is_file():
        shipped = Path(__file__).resolve().parents[2] / "benchmarks" / "published"
        known = ", ".join(str(p) for p in sorted(shipped.glob("*.yaml"))) if shipped.is_dir() else ""
        raise FileNotFoundError(f"published table {str(path)!r} does not exist; pass a file such as "
                                f"{known or 'benchmarks/published/cifar10-c.yaml'}")
    return parse_published(read_yaml(path), str(path))
