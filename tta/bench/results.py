"""The results store: one JSON object per line, each row written whole and keyed, so runs resume.

A row is appended with a single write, then flushed and fsynced, under an exclusive lock, so a crash leaves
at most one partial last line. Opening the store repairs that: the fragment after the last newline is cut off
(complete rows are never touched) and its key is simply run again. A whole run holds `<file>.lock` (run_lock), so
two runs never compute and append the same rows.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

from ..config import OLD_FIELD_NAMES

KEY_FIELDS = ("benchmark", "method", "config_id", "model", "data_id", "domain", "severity", "setting",
              "batch_size", "seed")


# What every consumer of a row relies on: its key and its metrics.
ROW_FIELDS = KEY_FIELDS + ("metrics",)


# Config fields added after the ids of result rows were frozen, with the value every earlier row ran with. A field at
# that value is left out of the id, so adding a field with a default leaves the id of every existing row, committed
# or a user's, as it was, and their rows are found on resume instead of computed again. Scopes: "adapter" (fields of
# every method's config, tta.adapter.AdapterConfig), "adapter:<method>", "data" (every data kind's) and
# "data:<kind>". tests/test_config_ids.py fails until a new field is entered here, e.g.
#     "adapter:tent": {"warmup_steps": 0},
# Ids hash values, not defaults: a field whose *default* changes later must keep its entry's old value, so that the
# rows made with the old default are told apart from those with the new one.
ADDED_FIELDS: Dict[str, Dict[str, Any]] = {
    "adapter": {"nesterov": False},
    "adapter:tent": {"preset": "tta", "norms": "all"},
    "adapter:eata": {"preset": "tta", "fisher_data": None, "fisher_size": 2000, "keep_average_on_reset": False,
                     "norms": "all"},
    "adapter:cotta": {"preset": "tta", "loss": "ce", "adapt": "all", "augment": "tta"},
    "adapter:sar": {"preset": "tta", "always_step": False, "recovery": "source", "lr_rule": "fixed"},
    "adapter:memo": {"preset": "tta", "prior_strength": -1.0, "augment": "tta", "crop": "resized"},
    "adapter:norm": {"preset": "tta", "bn_eps": -1.0},
    "data": {"exclude_per_class": None},
}

# Config fields renamed after result rows were written: scope (as in ADDED_FIELDS) -> {new name: the name the rows
# were written with}, the inverse of tta.config.OLD_FIELD_NAMES (which configs use to accept the old names). A row's id
# hashes its config's field names, so config_id puts each field back under its old name before hashing: a config
# written with the new names keeps the id of its committed rows, and a rerun of a committed spec skips them. Old names
# in a config (rows written before the rename) are left as they are and hash the same. Ids are frozen: a later rename
# of a renamed field must map the newest name to the oldest, the name the ids were computed with.
RENAMED_FIELDS: Dict[str, Dict[str, str]] = {"adapter": {new: old for old, new in OLD_FIELD_NAMES.items()}}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def config_id(config: Dict[str, Any], scopes: Iterable[str] = ()) -> str:
    """A short stable hash of a config dict (key order and JSON number formatting do not matter). Fields that
    ADDED_FIELDS lists for one of `scopes`, at their listed value, are left out (see ADDED_FIELDS), and fields that
    RENAMED_FIELDS lists are hashed under the name they had when ids were frozen."""
    added: Dict[str, Any] = {}
    renamed: Dict[str, str] = {}
    for scope in scopes:
        added.update(ADDED_FIELDS.get(scope, {}))
        renamed.update(RENAMED_FIELDS.get(scope, {}))
    kept = {renamed.get(k, k): v for k, v in config.items()
            if k not in added or _canonical(v) != _canonical(added[k])}
    return hashlib.sha1(_canonical(kept).encode()).hexdigest()[:12]


_SHA256_CACHE: Dict[tuple, str] = {}


def file_sha256(path) -> str:
    """The SHA-256 of a file's content, or of a folder's files and their relative names (a model folder); computed
    once per file version in a process (keyed by path, size and modification time)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stats not in _SHA256_CACHE:
        digest = hashlib.sha256()
        for p in files:
            if path.is_dir():
                digest.update(f"{p.relative_to(path).as_posix()}\0{p.stat().st_size}\0".encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        _SHA256_CACHE[stats] = digest.hexdigest()
    return _SHA256_CACHE[stats]


def row_key(row: Dict[str, Any]) -> str:
    missing = [k for k in KEY_FIELDS if k not in row]
    if missing:
        raise KeyError(f"result row lacks key field(s) {missing}")
    return json.dumps([row[k] for k in KEY_FIELDS], default=str)


def _lock(f) -> None:
    try:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except ImportError:  # Windows: no advisory locks; a single writer per file is then the user's job
        pass


def prepare_results_path(path) -> Path:
    """`path` as a results file to write: refused if it is a folder or lies under a file; its folder is made."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"results file {str(path)!r} is a folder; pass a file name, e.g. "
                                f"{str(path / 'results.jsonl')!r}")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"cannot put results file {str(path)!r} under {str(blocker)!r}, which is a "
                                 "file, not a folder; pass a path in an existing or new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class ResultsBusyError(OSError):
    """Another process holds the run lock of a results file."""


def lock_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextmanager
def run_lock(path) -> Iterator[None]:
    """Hold `<path>.lock` while a run writes `path`, so two runs never compute and write the same rows: a second
    run refuses at once (ResultsBusyError) instead of waiting. The lock is an flock, so the kernel drops it when
    its process dies, even by SIGKILL: a lock file left behind never blocks a later run."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run per results file is then the user's job
        yield
        return
    where = lock_path(prepare_results_path(path))
    while True:
        f = open(where, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ResultsBusyError(
                f"results file {str(path)!r} is being written by another run (process {holder}, "
                f"lock {str(where)!r}); wait for it to finish and rerun the same command (it resumes from the rows "
                "present), or pass another --out") from None
        # The holder before us unlinks the lock file on release: if we locked a file no longer at `where`, a third
        # run could lock a new one there at the same time, so start again.
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(where))
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        try:
            os.unlink(where)  # before unlocking, so no run locks a file that is about to vanish
        except OSError:
            pass
        f.close()


def append_row(path, row: Dict[str, Any]) -> None:
    """One whole line per row: a single write under an exclusive lock, flushed and fsynced, so a crash leaves at
    most a partial last line and concurrent writers never interleave. A write that fails (disk full, Ctrl-C in
    the middle of a large write) is cut back to where it started, so the file holds whole rows only."""
    line = (json.dumps(row, sort_keys=True, default=_json_default) + "\n").encode()
    with open(path, "ab") as f:
        _lock(f)
        start = f.seek(0, os.SEEK_END)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            _cut_back(f, start)
            raise


def _cut_back(f, size: int) -> None:
    """Drop what a failed write left after `size` bytes; the buffered rest is discarded, never written later."""
    try:
        os.ftruncate(f.fileno(), size)
        os.fsync(f.fileno())
    except OSError:  # nothing more to do: the next ResultStore cuts a partial last line when it opens the file
        pass
    try:
        f.raw.close()  # close without flushing what is still buffered (that would append the fragment again)
    except OSError:
        pass


def read_rows(path) -> List[Dict[str, Any]]:
    """Complete rows of a results file; a partial last line (a crash mid-write) is skipped with a warning. A line
    that is not a result row (not UTF-8, not JSON, not an object, a key field missing) is an error that names
    the file and the line."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"results file {str(path)!r} is a folder; pass a results file (.jsonl) written by "
                                "`tta bench`")
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist; produce it with `tta bench`")
    rows = []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" for a complete file
    if tail.strip():
        warnings.warn(f"{path}: ignoring an incomplete last line ({len(tail)} bytes) from an interrupted write")
    for n, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_parse_row(line, f"{path}:{n}"))
    return rows


def _new_name(key: str, config: Dict[str, Any]) -> str:
    """A stored config's field name as configs are written now (OLD_FIELD_NAMES), unless the new name is there too."""
    new = OLD_FIELD_NAMES.get(key)
    return new if new is not None and new not in config else key


def _parse_row(line: bytes, where: str) -> Dict[str, Any]:
    fix = "it was edited by hand or comes from another program? remove that line (its row is computed again)"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: byte 0x{line[err.start]:02x} at column {err.start + 1} is not UTF-8 text; "
                         f"{fix}") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not a JSON row ({err}); {fix}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where} holds a JSON {type(row).__name__}, not a result row (a JSON object); {fix}")
    missing = [k for k in ROW_FIELDS if k not in row]
    if missing:
        raise ValueError(f"{where}: the row lacks field(s) {missing} that every result row has; {fix}")
    config = row.get("config")
    if isinstance(config, dict):  # a row written before a field was renamed reads with the new name
        row["config"] = {_new_name(k, config): v for k, v in config.items()}
    return row


