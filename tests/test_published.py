"""Published-numbers tables (benchmarks/published/*.yaml, tta.bench.published) and `tta report --published`: the
shipped tables load and agree with their own means; a report of fake rows shows the right differences in the
table's unit; bad tables are refused with a message that names the problem."""
import json
from pathlib import Path

import pytest
import yaml

from tta.bench.published import load_published, parse_published
from tta.bench.report import write_report
from tta.cli import main
from tta.data.corruptions import STANDARD

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "benchmarks" / "published").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_tables_load_and_every_number_has_its_citation_and_setup(path):
    table = load_published(path)
    assert table.severity == 5 and table.unit == "error" and table.corruptions == list(STANDARD)
    assert (ROOT / "benchmarks" / f"{table.benchmark}.yaml").is_file()  # names a benchmark the repo has
    assert {e.method for e in table.entries} >= {"source", "norm", "tent", "eata", "sar", "cotta"}
    for e in table.entries:
        assert e.citation and e.backbone and e.images and (e.values or e.printed_mean is not None)
    # the benchmark file names its table, so a user finds it
    assert f"benchmarks/published/{path.name}" in (ROOT / "benchmarks" / f"{table.benchmark}.yaml").read_text()


def test_both_shipped_tables_are_there():
    assert [p.stem for p in SHIPPED] == ["cifar10-c", "imagenet-c"]


def test_shipped_numbers_are_the_sources_numbers():
    """A few cells against the sources as printed (TENT README, CoTTA Table 2, the TTA zoo), so an edit that shifts
    a row or a column fails here."""
    cifar = {(e.method, e.setting, e.source): e for e in load_published(ROOT / "benchmarks/published/cifar10-c.yaml")
             .entries}
    assert cifar["source", "any", "tent-readme"].values["gaussian_noise"] == 72.3
    assert cifar["tent", "reset_per_shift", "tent-readme"].values["jpeg_compression"] == 24.2
    assert cifar["tent", "continual", "cotta-paper"].values["contrast"] == 20.3
    assert cifar["tent", "continual", "cotta-paper"].printed_mean == 20.7
    assert "brightness" not in cifar["cotta", "continual", "cotta-paper"].values  # not readable here: left out
    assert cifar["eata", "continual", "zoo"].printed_mean == 17.9
    imagenet = {(e.method, e.setting, e.source): e
                for e in load_published(ROOT / "benchmarks/published/imagenet-c.yaml").entries}
    assert imagenet["sar", "continual", "zoo"].printed_mean == 61.9
    assert imagenet["eata", "continual", "eata-readme"].values["shot_noise"] == 61.9
    assert imagenet["source", "any", "eata-readme"].mean(list(STANDARD)) == pytest.approx(82.0, abs=0.05)


# ---- the report ------------------------------------------------------------------------------------------------
TABLE = {
    "benchmark": "fake-c", "dataset": "Fake-C", "severity": 5, "unit": "error",
    "corruptions": ["gaussian_noise", "fog"],
    "sources": {"paper": {"citation": "A. Author. A paper. Table 1", "backbone": "net", "images": "all 100"}},
    "entries": [
        {"method": "tent", "setting": "continual", "source": "paper",
         "values": {"gaussian_noise": 30.0, "fog": 10.0}, "mean": 20.0},
        {"method": "source", "setting": "any", "source": "paper", "mean": 50.0},
        {"method": "sar", "setting": "continual", "source": "paper", "mean": 25.0},
    ],
}


def _row(method, adapter, domain, accuracy, setting="continual", seed=0, benchmark="fake-c", config=None):
    return {"benchmark": benchmark, "method": method, "adapter": adapter, "config_id": f"id-{method}",
            "model": "net", "data_id": "fake:1", "domain": domain, "severity": 5, "setting": setting,
            "batch_size": 8, "seed": seed, "metrics": {"accuracy": accuracy, "error": 1 - accuracy}, "n": 100,
            "seconds_model": 1.0, "git": "abc", "task": "classification", "primary_metric": "accuracy",
            "config": config or {}}


