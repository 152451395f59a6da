"""--threads / TTA_THREADS: torch's thread count is set before work starts, recorded in rows, and bad values
are refused with exit 2."""
import pytest
import torch

from tta.cli import main
from tta.threads import configure_threads, usable_cores


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_explicit_beats_environment(monkeypatch):
    monkeypatch.setenv("TTA_THREADS", "2")
    assert configure_threads(1) == 1


def test_environment_used_when_no_option(monkeypatch):
    monkeypatch.setenv("TTA_THREADS", "1")
    torch.set_num_threads(2)
    assert configure_threads(None) == 1


def test_default_does_not_exceed_usable_cores(monkeypatch):
    monkeypatch.delenv("TTA_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(usable_cores() + 3)
    assert configure_threads(None) <= usable_cores()


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_environment_value_is_refused(monkeypatch, value):
    monkeypatch.setenv("TTA_THREADS", value)
    with pytest.raises(ValueError, match="TTA_THREADS must be a positive number"):
        configure_threads(None)


def test_cli_refuses_bad_threads_before_work(tmp_path, capsys):
    missing = tmp_path / "never-read.yaml"  # the error must come before the benchmark file is even read
    assert main(["bench", str(missing), "--threads", "0"]) == 2
    assert "--threads must be a positive number" in capsys.readouterr().err