class ResultStore:
    """Append-only JSON-lines file of result rows, with the keys already present for resuming."""

    def __init__(self, path):
        self.path = prepare_results_path(path)
        self.reload()

    def reload(self) -> None:
        """Read the keys present again (a run that held the file before ours may have added rows)."""
        self.keys = set()
        if self.path.is_file():
            self._repair()
            self.keys = {row_key(r) for r in read_rows(self.path)}

    def _repair(self) -> None:
        """Cut a partial last line so the next row starts on a line of its own."""
        with open(self.path, "rb+") as f:
            _lock(f)
            data = f.read()
            cut = data.rfind(b"\n") + 1
            if cut < len(data):
                warnings.warn(f"{self.path}: removing an incomplete last line ({len(data) - cut} bytes) left by an "
                              "interrupted run; its row will be computed again")
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def append(self, row: Dict[str, Any]) -> bool:
        """Write `row` unless its key is present; returns whether it was written."""
        key = row_key(row)
        if key in self.keys:
            return False
        try:
            append_row(self.path, row)
        except OSError as err:  # disk full, quota, a file system gone read-only
            full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            raise OSError(err.errno, f"could not write a result row to {str(self.path)!r} ({err.strerror or err}); "
                          f"the {len(self.keys)} complete row(s) already in the file are kept and the unfinished one "
                          f"was removed; {'free some disk space' if full else 'fix that'} and rerun the same "
                          "command: it resumes from the rows present") from err
        self.keys.add(key)
        return True

    def rows(self) -> List[Dict[str, Any]]:
        return read_rows(self.path) if self.path.is_file() else []


