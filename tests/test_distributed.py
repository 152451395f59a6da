"""`torchrun -m tta bench` (2 gloo processes) writes exactly the rows and metrics of a single-process run: episodic
streams sharded by example, reset_per_shift by domain, continual and mixed streams whole; and a rerun resumes."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from tta.bench.distributed import rank_file
from tta.bench.metrics import ClassificationMeter, DepthMeter, ObjectDiscoveryMeter, SegmentationMeter, merge_meters
from tta.bench.results import read_rows, row_key


def write_spec(tmp_path):
    spec = {
        "name": "dist", "batch_size": 3, "seeds": [0],
        "model": {"name": "zoo:fmnist-cnn"},
        "data": {"kind": "fashion-mnist", "per_class": 2, "clean": True, "corruptions": ["gaussian_noise", "fog"],
                 "severities": [5], "cache": str(tmp_path / "cache")},
        "settings": ["episodic"],
        "methods": [
            {"name": "source"},
            {"name": "norm"},  # batch statistics: the batches must hold the same images as in one process
            {"name": "tent", "config": {"lr": 1.0e-3, "optimizer": "adam"},
             "settings": ["episodic", "reset_per_shift", "continual"]},
            {"name": "norm", "label": "norm-mixed", "settings": ["mixed"]},
            # random augmentations drawn from torch's global generator: seeded per episode, and per domain of a
            # reset_per_shift stream, by the runner
            {"name": "memo", "config": {"n_augmentations": 4, "lr": 0.05}, "settings": ["episodic", "reset_per_shift"]},
        ],
    }
    path = tmp_path / "dist.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def bench(args, env_extra=None, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def torchrun(spec, out, port):
    return bench(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                  "-m", "tta", "bench", str(spec), "--out", str(out), "--no-progress"])


def by_key(rows):
    return {row_key(r): r for r in rows}


@pytest.mark.slow  # three torchrun launches of two processes
def test_torchrun_matches_single_process(tmp_path):
    spec = write_spec(tmp_path)
    single, multi = tmp_path / "single.jsonl", tmp_path / "multi.jsonl"
    done = bench(["-m", "tta", "bench", str(spec), "--out", str(single), "--no-progress"])
    assert done.returncode == 0, done.stderr
    done = torchrun(spec, multi, 29517)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "row(s) merged" in done.stdout

    one, two = by_key(read_rows(single)), by_key(read_rows(multi))
    assert len(one) == 8 * 3 and set(one) == set(two)
    assert len(read_rows(multi)) == len(two)  # no duplicates
    for key, row in one.items():
        other = two[key]
        assert other["n"] == row["n"], key
        for name, value in row["metrics"].items():
            if value is None:
                assert other["metrics"][name] is None
            else:
                assert other["metrics"][name] == pytest.approx(value, abs=1e-6), (key, name)
        # per-image records survive the merge: the same images with the same outcomes, whatever the shard order
        mine, theirs = row["per_image"], other["per_image"]
        assert sorted(zip(*mine.values())) == sorted(zip(*theirs.values())), key
    sharded = [r for r in two.values() if r["setting"] == "episodic"]
    assert sharded and all(r["distributed"] == {"world_size": 2, "sharded_by": "example"} for r in sharded)
    assert all(r["curve"][-1][1] == r["n"] for r in sharded)
    # each rank wrote only its own file; the episodic shards split every domain between the ranks
    ranks = [read_rows(rank_file(multi, r)) for r in (0, 1)]
    assert all(ranks)
    shards = [[r for r in rows if r.get("shard")] for rows in ranks]
    assert {r["shard"]["rank"] for r in shards[0]} == {0} and {r["shard"]["rank"] for r in shards[1]} == {1}
    assert all(0 < r["n"] < 20 for rows in shards for r in rows)

    # resume: with the merged file lost and one merged row missing from the rank files too, a rerun recomputes
    # only that shard and merges every row again
    merged = read_rows(multi)
    multi.unlink()
    lost = next(r for r in ranks[1] if r.get("shard"))
    kept = [r for r in ranks[1] if r is not lost]
    rank_file(multi, 1).write_text("".join(json.dumps(r) + "\n" for r in kept))
    sizes = [rank_file(multi, r).stat().st_size for r in (0, 1)]
    done = torchrun(spec, multi, 29518)
    assert done.returncode == 0, done.stdout + done.stderr
    again = by_key(read_rows(multi))
    assert set(again) == set(one) and len(read_rows(multi)) == len(again)
    assert rank_file(multi, 0).stat().st_size == sizes[0]           # rank 0 had nothing to redo
    assert len(read_rows(rank_file(multi, 1))) == len(kept) + 1       # rank 1 redid the lost shard only
    for key, row in by_key(merged).items():
        assert again[key]["metrics"] == row["metrics"]


def _meter_batches(task):
    import torch
    torch.manual_seed(0)
    if task == "classification":
        return ClassificationMeter(class_subset=[0, 2, 3, 4]), [(torch.randn(4, 5), torch.tensor([0, 2, -1, 4]))
                                                                 for _ in range(3)]
    if task == "segmentation":
        return SegmentationMeter(3), [(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))) for _ in range(3)]
    if task == "depth":
        return DepthMeter(), [(torch.rand(2, 1, 12, 12) + 0.5, torch.rand(2, 1, 12, 12) + 0.5) for _ in range(3)]
    return ObjectDiscoveryMeter(), [(torch.randn(2, 4, 8, 8), torch.randint(0, 3, (2, 8, 8))) for _ in range(3)]


@pytest.mark.parametrize("task", ["classification", "segmentation", "depth", "object_discovery"])
def test_meter_state_round_trips_through_json(task):
    import copy

    import torch
    whole, batches = _meter_batches(task)
    parts = [copy.deepcopy(whole), copy.deepcopy(whole)]
    for i, (x, y) in enumerate(batches):
        ids = torch.arange(len(x)) + i * len(x)
        whole.update(x, y, ids)
        parts[i % 2].update(x, y, ids)
    states = [json.loads(json.dumps(m.state())) for m in parts]
    merged = merge_meters(states)
    assert type(merged) is type(whole) and merged.n == whole.n
    assert merged.compute() == pytest.approx(whole.compute())
    assert sorted(zip(*merged.per_image().values())) == sorted(zip(*whole.per_image().values()))
