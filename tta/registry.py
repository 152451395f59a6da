"""One small name -> factory registry, used for adapters, model sources and diffusion judges."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Dict, List


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable:
        def decorator(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj
        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise KeyError(unknown_name_message(self.kind, name, self.names()))
        return self._entries[name]

    def names(self, pattern: str = "*") -> List[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def unknown_name_message(kind: str, name: str, valid) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Valid choices: {', '.join(valid)}"