@pytest.fixture
def files(tmp_path):
    rows = [_row("tent", "tent", "gaussian_noise", 0.75), _row("tent", "tent", "fog", 0.86),
            _row("tent", "tent", "gaussian_noise", 0.73, seed=1), _row("tent", "tent", "fog", 0.88, seed=1),
            _row("source", "source", "gaussian_noise", 0.4), _row("source", "source", "fog", 0.6),
            _row("memo-1", "memo", "gaussian_noise", 0.5, setting="episodic"),
            _row("memo-1", "memo", "fog", 0.5, setting="episodic")]
    results = tmp_path / "fake-c.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = tmp_path / "table.yaml"
    table.write_text(yaml.safe_dump(TABLE))
    return results, table


def _section(md: str) -> str:
    return md.split("## Published numbers: table.yaml", 1)[1]


def test_report_shows_yours_published_and_the_difference_in_error_points(files, tmp_path):
    results, table = files
    md = write_report([results], out=str(tmp_path / "r"), plots=False, published=str(table))["markdown"][0].read_text()
    section = _section(md)
    lines = section.splitlines()
    # tent: accuracy 0.75 / 0.73 on gaussian noise -> error 26 %, on fog 0.86 / 0.88 -> 13 %; mean 19.5
    yours = next(x for x in lines if x.startswith("| yours: tent (tent, continual)"))
    assert yours.split("|")[2:5] == [" 26.0 ", " 13.0 ", " 19.5 "]
    published = next(x for x in lines if x.startswith("| published: tent, continual [paper]"))
    assert published.split("|")[2:5] == [" 30.0 ", " 10.0 ", " 20.0 "]
    diff = lines[lines.index(published) + 1]
    assert diff.split("|")[1:5] == [" yours - [paper] ", " -4.0 ", " +3.0 ", " -0.5 "]
    # a mean-only published row: no cells per corruption, the difference on the mean; `any` matches continual
    source = next(x for x in lines if x.startswith("| published: source, any [paper]"))
    assert source.split("|")[2:5] == ["  ", "  ", " 50.0 "]
    assert lines[lines.index(source) + 1].split("|")[2:5] == ["  ", "  ", " +0.0 "]  # errors 60 and 40: mean 50
    assert "**Published rows with no run of yours** (same method and setting): sar, continual [paper]." in section
    assert "**Your runs with no published row**: memo-1 (memo, episodic)." in section
    assert "- [paper] A. Author. A paper. Table 1. backbone net; images all 100." in section


def test_accuracy_tables_are_compared_in_accuracy(files, tmp_path):
    results, table = files
    table.write_text(yaml.safe_dump({**TABLE, "unit": "accuracy", "entries": [
        {"method": "tent", "setting": "continual", "source": "paper", "values": {"gaussian_noise": 70.0}}]}))
    md = write_report([results], out=str(tmp_path / "r"), plots=False, published=str(table))["markdown"][0].read_text()
    lines = _section(md).splitlines()
    published = next(x for x in lines if x.startswith("| published: tent"))
    assert published.split("|")[2:5] == [" 70.0 ", "  ", "  "]  # no mean: the source gives one value of two
    assert lines[lines.index(published) + 1].split("|")[2] == " +4.0 "  # accuracy 74 % against 70 %
    assert "in accuracy %" in lines[2]


def test_cli_report_takes_published(files, tmp_path, capsys):
    results, table = files
    assert main(["report", str(results), "--out", str(tmp_path / "cli"), "--no-plots", "--published", str(table)]) == 0
    assert "## Published numbers: table.yaml" in (tmp_path / "cli.md").read_text()
    assert main(["report", str(results), "--out", str(tmp_path / "cli"), "--no-plots",
                 "--published", str(tmp_path / "nope.yaml")]) == 2
    assert "published table" in capsys.readouterr().err


def test_a_table_of_another_benchmark_is_refused_before_anything_is_written(files, tmp_path):
    results, table = files
    table.write_text(yaml.safe_dump({**TABLE, "benchmark": "cifar10-c"}))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no rows of benchmark 'cifar10-c' at severity 5.*benchmarks here: fake-c"):
        write_report([results], out=str(out / "r"), plots=False, published=str(table))
    assert not out.exists()