def unique_rows(rows: List[Dict[str, Any]], where: str = "results") -> List[Dict[str, Any]]:
    """One row per key, the last written, with a warning naming the repeated keys. tta bench never writes a key
    twice, but files joined by hand (`cat a.jsonl b.jsonl`) or written by two runs of an older tta can hold both."""
    last: Dict[str, int] = {}
    for i, r in enumerate(rows):
        last[row_key(r)] = i
    if len(last) == len(rows):
        return rows
    repeated = sorted({(r["method"], r["setting"], r["domain"]) for i, r in enumerate(rows) if last[row_key(r)] != i})
    shown = ", ".join(f"{m} {s} {d}" for m, s, d in repeated[:5]) + (" ..." if len(repeated) > 5 else "")
    warnings.warn(f"{where}: {len(rows) - len(last)} row(s) repeat the key of a later row ({shown}); using the last "
                  "row of each key. Remove the earlier lines to silence this")
    return [r for i, r in enumerate(rows) if last[row_key(r)] == i]


# ---- comparing a run with a reference run ------------------------------------------------------------------
def reference_file(benchmark: str) -> Optional[Path]:
    """The committed run of a benchmark, `results/<name>.jsonl`, in the current folder or in the checkout tta runs
    from; None when neither has one (an installed package ships no results)."""
    name = f"{Path(benchmark).stem}.jsonl"
    for folder in (Path("results"), Path(__file__).resolve().parents[2] / "results"):
        if (folder / name).is_file():
            return folder / name
    return None


def compare_runs(path, reference, tol: float = 1e-6) -> str:
    """One paragraph: how the rows of results file `path` compare with those of the same keys in `reference`.
    Outcomes are the per-image records where both rows have them (each image's prediction), else the metrics;
    numbers agree within `tol` (relative or absolute). Timings are never compared."""
    rows = {row_key(r): r for r in unique_rows(read_rows(path), str(path))}
    ref = {row_key(r): r for r in unique_rows(read_rows(reference), str(reference))}
    both = [k for k in rows if k in ref]
    differ = [k for k in both if not _same_outcome(rows[k], ref[k], tol)]
    head = f"compared with {reference}: "
    if not both:
        return (head + f"no row of {path} has a key in the reference (another config, model, data or --limit?), so "
                "there is nothing to compare")
    text = head + f"{len(both) - len(differ)} of {len(both)} row(s) in both have the same outcomes"
    if differ:
        shown = "; ".join(_outcome_line(rows[k], ref[k]) for k in differ[:5]) + ("; ..." if len(differ) > 5 else "")
        text += f"; {len(differ)} differ ({shown})"
    only_here, only_ref = len(rows) - len(both), len(ref) - len(both)
    if only_here or only_ref:
        text += f"; {only_here} row(s) only in {path}, {only_ref} only in the reference"
    return text


def _same_outcome(a: Dict[str, Any], b: Dict[str, Any], tol: float) -> bool:
    pa, pb = a.get("per_image"), b.get("per_image")
    if pa and pb:
        return _close(_by_image(pa), _by_image(pb), tol)
    return _close(a["metrics"], b["metrics"], tol)


def _by_image(records: Dict[str, list]) -> Dict[Any, Dict[str, Any]]:
    """Per-image records keyed by image id (shards and runs may list the images in another order)."""
    fields = [k for k in records if k != "id"]
    return {i: {k: records[k][n] for k in fields} for n, i in enumerate(records["id"])}


def _close(a: Any, b: Any, tol: float) -> bool:
    import math
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _outcome_line(row: Dict[str, Any], ref: Dict[str, Any]) -> str:
    metric = row.get("primary_metric") or next(iter(row["metrics"]), None)
    value, was = row["metrics"].get(metric), ref["metrics"].get(metric)
    number = (lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else str(v))
    return f"{row['method']} {row['setting']} {row['domain']}: {metric} {number(value)}, reference {number(was)}"


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


# ---- provenance --------------------------------------------------------------------------------------------
def package_versions(names: Iterable[str] = ("tta", "torch", "torchvision", "timm", "open_clip_torch",
                                             "segmentation-models-pytorch", "diffusers", "numpy",
                                             "imagecorruptions-imaug")) -> Dict[str, Optional[str]]:
    from importlib import metadata
    out: Dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(path=None) -> Optional[str]:
    """The commit of the checkout holding the package, with "+dirty" for uncommitted changes; None outside git."""
    where = Path(path or Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_description(device: str) -> str:
    import platform
    import torch
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    cpu = platform.processor() or platform.machine()
    return f"{dev.type}:{cpu} x{os.cpu_count()} threads={torch.get_num_threads()}"
