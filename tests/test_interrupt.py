"""Ctrl-C during `tta bench` or `tta run`: one line saying what was kept and how to resume, exit code 130, no
traceback; `tta bench` then resumes to the rows of an uninterrupted run."""
import _thread
import dataclasses
import json
import signal
import threading

import pytest
import yaml

from tta.bench.datasets import DATA_KINDS, BuildContext, FashionMNISTConfig, register_data_kind
from tta.bench.results import read_rows
from tta.cli import main

SPEC = {"name": "ctrl-c", "model": {"name": "zoo:fmnist-cnn"},
        "data": {"kind": "test-ctrl-c", "corruptions": ["fog", "snow", "contrast"], "per_class": 1},
        "settings": ["reset_per_shift"], "batch_size": 5, "methods": ["source"]}
TIMING = ("seconds", "seconds_model", "curve", "finished", "git", "device", "threads", "versions")


class CtrlC:
    """Reads of every domain's images; the read number `at` raises KeyboardInterrupt, as Ctrl-C there would."""
    reads, at = 0, None

    def __init__(self, base):
        self.base, self.targets = base, base.targets

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        CtrlC.reads += 1
        if CtrlC.at is not None and CtrlC.reads == CtrlC.at:
            raise KeyboardInterrupt
        return self.base[i]


@register_data_kind("test-ctrl-c", FashionMNISTConfig)
def _ctrl_c(cfg: FashionMNISTConfig, ctx: BuildContext):
    domains = DATA_KINDS.get("fashion-mnist").build(dataclasses.replace(cfg, kind="fashion-mnist"), ctx)
    return [dataclasses.replace(d, dataset=CtrlC(d.dataset)) for d in domains]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def bench(spec, out):
    return no_escape(["bench", str(spec), "--out", str(out), "--no-progress", "--device", "cpu"])


def no_escape(argv):
    """main(argv), failing the test (rather than stopping pytest) if Ctrl-C escapes as a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail(f"Ctrl-C escaped `tta {argv[0]}` as a KeyboardInterrupt traceback")


def comparable(rows):
    return [json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True) for r in rows]


def test_ctrl_c_during_bench_keeps_the_rows_and_resumes(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    CtrlC.reads, CtrlC.at = 0, None
    assert bench(spec, tmp_path / "reference.jsonl") == 0
    capsys.readouterr()
    # 10 images per domain: the 25th read is in the middle of the third domain, after two rows were written
    CtrlC.reads, CtrlC.at = 0, 25
    out = tmp_path / "r.jsonl"
    assert bench(spec, out) == 130
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("tta bench: interrupted; 2 row(s) written by this run")
    assert str(out) in err and "rerun the same command to resume" in err
    assert [r["domain"] for r in read_rows(out)] == ["fog", "snow"]
    CtrlC.reads, CtrlC.at = 0, None
    assert bench(spec, out) == 0
    assert "1 row(s) written, 2 already present" in capsys.readouterr().out
    assert comparable(read_rows(out)) == comparable(read_rows(tmp_path / "reference.jsonl"))


def test_ctrl_c_during_run_is_one_line_and_exit_130(capsys):
    """A real interrupt of the main thread (what the terminal's SIGINT does), half a second into a run of ~15 s."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever pytest set
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    try:
        code = no_escape(["run", "--model", "zoo:fmnist-cnn", "--method", "memo", "--set", "n_augmentations=256",
                     "--data", "foolbox:fashionMNIST", "--batch-size", "1", "--device", "cpu"])
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err.rsplit("\r", 1)[-1].strip()
    assert code == 130
    assert err == "tta run: interrupted; tta run keeps no results (it only prints them); rerun the same command"
