"""Crash safety of `tta bench`: a real `python -m tta bench` subprocess is killed with SIGKILL at seeded random
points (while it builds its data, and after a random number of rows, polling the results file so the kills land
mid-run), resumed each time, and finally run to completion. The results file must then hold exactly the rows of
an uninterrupted run: the same keys, the same metrics (to 1e-6), each row once, and no partial line."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import copy

import tta
import torch
import yaml

from tta.bench.results import read_rows, row_key
from tta.bench.runner import run_benchmark
from tta.bench.spec import load_spec

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

SPEC = {
    "name": "fault-injection",
    "model": {"name": "zoo:fmnist-cnn"},
    "data": {"kind": "fashion-mnist", "per_class": 3, "corruptions": ["gaussian_noise", "shot_noise", "contrast"],
             "severities": [5]},
    "settings": ["episodic", "continual"],
    "batch_size": 10,
    "methods": ["source", "norm", {"name": "tent", "config": {"lr": 1.0e-3}}],
}
N_ROWS = 3 * 2 * 3  # methods x settings x domains
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def bench(spec: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tta", "bench", str(spec), "--out", str(out), "--no-progress"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def complete_lines(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.is_file() else 0


def kill_when(proc: subprocess.Popen, ready, extra_delay: float, timeout: float = 120) -> bool:
    """SIGKILL `proc` once `ready()` holds (plus a random delay); False when it finished on its own first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the benchmark made no progress"
        time.sleep(0.002)
    time.sleep(extra_delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def comparable(rows):
    return {row_key(r): (r["metrics"], r["n"], r["n_batches"], r["guard_events"]) for r in rows}


def assert_same_metrics(a, b):
    assert a.keys() == b.keys()
    for key in a:
        (ma, *rest_a), (mb, *rest_b) = a[key], b[key]
        assert rest_a == rest_b, key
        assert ma.keys() == mb.keys(), key
        for name in ma:
            if isinstance(ma[name], (int, float)) and ma[name] is not None:
                assert ma[name] == pytest.approx(mb[name], abs=1e-6), (key, name)
            else:
                assert ma[name] == mb[name], (key, name)


@pytest.mark.slow  # a run killed and resumed several times, each in a fresh interpreter
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_rows(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))

    # The uninterrupted run (in this process, one thread like the subprocesses).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = tmp_path / "reference.jsonl"
        run_benchmark(load_spec(spec_file), reference, progress=False)
    finally:
        torch.set_num_threads(threads)
    expected = read_rows(reference)
    assert len(expected) == N_ROWS

    rng = random.Random(8)
    out = tmp_path / "killed.jsonl"
    kills, landed = 0, []
    # 1) a kill at a random time before any row exists (imports, model and data building)
    proc = bench(spec_file, out)
    start = time.monotonic()
    if kill_when(proc, lambda: time.monotonic() - start > rng.uniform(0.5, 2.0), 0.0):
        kills += 1
        landed.append(complete_lines(out))
    # 2) kills after a random number of rows (increasing, so each resumed run gets further), at a random delay
    for target in sorted(rng.sample(range(1, N_ROWS - 2), 3)):
        proc = bench(spec_file, out)
        target = max(target, complete_lines(out) + 1)
        if kill_when(proc, lambda: complete_lines(out) >= target, rng.uniform(0.0, 0.05)):
            kills += 1
            landed.append(complete_lines(out))
        if kills == 2:  # a crash in the middle of writing a row leaves a partial last line
            with open(out, "ab") as f:
                f.write(b'{"benchmark": "fault-injection", "metrics": {"accur')
    assert kills >= 3, f"only {kills} kills landed before the run finished; rows at each kill: {landed}"
    assert any(0 < n < N_ROWS for n in landed), f"no kill landed mid-run: rows at each kill {landed}"

    proc = subprocess.run([sys.executable, "-m", "tta", "bench", str(spec_file), "--out", str(out), "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    data = out.read_bytes()
    assert data.endswith(b"\n"), "a partial last line survived"
    lines = data.decode().splitlines()
    assert all(line.strip() for line in lines)
    rows = [json.loads(line) for line in lines]  # every line is one whole JSON row
    assert len(rows) == N_ROWS and len({row_key(r) for r in rows}) == N_ROWS, "rows missing or written twice"
    assert_same_metrics(comparable(rows), comparable(expected))


def test_pathological_learning_rate_on_real_data_is_caught_by_the_guard():
    """TENT at lr 1e6 on corrupted Fashion-MNIST (the shipped subset) with the zoo classifier: the guard keeps
    every batch at or above the unadapted model under the same normalisation (norm), and says it intervened."""
    from tta.data.corruptions import corrupt_images
    from tta.data.fashion_mnist_subset import load_subset
    images, labels = load_subset()
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:32]
    x, y = corrupt_images(images[keep], "gaussian_noise", 5, seed=0), labels[keep]
    batches = [(x[i:i + 16], y[i:i + 16]) for i in (0, 16)] * 2  # a continual stream that comes back
    model = tta.create_model("zoo:fmnist-cnn")

    def accuracies(adapter):
        return [(adapter(xb).argmax(1) == yb).float().mean().item() for xb, yb in batches]

    reference = accuracies(tta.create_adapter("norm", copy.deepcopy(model)))
    tent = tta.create_adapter("tent", copy.deepcopy(model), lr=1e6)
    guarded = accuracies(tent)
    assert all(g >= r for g, r in zip(guarded, reference)), f"tent at lr 1e6 {guarded} < norm {reference}"
    assert sum(tent.guard_events.values()) > 0, "the guard never intervened at lr 1e6"
    assert all(torch.isfinite(p).all() for _, p in tent.adapted_params)
    unguarded = accuracies(tta.create_adapter("tent", copy.deepcopy(model), lr=1e6, guard=False))
    assert min(unguarded) < min(reference), "lr 1e6 does no harm without the guard: the test proves nothing"
