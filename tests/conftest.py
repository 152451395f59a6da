"""pytest fixtures shared by the tests; the tiny nets and judges they build on live in fixtures.py."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine extra threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(8, 3, 16, 16)


@pytest.fixture
def fixed_draws(monkeypatch):
    """Diffusion-TTA's (t, eps) draws fixed per step for up to 3 images: set state["rows"] to the images a run
    adapts and state["step"] to 0 before it, and every run gets its images' rows of the same draws, so a batch
    adapted per example can be compared with separate runs of one image."""
    import tta.methods.diffusion_tta as dtta
    draws = {}
    state = {"step": 0, "rows": slice(0, 3)}

    def fake_pairs(x0, n, *args):
        step = state["step"]
        state["step"] += 1
        if step not in draws:
            gen = torch.Generator().manual_seed(4 + step)
            draws[step] = (torch.randint(0, 1000, (3, n), generator=gen),
                           torch.randn(3, n, *x0.shape[1:], generator=gen))
        t, eps = draws[step]
        return t[state["rows"]].to(x0.device), eps[state["rows"]].to(x0.device, x0.dtype)
    monkeypatch.setattr(dtta, "sample_pairs", fake_pairs)
    return state


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A checkpoint file of timm's tiny test_resnet (10 classes, 32x32) for benchmark runs."""
    import timm
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=10).state_dict(), path)
    return path
