"""Reports from real rows: the tables hold the numbers of the rows, CSV and plots are written, compare works;
plus the spec files and the CLI wiring."""
import csv

import pytest
import torch
import timm

from tta.bench.cli import register
from tta.cli import main
from tta.bench.report import write_report
from tta.bench.results import read_rows
from tta.bench.runner import run_benchmark
from tta.bench.spec import load_spec, parse_spec

YAML = """
name: tiny
model:
  name: timm:test_resnet
  weights: {weights}
  input_size: [3, 32, 32]
  kwargs: {{num_classes: 10}}
data: {{kind: foolbox, set: cifar10, corruptions: [gaussian_noise], severities: [3, 5], clean: true, max_images: 8}}
settings: [continual]
batch_size: 4
methods:
  - source
  - {{name: tent, config: {{lr: 0.01}}}}
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    weights = root / "tiny.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=10).state_dict(), weights)
    spec_file = root / "tiny.yaml"
    spec_file.write_text(YAML.format(weights=weights))
    out = root / "tiny.jsonl"
    assert main(["bench", str(spec_file), "--out", str(out), "--no-progress"]) == 0
    return root, spec_file, out


def test_report_tables_hold_the_rows(results):
    root, _, out = results
    made = write_report([out])
    rows = read_rows(out)
    md = made["markdown"][0].read_text()
    tent = {f"{r['domain']}-{r['severity']}" if r["severity"] else r["domain"]: r["metrics"]["accuracy"]
            for r in rows if r["method"] == "tent"}
    mean = 100 * sum(tent.values()) / len(tent)
    line = next(x for x in md.splitlines() if x.startswith("| tent |"))
    assert f"{mean:.1f}" in line and "mCE (unnorm.)" in md
    with open(made["csv"][0]) as f:
        table = list(csv.DictReader(f))
    acc = {r["method"]: r for r in table if r["metric"] == "accuracy"}
    assert float(acc["tent"]["gaussian_noise-5"]) == pytest.approx(100 * tent["gaussian_noise-5"], abs=0.05)
    src_mean = float(acc["source"]["mean"])
    assert float(acc["tent"]["vs_source"]) == pytest.approx(float(acc["tent"]["mean"]) - src_mean, abs=0.11)
    assert len(made["plots"]) == 3 and all(p.stat().st_size > 1000 for p in made["plots"])


def test_compare_two_files(results, tmp_path):
    root, spec_file, out = results
    spec = load_spec(spec_file)
    other = tmp_path / "other.jsonl"
    run_benchmark(spec, other, methods=["source"], progress=False)
    assert main(["compare", str(out), str(other), "--out", str(tmp_path / "cmp"), "--no-plots"]) == 0
    md = (tmp_path / "cmp.md").read_text()
    # the same run in two files is told apart, not merged, with short labels and a legend naming the files
    assert "| source #1 |" in md and "| source #2 |" in md
    assert "| source #2 | " in md.split("**Labels**")[1] and "| other | same config, other file |" in md


def test_cli_register_adds_subcommands_and_errors_exit_2(tmp_path, capsys):
    import argparse
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "x.yaml", "--limit", "3"])
    assert args.limit == 3 and callable(args.func)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: tv:resnet18}\ndata: {kind: foolbox, sett: cifar10}\nmethods: [source]\n")
    assert main(["bench", str(bad)]) == 2
    assert "unknown key(s) ['sett']" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("benchmarks/*.yaml")))
def test_shipped_benchmark_files_parse(path):
    spec = load_spec(path)
    for m in spec.methods:
        m.resolved_config()  # every method and config key exists


def test_spec_errors_name_the_valid_keys():
    base = {"name": "x", "model": {"name": "tv:resnet18"}, "data": {"kind": "foolbox"}, "methods": ["source"]}
    with pytest.raises(ValueError, match="valid keys"):
        parse_spec(dict(base, batchsize=3))
    with pytest.raises(KeyError, match="data kind"):
        parse_spec(dict(base, data={"kind": "imagenet"}))
    with pytest.raises(ValueError, match="twice"):
        parse_spec(dict(base, methods=["source", "source"]))
    with pytest.raises(ValueError, match="stream setting"):
        parse_spec(dict(base, settings=["online"]))
    spec = parse_spec(dict(base, methods=[{"name": "tent", "config": {"lrr": 1}}]))
    with pytest.raises(ValueError, match="unknown config key"):
        spec.methods[0].resolved_config()
    with pytest.raises(ValueError, match="IMAGENET_C_NOT_SET"):
        from tta.bench.datasets import expand_path
        expand_path("$IMAGENET_C_NOT_SET/x", "data.root")
