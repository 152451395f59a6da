"""Bad input to `tta bench`, `tta run` and `tta report` is one line, `tta <command>: error: ...`, exit code 2, naming
the file (and line) at fault and what to do; results already written are never lost. All offline, on the zoo's
Fashion-MNIST CNN and the test subset shipped in the package."""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tta.bench.results import read_rows
from tta.bench.spec import load_spec
from tta.cli import main
from tta.zoo import checkpoint_path

BASE = {"name": "tiny", "model": {"name": "zoo:fmnist-cnn"},
        "data": {"kind": "fashion-mnist", "corruptions": ["fog", "snow"], "per_class": 1},
        "settings": ["reset_per_shift"], "batch_size": 5, "methods": ["source"]}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def write_spec(path: Path, **changes) -> Path:
    values = json.loads(json.dumps(BASE))
    values.update(changes)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def error_of(capsys, command: str) -> str:
    """The whole of stderr after the progress bars (cleared with a carriage return): one error line of `command`."""
    err = capsys.readouterr().err.rsplit("\r", 1)[-1].strip()
    assert err.startswith(f"tta {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def bench(*args):
    return main(["bench", *map(str, args), "--no-progress", "--device", "cpu"])


# ---- benchmark files ---------------------------------------------------------------------------------------------
def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: {name: [\n")
    assert bench(path) == 2
    err = error_of(capsys, "bench")
    assert "broken.yaml: line 3" in err and "not valid YAML" in err


def test_a_python_tag_is_refused_clearly_and_never_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "tag.yaml"
    text = yaml.safe_dump(BASE, sort_keys=False)
    path.write_text(text.replace("- source", f"- !!python/object/apply:os.system ['touch {marker}']"))
    assert bench(path) == 2
    err = error_of(capsys, "bench")
    assert "tag.yaml: line" in err and "!!python/object/apply:os.system" in err and "remove the tag" in err
    assert not marker.exists()


def test_yaml_merge_keys_work_and_duplicates_are_still_refused(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in BASE.items() if k != "methods"}, sort_keys=False) +
                    "methods:\n"
                    "  - {name: tent, config: &common {lr: 1.0e-4, steps: 1}}\n"
                    "  - {name: tent, label: tent-2, config: {<<: *common, steps: 2}}\n")
    tent, tent2 = load_spec(path).methods
    assert tent.config == {"lr": 1.0e-4, "steps": 1} and tent2.config == {"lr": 1.0e-4, "steps": 2}
    path.write_text(path.read_text().replace("steps: 2}", "steps: 2, steps: 3}"))
    last = len(path.read_text().splitlines())
    with pytest.raises(ValueError, match=rf"merge.yaml: line {last}: key 'steps' appears twice"):
        load_spec(path)


def test_a_non_utf8_benchmark_file_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    text = yaml.safe_dump(BASE, sort_keys=False).encode()
    path.write_bytes(text + b"description: caf\xe9\n")
    assert bench(path) == 2
    err = error_of(capsys, "bench")
    line = len(text.splitlines()) + 1
    assert f"latin1.yaml: line {line}" in err and "not UTF-8" in err and "save the file as UTF-8" in err


def test_batch_size_zero_is_refused_naming_the_file(tmp_path, capsys):
    assert bench(write_spec(tmp_path / "zero.yaml", batch_size=0), "--out", tmp_path / "r.jsonl") == 2
    err = error_of(capsys, "bench")
    assert "zero.yaml" in err and "batch_size must be a positive integer, got 0" in err
    assert not (tmp_path / "r.jsonl").exists()


# ---- the results file ------------------------------------------------------------------------------------------
def test_out_that_is_a_folder_or_lies_under_a_file(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml")
    (tmp_path / "folder").mkdir()
    assert bench(spec, "--out", tmp_path / "folder") == 2
    assert "is a folder; pass a file name" in error_of(capsys, "bench")
    (tmp_path / "plain").write_text("")
    assert bench(spec, "--out", tmp_path / "plain" / "r.jsonl") == 2
    err = error_of(capsys, "bench")
    assert str(tmp_path / "plain") in err and "which is a file, not a folder" in err


@pytest.fixture(scope="module")
def good_rows(tmp_path_factory):
    """The two rows (fog, snow) of the base spec, written by an uninterrupted run."""
    root = tmp_path_factory.mktemp("good")
    assert main(["bench", str(write_spec(root / "s.yaml")), "--out", str(root / "r.jsonl"), "--no-progress",
                 "--device", "cpu"]) == 0
    return (root / "r.jsonl").read_bytes()


@pytest.mark.parametrize("damage, expected", [
    (lambda row: json.dumps({k: v for k, v in row.items() if k != "seed"}).encode(), r"lacks field\(s\) \['seed'\]"),
    (lambda row: json.dumps([row["method"], row["domain"]]).encode(), "holds a JSON list, not a result row"),
    (lambda row: json.dumps(row).encode().replace(b'"source"', b'"source\xe9"'), "0xe9 at column .* not UTF-8"),
])
@pytest.mark.parametrize("command", ["bench", "report"])
def test_a_bad_result_line_names_the_file_and_line(tmp_path, capsys, good_rows, damage, expected, command):
    first, second = good_rows.splitlines()
    out = tmp_path / "r.jsonl"
    out.write_bytes(first + b"\n" + damage(json.loads(second)) + b"\n")
    args = [write_spec(tmp_path / "s.yaml"), "--out", out] if command == "bench" else [out, "--no-plots"]
    assert (bench(*args) if command == "bench" else main(["report", *map(str, args)])) == 2
    err = error_of(capsys, command)
    assert f"{out}:2" in err and "remove that line" in err
    assert re.search(expected, err), err
    assert out.read_bytes().startswith(first + b"\n")  # nothing was rewritten


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
@pytest.mark.slow  # `tta bench` in a fresh interpreter
def test_a_full_disk_keeps_the_rows_written_and_says_how_to_resume(tmp_path, good_rows):
    """The run gets EFBIG from the kernel (a file size limit, as a full disk gives ENOSPC) on its second row."""
    first, second = good_rows.splitlines()
    limit = len(first) + 1 + len(second) // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    spec, out = write_spec(tmp_path / "s.yaml"), tmp_path / "r.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", GIT_OPTIONAL_LOCKS="0")  # git must not rewrite its index here
    proc = subprocess.run([sys.executable, "-m", "tta", "bench", str(spec), "--out", str(out), "--no-progress",
                           "--device", "cpu"], preexec_fn=small_files, capture_output=True, text=True, env=env,
                          timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "could not write a result row" in err and "1 complete row(s) already in the file are kept" in err
    assert "rerun the same command" in err
    assert out.read_bytes().endswith(b"\n") and len(read_rows(out)) == 1  # whole rows only: the fragment is gone
    assert main(["bench", str(spec), "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert [r["domain"] for r in read_rows(out)] == ["fog", "snow"]


# ---- devices ---------------------------------------------------------------------------------------------------
def test_a_bogus_or_missing_device_is_one_line(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml")
    assert main(["bench", str(spec), "--out", str(tmp_path / "r.jsonl"), "--device", "bogus"]) == 2
    assert "--device 'bogus' is not a device; use cpu, cuda" in error_of(capsys, "bench")
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert main(["bench", str(spec), "--out", str(tmp_path / "r.jsonl"), "--device", missing]) == 2
    assert f"--device {missing}:" in error_of(capsys, "bench")
    assert main(["run", "--model", "zoo:fmnist-cnn", "--method", "source", "--data", "foolbox:fashionMNIST",
                 "--device", missing]) == 2
    assert f"--device {missing}:" in error_of(capsys, "run")
    assert not (tmp_path / "r.jsonl").exists()


# ---- weights and judges ----------------------------------------------------------------------------------------
def test_a_corrupt_safetensors_file_is_named(tmp_path, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert main(["run", "--model", "zoo:fmnist-cnn", "--weights", str(bad), "--method", "source",
                 "--data", "foolbox:fashionMNIST", "--device", "cpu"]) == 2
    err = error_of(capsys, "run")
    assert str(bad) in err and "is the file complete?" in err


def run_judge(judge):
    return main(["run", "--model", "zoo:fmnist-cnn", "--method", "diffusion_classifier", "--set",
                 f"judge={judge}", "--data", "foolbox:fashionMNIST", "--limit", "2", "--device", "cpu"])


def test_an_empty_or_truncated_judge_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_judge(tmp_path / "empty") == 2
    err = error_of(capsys, "run")
    assert str(tmp_path / "empty") in err and "tta_backend.json" in err
    judge = tmp_path / "truncated"
    shutil.copytree(checkpoint_path("fmnist-judge"), judge)
    weights = judge / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert run_judge(judge) == 2
    assert str(weights) in error_of(capsys, "run")


def test_an_unknown_judge_kind_lists_the_kinds_without_asking_the_hub():
    from tta.generative import create_judge
    # A hub id never holds ':', so this is refused before any network access (which, offline, was an OSError).
    with pytest.raises(ValueError, match=r"unknown diffusion judge kind 'nope'.*dit, map-unet, pixel-unet, sd"):
        create_judge("nope:xyz")


# ---- the corruption cache --------------------------------------------------------------------------------------
def test_a_damaged_corruption_cache_names_the_file(tmp_path, capsys):
    cache = tmp_path / "cache"
    spec = write_spec(tmp_path / "s.yaml", data={**BASE["data"], "cache": str(cache)})
    assert bench(spec, "--out", tmp_path / "a.jsonl") == 0
    png = sorted(cache.rglob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:60])
    assert bench(spec, "--out", tmp_path / "b.jsonl") == 2
    err = error_of(capsys, "bench")
    assert str(png) in err and "delete it" in err
    (cache / "manifest.json").write_text("{not json")
    assert bench(spec, "--out", tmp_path / "c.jsonl") == 2
    err = error_of(capsys, "bench")
    assert str(cache / "manifest.json") in err and "delete the folder" in err
