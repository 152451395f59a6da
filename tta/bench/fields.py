"""Reading values of a benchmark file: strict dataclasses and paths with ~ and $VARS. Shared by the spec and the
data kinds, so neither imports the other."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import check_field_types


def strict_dataclass(cls, values: Any, where: str):
    """Build dataclass `cls` from a mapping; unknown or missing keys raise with the list of valid ones."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(values).__name__}: {values!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {', '.join(valid)}")
    check_field_types(cls, values, where)  # a string for a number, "false" for a boolean: ValueError
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"{where}: {err}; valid keys: {', '.join(valid)}") from err
    except ValueError as err:  # a value out of range: say in which file and section
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: {err}") from err


def expand_path(value: str, what: str, alternative: str = "") -> Path:
    """~ and $VARS expanded; a variable that is not set is an error rather than a folder named '$VAR'."""
    import os
    import re
    expanded = os.path.expandvars(str(value))
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        raise ValueError(f"{what} {value!r} uses the environment variable(s) {', '.join(unset)}, which are not set; "
                         f"export them (e.g. export {unset[0]}=/path/to/data) {alternative}".rstrip())
    return Path(expanded).expanduser()