# ---- bad tables --------------------------------------------------------------------------------------------------
def _with(**changes):
    table = json.loads(json.dumps(TABLE))
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = table
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return table


@pytest.mark.parametrize("changes, message", [
    ({"entries__0__values": {"gausian_noise": 30.0}}, r"entries\[0\] \(tent, continual, paper\): values: unknown "
                                                       r"corruption 'gausian_noise'. Did you mean 'gaussian_noise'"),
    ({"corruptions": ["gaussian_noise", "fogg"]}, r"unknown corruption 'fogg'"),
    ({"sources__paper__citation": None}, r"sources.paper: needs `citation`"),
    ({"sources__paper__citation": "  "}, r"sources.paper: needs `citation`"),
    ({"entries__1__source": "blog"}, r"source 'blog' is not among `sources` \(paper\); add it there with its citation"),
    ({"entries__0__source": None}, r"entries\[0\]: needs `source`"),
    ({"entries__0__mean": 25.0}, r"mean 25.0 disagrees with the mean of its values \(20.00\)"),
    ({"entries__0__values__fog": 110}, r"values.fog: 110 is not a percentage"),
    ({"entries__0__method": "tnet"}, r"unknown method 'tnet'. Did you mean 'tent'"),
    ({"entries__0__setting": "online"}, r"unknown setting 'online'"),
    ({"entries__2__mean": None}, r"needs `values` \(per corruption\) and/or `mean`"),
    ({"unit": "percent"}, r"unit must be one of error, accuracy"),
    ({"sources__paper__images": None}, r"entries\[0\] \(tent, continual, paper\): needs `images`"),
    ({"entries__0__table": 2}, r"entries\[0\]: unknown key\(s\) 'table'"),
    ({"year": 2021}, r"unknown key\(s\) 'year'"),
])
def test_bad_tables_are_refused_with_what_to_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        parse_published(_with(**changes), "t.yaml")


def test_an_entry_given_twice_is_refused():
    table = _with()
    table["entries"].append(dict(table["entries"][2]))
    with pytest.raises(ValueError, match=r"entries\[3\] \(sar, continual, paper\): appears twice"):
        parse_published(table, "t.yaml")


def test_the_unchanged_fake_table_is_accepted():
    assert len(parse_published(_with(), "t.yaml").entries) == 3


def test_an_eata_run_without_fisher_data_is_marked_as_eta(files, tmp_path):
    """Published EATA numbers use the Fisher regulariser; a run without fisher_data (null, or a row made before the
    field) is ETA, and the report says so next to it, matched or not."""
    results, table = files
    rows = [_row(label, "eata", domain, 0.8, config=config) for label, config in
            (("eta-null", {"fisher_data": None}), ("eta-old", {"lr": 0.001}), ("eata", {"fisher_data": "clean"}))
            for domain in ("gaussian_noise", "fog")]
    rows += [_row("eta-reset", "eata", "fog", 0.8, setting="reset_per_shift")]
    with open(results, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    table.write_text(yaml.safe_dump({**TABLE, "entries": TABLE["entries"] + [
        {"method": "eata", "setting": "continual", "source": "paper", "mean": 18.0}]}))
    md = write_report([results], out=str(tmp_path / "r"), plots=False, published=str(table))["markdown"][0].read_text()
    section = _section(md)
    for label in ("eta-null", "eta-old"):
        assert f"**{label} (eata, continual; runs as ETA: no fisher_data)**" in section
        assert f"| yours: {label} (eata, continual; runs as ETA: no fisher_data) |" in section
    assert "**eata (eata, continual)**" in section and "eata (eata, continual; runs as ETA" not in section
    assert section.count("This run has no Fisher regulariser") == 2  # under each matched ETA table
    assert "eta-reset (eata, reset_per_shift; runs as ETA: no fisher_data)." in section  # no published row: listed
