"""A benchmark file or a path given on the command line is untrusted input: `model.factory` may call only functions
of the packages that build networks unless the user passes --allow-code, and no error message echoes what an
arbitrary folder holds."""
import pytest
import yaml

from tta.bench.factories import ALLOWED_FACTORY_PACKAGES, resolve_factory
from tta.cli import main

BASE = {"name": "factory", "data": {"kind": "fashion-mnist", "corruptions": ["fog"], "per_class": 1},
        "settings": ["continual"], "batch_size": 10, "methods": ["source"]}
# A factory of this test module (outside the allowed packages) that builds the zoo's Fashion-MNIST CNN.
OWN_FACTORY = f"{__name__}:fashion_cnn"


def fashion_cnn():
    from tta.zoo.fmnist import FashionCNN
    return FashionCNN()


def write_spec(tmp_path, factory, **model):
    path = tmp_path / "s.yaml"
    values = dict(BASE, model={"factory": factory, "input_size": [1, 28, 28], "mean": [0.286], "std": [0.353],
                               **model})
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def bench(spec, out, *extra):
    return main(["bench", str(spec), "--out", str(out), "--no-progress", "--device", "cpu", *extra])


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_a_factory_outside_the_allowed_packages_is_refused_before_it_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    spec = write_spec(tmp_path, "os:system", kwargs={"command": f"touch {marker}"})
    assert bench(spec, tmp_path / "r.jsonl") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tta bench: error: ") and "\n" not in err
    assert "'os:system'" in err and "--allow-code" in err and "runs code" in err
    assert not marker.exists() and not (tmp_path / "r.jsonl").exists()


def test_a_method_model_factory_is_checked_too(tmp_path, capsys):
    spec = write_spec(tmp_path, "tta.zoo.fmnist:FashionCNN")
    values = yaml.safe_load(spec.read_text())
    values["methods"] = ["source", {"name": "norm", "model": {"factory": "subprocess:run",
                                                             "kwargs": {"args": ["true"]}}}]
    spec.write_text(yaml.safe_dump(values))
    assert bench(spec, tmp_path / "r.jsonl") == 2
    err = capsys.readouterr().err
    assert "method norm: model.factory 'subprocess:run'" in err and "--allow-code" in err


def test_allowed_packages_run_and_allow_code_opens_the_rest(tmp_path, capsys):
    assert bench(write_spec(tmp_path, "tta.zoo.fmnist:FashionCNN"), tmp_path / "a.jsonl") == 0
    spec = write_spec(tmp_path, OWN_FACTORY)
    assert bench(spec, tmp_path / "b.jsonl") == 2
    assert OWN_FACTORY in capsys.readouterr().err
    assert bench(spec, tmp_path / "b.jsonl", "--allow-code") == 0


def test_a_callable_reached_through_an_allowed_module_counts_where_it_is_defined():
    # tta.bench.results imports subprocess, tta.bench.spec imports dataclasses.field: neither may be reached
    with pytest.raises(ValueError, match="not a function or class"):
        resolve_factory("tta.bench.results:subprocess")
    with pytest.raises(ValueError, match=r"defined in 'dataclasses'.*--allow-code"):
        resolve_factory("tta.bench.spec:field")
    assert resolve_factory("tta.bench.spec:field", allow_code=True).__module__ == "dataclasses"
    with pytest.raises(ValueError, match=r"module 'ttax', outside the allowed packages"):
        resolve_factory("ttax:f")  # a prefix of the name is not the package
    assert resolve_factory("tta.zoo.fmnist:FashionCNN").__name__ == "FashionCNN"
    assert "tta" in ALLOWED_FACTORY_PACKAGES


def test_a_wrong_judge_folder_is_named_but_never_listed(tmp_path, capsys):
    folder = tmp_path / "private"
    folder.mkdir()
    (folder / "passwords.txt").write_text("secret")
    (folder / "id_rsa").write_text("secret")
    code = main(["run", "--model", "zoo:fmnist-cnn", "--method", "diffusion_classifier", "--set",
                 f"judge={folder}", "--data", "foolbox:fashionMNIST", "--limit", "2", "--device", "cpu"])
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]
    assert code == 2 and str(folder) in err and "tta_backend.json" in err
    assert "passwords" not in err and "id_rsa" not in err


def test_a_wrong_imagenet_c_root_is_named_but_never_listed(tmp_path):
    from tta.data.imagenet_c import find_corruption_folder
    (tmp_path / "secrets").mkdir()
    (tmp_path / "fog" / "3").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no folder fog/5 under .*corruption folders there: fog\)") as info:
        find_corruption_folder(tmp_path, "fog", 5)
    assert "secrets" not in str(info.value)
