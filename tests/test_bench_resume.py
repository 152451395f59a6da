"""Resuming and sharing a results file: a resumed row equals the uninterrupted one, two runs never write a row
twice, a row's key names the exact model and config it was computed with."""
import json

import pytest
import timm
import torch

from tta.bench.results import read_rows, row_key
from tta.bench.runner import run_benchmark
from tta.bench.spec import parse_spec


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


def source_spec(weights):
    return parse_spec(spec_values(weights, methods=["source"], settings=["continual"]))


def test_a_second_run_on_the_same_results_file_is_refused_and_writes_nothing(tiny_weights, tmp_path, capsys):
    from tta.bench.results import ResultsBusyError, run_lock
    from tta.cli import main
    out = tmp_path / "r.jsonl"
    with run_lock(out):  # a run in progress
        with pytest.raises(ResultsBusyError, match="another run .*wait for it to finish.*another --out"):
            run_benchmark(source_spec(tiny_weights), out, progress=False)
        spec_file = tmp_path / "tiny.yaml"
        spec_file.write_text(json.dumps(spec_values(tiny_weights, methods=["source"], settings=["continual"])))
        assert main(["bench", str(spec_file), "--out", str(out), "--no-progress", "--threads", "1"]) == 2
        assert "being written by another run" in capsys.readouterr().err
    assert not out.exists() or read_rows(out) == []
    assert run_benchmark(source_spec(tiny_weights), out, progress=False)["written"] == 3
    assert not (tmp_path / "r.jsonl.lock").exists()  # released and removed at the end of the run


@pytest.mark.slow  # two `tta bench` processes
def test_two_runs_started_at_once_never_write_a_row_twice(tiny_weights, tmp_path):
    import os
    import subprocess
    import sys
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(json.dumps(spec_values(tiny_weights, methods=["source"], settings=["continual"])))
    out = tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "tta", "bench", str(spec_file), "--out", str(out), "--no-progress",
               "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    done = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    for code, err in done:
        assert code == 0 or (code == 2 and "being written by another run" in err), err
    rows = read_rows(out)
    assert len(rows) == len({row_key(r) for r in rows}) == 3


def test_a_lock_left_by_a_killed_run_never_blocks(tiny_weights, tmp_path):
    import signal
    import subprocess
    import sys
    out = tmp_path / "r.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tta.bench.results import run_lock\n"
                               f"with run_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from tta.bench.results import ResultsBusyError
        with pytest.raises(ResultsBusyError, match=f"process {holder.pid}"):
            run_benchmark(source_spec(tiny_weights), out, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "r.jsonl.lock").exists()  # SIGKILL left the file behind, without its lock
    assert run_benchmark(source_spec(tiny_weights), out, progress=False)["written"] == 3


def test_report_shows_each_row_once_keeping_the_last(tiny_weights, tmp_path):
    from tta.bench.report import load_results
    out = tmp_path / "r.jsonl"
    run_benchmark(source_spec(tiny_weights), out, progress=False)
    rows = read_rows(out)
    again = dict(rows[0], metrics=dict(rows[0]["metrics"], accuracy=-1.0))
    with open(out, "a") as f:  # two runs of an older tta, or files joined by hand
        f.write(json.dumps(again) + "\n")
    with pytest.warns(UserWarning, match="1 row.* repeat the key of a later row .*source continual"):
        loaded = load_results([out])
    assert len(loaded) == 3 and len({row_key(r) for r in loaded}) == 3
    assert [r["metrics"]["accuracy"] for r in loaded if row_key(r) == row_key(again)] == [-1.0]


def test_resume_never_takes_another_checkpoint_or_other_kwargs_for_the_same_model(tiny_weights, tmp_path,
                                                                                   monkeypatch):
    import shutil
    from tta.bench.results import file_sha256
    a, b = tmp_path / "a" / "net.pth", tmp_path / "b" / "net.pth"
    a.parent.mkdir(), b.parent.mkdir()
    shutil.copy(tiny_weights, a)
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=10).state_dict(), b)

    def spec(**model):
        values = spec_values("$KW", methods=["source"], settings=["continual"])
        values["model"].update(model)
        return parse_spec(values)

    out = tmp_path / "r.jsonl"
    monkeypatch.setenv("KW", str(a))
    assert run_benchmark(spec(), out, progress=False)["written"] == 3
    row = read_rows(out)[0]
    assert row["model_info"]["weights"] == str(a.resolve())  # the checkpoint used, exactly
    assert row["model_info"]["weights_sha256"] == file_sha256(a)
    assert row["model_info"]["kwargs"] == {"num_classes": 10}
    # the same file name, other content: computed again, the first rows kept
    monkeypatch.setenv("KW", str(b))
    assert run_benchmark(spec(), out, progress=False)["written"] == 3
    # other factory kwargs: computed again
    assert run_benchmark(spec(kwargs={"num_classes": 10, "drop_rate": 0.5}), out, progress=False)["written"] == 3
    assert len({r["model"] for r in read_rows(out)}) == 3
    # the same checkpoint in another folder (another machine) keeps its rows
    elsewhere = tmp_path / "c" / "net.pth"
    elsewhere.parent.mkdir()
    shutil.copy(a, elsewhere)
    monkeypatch.setenv("KW", str(elsewhere))
    assert run_benchmark(spec(), out, progress=False)["written"] == 0


def test_zoo_models_keep_the_keys_of_the_committed_rows():
    from tta.bench.runner import model_id, model_info
    from tta.bench.spec import load_spec
    spec = load_spec("quick")
    assert model_id(spec) == "zoo:fmnist-cnn"
    assert {model_id(spec, m.model) for m in spec.methods if m.model} == {"zoo:fmnist-it3"}
    assert model_info(spec.model)["weights"].endswith("fmnist-cnn.pt")  # the shipped checkpoint is recorded


def test_bench_writes_to_runs_by_default_and_compares_with_the_committed_run(tiny_weights, tmp_path, monkeypatch,
                                                                            capsys):
    from tta.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(json.dumps(spec_values(tiny_weights, methods=["source"],
                                                               settings=["continual"])))
    bench = ["bench", "tiny.yaml", "--no-progress", "--threads", "1"]
    assert main(bench + ["--out", "results/tiny.jsonl"]) == 0  # the "committed" run
    committed = (tmp_path / "results" / "tiny.jsonl").read_bytes()
    capsys.readouterr()
    assert main(bench) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "results" / "tiny.jsonl").read_bytes() == committed  # never rewritten
    assert len(read_rows(tmp_path / "runs" / "tiny.jsonl")) == 3 and "-> runs/tiny.jsonl" in printed
    assert "compared with results/tiny.jsonl: 3 of 3 row(s) in both have the same outcomes" in printed

    rows = read_rows(tmp_path / "runs" / "tiny.jsonl")
    rows[1]["per_image"]["pred"][0] += 1
    rows[1]["metrics"]["accuracy"] = 0.0
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(bench + ["--reference", "other.jsonl"]) == 0
    printed = capsys.readouterr().out
    assert f"2 of 3 row(s) in both have the same outcomes; 1 differ (source continual {rows[1]['domain']}: " \
           "accuracy" in printed and "reference 0;" not in printed and "reference 0)" in printed
