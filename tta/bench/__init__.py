"""Benchmarks: YAML specs (spec), data kinds (datasets), the resumable runner, metrics, the results store and
generated reports. `tta bench | report | compare` are wired in tta.bench.cli."""
from .datasets import DATA_KINDS, register_data_kind  # noqa: F401
from .results import ResultStore, read_rows  # noqa: F401
from .runner import run_benchmark  # noqa: F401
from .spec import BenchmarkSpec, load_spec, parse_spec  # noqa: F401
