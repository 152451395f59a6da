"""Hub models on a machine without a network: one line naming the missing network and what to use instead, at
once and with exit 2; files already here (torch's hub cache, the Hugging Face cache, local folders and checkpoints)
load without a probe. Every test decides what the network does (socket.create_connection is replaced), so they
give the same result on a machine with a network and on one without."""
import socket
import time
import urllib.error

import pytest
import torch

import tta
from tta.cli import main
from tta.models import hub


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every connection fails as a machine without DNS fails; empty torch and Hugging Face caches."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return attempts


@pytest.fixture
def probes(monkeypatch):
    """Record every reachability probe (and fail it)."""
    calls = []

    def failure(host, port=443, timeout=hub.PROBE_TIMEOUT_S):
        calls.append(host)
        return f"cannot connect to {host}: Name or service not known"

    monkeypatch.setattr(hub, "connection_failure", failure)
    return calls


@pytest.mark.parametrize("model", ["tv:resnet18", "timm:resnet18"])
def test_an_unreachable_hub_fails_at_once_naming_the_network(no_network, capsys, model):
    start = time.perf_counter()
    code = main(["run", "--model", model, "--method", "source", "--data", "foolbox:imagenet", "--limit", "2"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tta run: error: cannot download") and err.count("\n") == 1
    assert "no network" in err and "--weights PATH" in err and "zoo:" in err
    assert elapsed < 20 and len(no_network) <= 2  # one probe, not a minute of retries (imports take the rest)


def test_downloads_switched_off_are_named_without_a_probe(no_network, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", "--model", "timm:resnet18", "--method", "source", "--data", "foolbox:imagenet"]) == 2
    err = capsys.readouterr().err
    assert "downloads are switched off (HF_HUB_OFFLINE is set)" in err and "--weights PATH" in err
    assert no_network == []


def test_a_hub_judge_fails_at_once(no_network, capsys):
    code = main(["run", "--model", "diffusion:dit@facebook/DiT-XL-2-256", "--method", "source",
                 "--data", "foolbox:imagenet"])
    err = capsys.readouterr().err
    assert code == 2 and "the diffusion judge facebook/DiT-XL-2-256" in err and "no network" in err
    assert "config.json" not in err


def test_cached_and_local_files_are_not_probed(no_network, probes, tmp_path):
    import torchvision
    # torchvision's file in torch's hub cache: loaded as it is, no probe
    enum = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    net = torchvision.models.squeezenet1_1()
    torch.save(net.state_dict(), checkpoints / enum.url.rsplit("/", 1)[-1])
    model = tta.create_model("tv:squeezenet1_1")
    assert torch.equal(model.net.features[0].weight, net.features[0].weight)
    # a local checkpoint instead of hub weights
    timm_net = tta.create_model("timm:test_resnet", pretrained=False).net
    torch.save(timm_net.state_dict(), tmp_path / "w.pth")
    tta.create_model("timm:test_resnet", weights=tmp_path / "w.pth")
    # a repository in the Hugging Face cache (huggingface_hub falls back to it after one failed request)
    snapshot = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k" / "snapshots" / "0"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    hub.require_hf_repo("timm/test_resnet.r160_in1k", "test weights")
    # a judge in a local folder
    from fixtures import save_pixel_judge
    tta.generative.create_judge(save_pixel_judge(tmp_path / "judge"))
    assert probes == []
    with pytest.raises(hub.HubUnreachable, match="no network"):  # and an uncached repository is probed
        hub.require_hf_repo("timm/resnet18.a1_in1k", "test weights")
    assert probes == ["huggingface.co"]


def test_connection_errors_of_the_libraries_become_one_named_error():
    with pytest.raises(hub.HubUnreachable, match="cannot download the weights: the network failed.*--weights"):
        with hub.download_errors("the weights"):
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    with pytest.raises(hub.HubUnreachable):  # a library's own error raised from a connection error
        with hub.download_errors("the weights"):
            try:
                raise ConnectionRefusedError(111, "refused")
            except OSError as err:
                raise OSError("does not appear to have a file named config.json") from err
    with pytest.raises(urllib.error.HTTPError):  # the network worked: a 404 stays what it is
        with hub.download_errors("the weights"):
            raise urllib.error.HTTPError("https://x/y.pth", 404, "Not Found", None, None)


def test_the_probe_goes_through_the_proxy_unless_the_host_is_exempt(monkeypatch):
    for name in ("https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hub.probe_target("huggingface.co") == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert hub.probe_target("huggingface.co") == ("huggingface.co", 443)
    monkeypatch.delenv("HTTPS_PROXY")
    assert hub.probe_target("download.pytorch.org") == ("download.pytorch.org", 443)


def test_a_probe_that_gets_no_answer_gives_up_after_its_timeout(monkeypatch):
    def silent(address, timeout=None, *args, **kwargs):
        assert timeout == hub.PROBE_TIMEOUT_S
        raise socket.timeout("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert hub.connection_failure("huggingface.co") == "cannot connect to huggingface.co: no answer within 3 s"


def test_the_probe_asks_the_hub_huggingface_hub_uses(monkeypatch, probes, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "https://hf-mirror.example")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(hub.HubUnreachable, match="hf-mirror.example"):
        hub.require_hf_repo("timm/resnet18.a1_in1k", "test weights")
    assert probes == ["hf-mirror.example"]
