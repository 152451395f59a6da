"""Image files as users have them: 16-bit and float pixels read at full precision (or refused by name), file names
that are not UTF-8, broken files in benchmarks, class folders the model does not have, and a user's own IT3
network in a benchmark file."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tta.cli import main
from tta.data.images import load_image, open_images, printable


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _grey_folder(root, n=4, size=28):
    """Class folders 0/ and 1/ of random 8-bit grey images (zoo:fmnist-cnn takes 1x28x28)."""
    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


# ---- full precision ---------------------------------------------------------------------------------------------
def test_a_16_bit_grey_png_keeps_its_levels(tmp_path):
    levels = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 1,024 distinct levels over 0..65472
    Image.fromarray(levels).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    for channels in (1, 3):
        x = load_image(tmp_path / "g.png", channels)
        assert x.shape == (channels, 32, 32) and x.dtype == torch.float32
        assert torch.equal(x[0], torch.from_numpy(levels.astype(np.float32) / 65535))
        assert len(x.unique()) == 1024  # convert("L") left 2
    Image.fromarray(levels).save(tmp_path / "g.tif")  # 16-bit TIFF, and a 16-bit PGM (read by Pillow as mode I)
    assert torch.equal(load_image(tmp_path / "g.tif", 1), load_image(tmp_path / "g.png", 1))
    Image.fromarray(levels).save(tmp_path / "g.pgm")
    assert torch.equal(load_image(tmp_path / "g.pgm", 1), load_image(tmp_path / "g.png", 1))


def test_a_float_tiff_in_0_1_is_read_as_is_and_one_outside_is_refused(tmp_path):
    values = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert torch.equal(load_image(tmp_path / "f.tif", 1)[0], torch.from_numpy(values))
    Image.fromarray(values * 4).save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match=r"hdr\.tif.*float pixels in \[0, 4\].*rescale it to \[0, 1\]"):
        load_image(tmp_path / "hdr.tif")
    nan = values.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif.*NaN"):
        load_image(tmp_path / "nan.tif")


def test_an_int32_tiff_is_refused_by_name_and_skippable(tmp_path):
    root = _grey_folder(tmp_path / "data")
    Image.fromarray((np.arange(28 * 28).reshape(28, 28) * 1000).astype(np.int32)).save(root / "0" / "deep.tif")
    with pytest.raises(ValueError, match=r"deep\.tif.*32-bit integer.*no standard white level"):
        load_image(root / "0" / "deep.tif")
    ds = open_images(str(root), (1, 28, 28))
    with pytest.raises(ValueError, match=r"deep\.tif.*--on-error skip"):
        [ds[i] for i in range(len(ds))]
    ds = open_images(str(root), (1, 28, 28), on_error="skip")
    assert len(ds) == 4 and [os.path.basename(p) for p in ds.skipped] == ["deep.tif"]


# ---- names that are not UTF-8 -----------------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform != "linux", reason="file names of arbitrary bytes are a Linux (POSIX) matter")
@pytest.mark.slow  # `tta run` in a fresh interpreter
def test_skipped_files_with_non_utf8_names_are_listed_escaped_on_a_strict_stdout(tmp_path):
    root = _grey_folder(tmp_path / "data")
    with open(os.fsencode(root / "1") + b"/broken-\xff\xfe.png", "wb") as f:
        f.write(b"not an image")
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "tta", "run", "--model", "zoo:fmnist-cnn", "--method", "source",
                             "--data", str(root), "--device", "cpu", "--on-error", "skip"],
                            capture_output=True, text=True, errors="replace", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(4 images" in result.stdout
    assert "skipped 1 unreadable file(s): " in result.stdout and "broken-\\xff\\xfe.png" in result.stdout
    assert printable(b"a\xffb\nc") == "a\\xffb\\nc" and printable("caf\u00e9") == "caf\u00e9"


# ---- class folders the model does not have ----------------------------------------------------------------------
def test_a_class_folder_beyond_the_models_classes_is_refused_by_name(tmp_path, capsys):
    root = _grey_folder(tmp_path / "data")
    (root / "999").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "999" / "x.png")
    names = [f"c{i}" for i in range(10)]
    with pytest.raises(ValueError, match=r"class folder '.*999' stands for class index 999.*10 classes \(0 to 9\)"):
        open_images(str(root), (1, 28, 28), names)
    assert len(open_images(str(root), (1, 28, 28), names + [f"c{i}" for i in range(10, 1000)])) == 5
    assert main(["run", "--model", "zoo:fmnist-cnn", "--method", "tent", "--data", str(root), "--device", "cpu"]) == 2
    assert "999" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"foolbox:imagenet has labels up to \d+, but the model has 10 classes"):
        open_images("foolbox:imagenet", (3, 28, 28), names)


# ---- tta bench --on-error ---------------------------------------------------------------------------------------
def _bench(spec_values, tmp_path, *extra):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_values, sort_keys=False))
    out = tmp_path / "r.jsonl"
    return main(["bench", str(spec), "--out", str(out), "--no-progress", "--device", "cpu", *extra]), out


def _rows(out):
    import json
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_bench_skips_unreadable_files_when_asked_and_its_rows_say_so(tmp_path, capsys):
    root = _grey_folder(tmp_path / "data")
    (root / "1" / "broken.png").write_bytes(b"not an image")
    values = {"name": "skip", "model": {"name": "zoo:fmnist-cnn"},
              "data": {"kind": "folder", "root": str(root), "corruptions": ["fog"], "clean": True},
              "settings": ["continual"], "batch_size": 2, "methods": ["source"]}
    code, out = _bench(values, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err and "--on-error skip" in err  # the advice names an option bench has
    code, out = _bench(values, tmp_path, "--on-error", "skip")
    assert code == 0
    assert "skipped 1 unreadable file(s): " in capsys.readouterr().err
    rows = _rows(out)
    assert [r["domain"] for r in rows] == ["data", "fog"] and all(r["n"] == 4 for r in rows)
    for r in rows:
        assert r["domain_info"]["skipped_files"] == 1 and r["domain_info"]["skipped"][0].endswith("broken.png")
        # rows of 4 of the 5 files are not the rows of the whole folder: once the file is fixed, they are recomputed
        assert "-1unreadable:" in r["data_id"]
    (root / "1" / "broken.png").unlink()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "1" / "broken.png")
    code, out = _bench(values, tmp_path, "--on-error", "skip")
    assert code == 0 and [r["n"] for r in _rows(out)] == [4, 4, 5, 5]
    assert "-1unreadable:" not in _rows(out)[-1]["data_id"] and not _rows(out)[-1]["domain_info"]


def test_bench_on_error_skip_is_refused_for_kinds_without_image_files(tmp_path, capsys):
    values = {"name": "x", "model": {"name": "zoo:fmnist-cnn"}, "data": {"kind": "fashion-mnist", "per_class": 1},
              "methods": ["source"]}
    code, _ = _bench(values, tmp_path, "--on-error", "skip")
    assert code == 2 and "--on-error skip applies to the data kinds" in capsys.readouterr().err


# ---- a user's own IT3 network in a benchmark --------------------------------------------------------------------
OWN_IT3 = f"{__name__}:it3_classifier"


def it3_classifier(bare: bool = False):
    """A user's classifier made an IT3 network f(x, y): wrapped with its normalisation first, then IT3Net with y
    added after the batch norm (module `net.1` of the wrapped model)."""
    import tta
    from tta.nets import IT3Net
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    if bare:
        return IT3Net(net, num_outputs=10, layer="1")
    model = tta.wrap_model(net, mean=[0.286], std=[0.353], class_names=[f"c{i}" for i in range(10)],
                           input_size=(1, 28, 28), name="own-it3")
    return IT3Net(model, num_outputs=10, layer="net.1")


def test_a_factory_returning_an_it3net_runs_it3_in_bench(tmp_path, capsys):
    from tta.nets import IT3Net
    weights = tmp_path / "own-it3.pt"
    torch.save(it3_classifier().state_dict(), weights)
    values = {"name": "own-it3", "model": {"factory": OWN_IT3, "weights": str(weights)},
              "data": {"kind": "fashion-mnist", "per_class": 1}, "settings": ["episodic"], "batch_size": 5,
              "methods": ["source", {"name": "it3", "config": {"steps": 1}}]}
    code, out = _bench(values, tmp_path, "--allow-code")
    assert code == 0, capsys.readouterr().err
    assert [r["method"] for r in _rows(out)] == ["source", "it3"] and all(r["n"] == 10 for r in _rows(out))
    from tta.bench.spec import load_spec
    spec = tmp_path / "spec.yaml"
    assert isinstance(load_spec(spec).model.build(allow_code=True), IT3Net)  # not wrapped again
    # as a method's own model too, beside a plain benchmark model
    values["model"] = {"name": "zoo:fmnist-cnn"}
    values["methods"] = ["source", {"name": "it3", "model": {"factory": OWN_IT3}, "config": {"steps": 1}}]
    code, out = _bench(values, tmp_path, "--allow-code")
    assert code == 0, capsys.readouterr().err


def test_a_ready_made_model_refuses_settings_for_bare_networks(tmp_path, capsys):
    values = {"name": "own-it3", "model": {"factory": OWN_IT3, "mean": [0.5]},
              "data": {"kind": "fashion-mnist", "per_class": 1}, "methods": ["source"]}
    code, _ = _bench(values, tmp_path, "--allow-code")
    err = capsys.readouterr().err
    assert code == 2 and "model.mean applies to a bare network" in err and "ready-made IT3Net" in err
    assert "remove model.mean" in err
    values["model"] = {"factory": OWN_IT3, "kwargs": {"bare": True}}
    code, _ = _bench(values, tmp_path, "--allow-code")
    assert code == 2 and "IT3Net(tta.wrap_model(net" in capsys.readouterr().err
