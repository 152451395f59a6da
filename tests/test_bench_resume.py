"""Resuming and sharing a results file: a resumed row equals the uninterrupted one, two runs never write a row
twice, a row's key names the exact model and config it was computed with."""
import json

import pytest
import timm
import torch

from tta.bench.results import read_rows, row_key
from tta.bench.runner import run_benchmark
from tta.bench.spec import parse_spec


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=10).state_dict(), path)
    return path


def spec_values(weights, **extra):
    values = {
        "name": "tiny", "batch_size": 4,
        "model": {"name": "timm:test_resnet", "weights": str(weights), "input_size": [3, 32, 32],
                  "kwargs": {"num_classes": 10}},
        "data": {"kind": "foolbox", "set": "cifar10", "corruptions": ["gaussian_noise", "fog"], "severities": [5],
                 "clean": True, "max_images": 8},
        "settings": ["reset_per_shift"],
        "methods": [{"name": "cotta", "config": {"n_augmentations": 2, "lr": 1e-2}},
                    {"name": "memo", "config": {"n_augmentations": 2, "lr": 1e-2}}],
    }
    values.update(extra)
    return values


def outcome(row):
    return row["metrics"], row["per_image"], row["n"]


def test_resumed_reset_per_shift_rows_of_random_methods_equal_the_uninterrupted_run(tiny_weights, tmp_path):
    torch.set_num_threads(1)
    reference = tmp_path / "reference.jsonl"
    run_benchmark(parse_spec(spec_values(tiny_weights)), reference, progress=False)
    rows = read_rows(reference)
    assert len(rows) == 6
    # a run that stopped before the last two domains of each method
    resumed = tmp_path / "resumed.jsonl"
    kept = [r for r in rows if r["domain"] == "foolbox-cifar10"]
    resumed.write_text("".join(json.dumps(r) + "\n" for r in kept))
    summary = run_benchmark(parse_spec(spec_values(tiny_weights)), resumed, progress=False)
    assert summary["written"] == 4 and summary["skipped"] == 2
    expected = {row_key(r): outcome(r) for r in rows}
    assert {row_key(r): outcome(r) for r in read_rows(resumed)} == expected
