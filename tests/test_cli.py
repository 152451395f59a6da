"""The command line, run in-process and as the installed console script."""
import shutil
import subprocess
import sys

import torch

from tta.cli import main
from tta.data.images import foolbox_images
import tta


def test_list_adapters(capsys):
    assert main(["list", "adapters"]) == 0
    out = capsys.readouterr().out.split()
    assert {"source", "norm", "tent", "eata", "sar", "cotta", "memo"} <= set(out)


def test_list_models(capsys):
    assert main(["list", "models"]) == 0
    assert "timm:" in capsys.readouterr().out
    assert main(["list", "models", "timm:test_res*"]) == 0
    assert "timm:test_resnet" in capsys.readouterr().out
    assert main(["list", "models", "zoo:*"]) == 0
    zoo = capsys.readouterr().out.split()
    assert "zoo:fmnist-cnn" in zoo and "zoo:fmnist-judge" not in zoo  # models only: judges are not models
    assert main(["list", "models", "smp:*"]) == 2
    assert "cannot list its models" in capsys.readouterr().err


def test_run_on_a_folder_of_images(tmp_path, capsys):
    # CIFAR-10 images from foolbox, sorted into class folders named by class index
    for path, label in foolbox_images("cifar10"):
        (tmp_path / "data" / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "data" / str(label) / path.name)
    model = tta.create_model("timm:test_resnet", pretrained=False, num_classes=10)
    torch.save(model.net.state_dict(), tmp_path / "w.pth")
    code = main(["run", "--model", "timm:test_resnet", "--weights", str(tmp_path / "w.pth"),
                 "--model-set", "num_classes=10", "--method", "tent,memo", "--set", "lr=1e-3",
                 "--set", "memo.n_augmentations=2",
                 "--data", str(tmp_path / "data"), "--corruption", "contrast", "--severity", "3",
                 "--batch-size", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "20 images, contrast-3" in out
    assert out.count("top-1") == 3 and "after (tent)" in out and "after (memo)" in out


def test_run_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["run", "--model", "timm:test_resnet", "--no-pretrained", "--method", "tnet",
                 "--data", str(tmp_path)]) == 2
    assert "Did you mean 'tent'" in capsys.readouterr().err
    assert main(["run", "--model", "timm:test_resnet", "--no-pretrained", "--method", "tent",
                 "--set", "memo.n_augmentations=2", "--data", str(tmp_path)]) == 2
    assert "not one of the methods being run" in capsys.readouterr().err
    assert main(["run", "--model", "timm:test_resnet", "--no-pretrained", "--method", "tent",
                 "--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_bytes(b"truncated")
    assert main(["run", "--model", "timm:test_resnet", "--no-pretrained", "--method", "source",
                 "--data", str(tmp_path)]) == 2
    assert "--on-error skip" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "tta", "list", "adapters"], capture_output=True, text=True)
    assert result.returncode == 0 and "tent" in result.stdout


def test_zoo_train_never_overwrites_shipped_checkpoints_by_default(monkeypatch, tmp_path, capsys):
    import tta.zoo
    from tta.zoo import checkpoint_path
    calls = []
    monkeypatch.setattr(tta.zoo, "train", lambda name, out, *a: calls.append((name, out)))
    monkeypatch.chdir(tmp_path)
    assert main(["zoo", "train", "fmnist-cnn", "--steps", "1"]) == 0
    (name, out), = calls
    assert name == "fmnist-cnn" and str(out).startswith("runs") and out.resolve() != checkpoint_path(name).resolve()
    assert main(["zoo", "train", "no-such-member"]) == 2
    assert "fmnist-cnn" in capsys.readouterr().err  # the error lists the members


def test_run_checks_method_configs_before_any_model_loads(capsys):
    # the model name is wrong too: the config typo must be what is reported, because it is checked first
    assert main(["run", "--model", "zoo:no-such-model", "--data", "foolbox:fashionMNIST", "--method", "tent",
                 "--set", "lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key(s) ['lrr']" in err and "no-such-model" not in err


def test_run_shows_the_source_once(capsys):
    assert main(["run", "--model", "zoo:fmnist-cnn", "--data", "foolbox:fashionMNIST", "--method", "source,tent",
                 "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "before (source)" in out and "after (source)" not in out and "after (tent)" in out
