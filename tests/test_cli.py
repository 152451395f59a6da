"""The command line, run in-process and as the installed console script."""
import shutil
import subprocess
import sys

import pytest
import torch

from tta.cli import main
from tta.data.images import foolbox_images
import tta


def test_list_adapters(capsys):
    assert main(["list", "adapters"]) == 0
    out = capsys.readouterr().out.split()
    assert set(tta.list_adapters()) <= set(out)  # every registered method


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


@pytest.mark.slow  # a fresh interpreter
def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "tta", "list", "adapters"], capture_output=True, text=True)
    assert result.returncode == 0 and "tent" in result.stdout


def test_python_m_tta_runs_the_command_line(monkeypatch, capsys):
    """`python -m tta` in this interpreter: the fast lane's check of tta/__main__.py (the test above is slow)."""
    import runpy
    monkeypatch.setattr(sys, "argv", ["tta", "list", "adapters"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("tta", run_name="__main__")
    assert done.value.code == 0 and "tent" in capsys.readouterr().out.split()


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


def test_per_example_methods_get_one_image_per_call_and_the_bar_counts_images(monkeypatch):
    from torch import nn
    from tqdm import tqdm
    from tta.cli import _batches, _evaluate
    from tta.methods.diffusion_tta import DiffusionTTA
    from tta.methods.slow_inference import SlowInference

    class Recorder(nn.Module):
        def __init__(self, one_example_per_call):
            super().__init__()
            self.one_example_per_call = one_example_per_call
            self.calls = []

        def forward(self, x):
            self.calls.append(len(x))
            return torch.zeros(len(x), 3)

    updates = []
    original = tqdm.update
    monkeypatch.setattr(tqdm, "update", lambda bar, n=1: (updates.append(n), original(bar, n))[1])
    data = torch.utils.data.TensorDataset(torch.rand(10, 3, 8, 8), torch.zeros(10, dtype=torch.long))
    loader = _batches(data, 64, None)
    per_example, batched = Recorder(True), Recorder(False)
    assert _evaluate(per_example, loader, None, 0, 0, "cpu", "memo")["accuracy"] == 1.0
    assert per_example.calls == [1] * 10 and updates == [1] * 10  # the bar moves per image
    updates.clear()
    _evaluate(batched, loader, None, 0, 0, "cpu", "tent")
    assert batched.calls == [10] and updates == [10]  # and counts images for batch methods too
    # which methods are per-example
    for name in ("memo", "it3", "diffusion_classifier"):
        assert tta.adapter.ADAPTERS.get(name).one_example_per_call is True
    assert tta.adapter.ADAPTERS.get("tent").one_example_per_call is False
    from types import SimpleNamespace
    for cls in (DiffusionTTA, SlowInference):  # per example unless the method splits the batch itself
        assert cls.one_example_per_call.fget(SimpleNamespace(cfg=SimpleNamespace(per_example=False))) is (
            cls is DiffusionTTA)
        assert cls.one_example_per_call.fget(SimpleNamespace(cfg=SimpleNamespace(per_example=True))) is (
            cls is SlowInference)


def test_pass_times_leave_out_start_up(monkeypatch, capsys):
    import re
    import time as clock
    from torch import nn
    real_create_model = tta.create_model

    class SlowFirstCall(nn.Module):
        """A network whose first call pays a one-off start-up of 0.5 s (as lazy kernel selection, CUDA start)."""

        def __init__(self, net):
            super().__init__()
            self.inner, self.started = net, False

        def forward(self, x):
            if not self.started:
                clock.sleep(0.5)
                self.started = True
            return self.inner(x)

    def slow_start_model(spec, **kwargs):
        clock.sleep(0.3)  # loading
        base = real_create_model(spec, **kwargs)
        return tta.wrap_model(SlowFirstCall(base.net), tuple(base.mean.flatten().tolist()),
                              tuple(base.std.flatten().tolist()), base.class_names, base.input_size)

    monkeypatch.setattr(tta, "create_model", slow_start_model)
    assert main(["run", "--model", "zoo:fmnist-cnn", "--data", "foolbox:fashionMNIST", "--method", "source,tent",
                 "--limit", "8"]) == 0
    out = capsys.readouterr().out
    source_s = float(re.search(r"before \(source\).* ([\d.]+) s\n", out).group(1))
    assert source_s < 0.3, out  # neither the load nor the first call's start-up
    load_s, first_s = map(float, re.search(r"model load ([\d.]+) s, first call ([\d.]+) s", out).groups())
    assert load_s >= 0.3 and first_s >= 0.5
    assert "reading and corrupting images" in out
