"""Diffusion-TTA's speed and memory options give the loss and gradients of the plain path: micro-batches sized from
free memory, gradient checkpointing and channels_last exactly (up to float rounding), bf16 autocast on CPUs with
native bf16 approximately; and the memory measurement they rely on counts what autograd keeps."""
import pytest
import torch
from torch import nn

import tta
from tta.generative import memory
from tta.generative.loading import create_judge
from tta.generative.base import autocast_for, check_autocast, cpu_has_native_bf16

from fixtures import save_pixel_judge

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
# The fast paths are compared on every classifier weight with the judge fixed (not the official defaults, which also
# adapt the judge and leave the last layer out): the comparisons read every classifier parameter's gradient.
STEP = {"seed": 0, "pairs": 12, "micro_batch": 5, "adapt": "all", "preset": "classifier-only"}


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return create_judge(save_pixel_judge(tmp_path_factory.mktemp("judge") / "judge", num_classes=5, size=16,
                                         channels=3))


def tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 5))


def step_gradients(judge, **options):
    """(loss, {name: gradient}, adapter) of one Diffusion-TTA step on fixed images and (t, eps) draws."""
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    adapter = tta.create_adapter("diffusion_tta", tiny_classifier(), judge=judge, **{**STEP, **options})
    adapter.compute_gradients(x)
    return adapter.last_loss, {n: p.grad.clone() for n, p in adapter.model.named_parameters()}, adapter


def assert_same_step(reference, other, rtol):
    (loss_a, grads_a, _), (loss_b, grads_b, _) = reference, other
    assert loss_b == pytest.approx(loss_a, rel=rtol)
    assert any(g.abs().sum() > 0 for g in grads_a.values())
    for name, g in grads_a.items():
        assert torch.allclose(grads_b[name], g, rtol=rtol * 10, atol=1e-7 + rtol * g.abs().max()), name


def test_micro_batch_from_free_memory_gives_the_same_step(judge):
    reference = step_gradients(judge)
    sized = step_gradients(judge, micro_batch=0)
    assert 1 <= sized[2].micro_batch_used <= STEP["pairs"]
    assert_same_step(reference, sized, rtol=1e-5)


def test_micro_batch_shrinks_with_free_memory(judge, monkeypatch):
    _, _, adapter = step_gradients(judge, micro_batch=0)
    assert adapter.micro_batch_used == STEP["pairs"]  # a tiny judge: every pair fits in this machine's memory
    x = torch.rand(2, 3, 16, 16)
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: None)
    adapter = tta.create_adapter("diffusion_tta", tiny_classifier(), judge=judge, **{**STEP, "micro_batch": 0})
    adapter.compute_gradients(x)
    assert adapter.micro_batch_used == 12  # unreadable free memory: the paper's 15, capped at the pairs
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 0)
    adapter = tta.create_adapter("diffusion_tta", tiny_classifier(), judge=judge, **{**STEP, "micro_batch": 0})
    with pytest.warns(RuntimeWarning, match="B free; expect running out of memory. Use fewer images per batch"):
        adapter.compute_gradients(x)  # no room even for one pair: it still tries, with 1, and says why it may fail
    assert adapter.micro_batch_used == 1
    # Room for about 3 pairs by the module's own accounting gives a micro-batch of 3.
    cond = torch.zeros(1, judge.unet.class_embedding.weight.shape[1], requires_grad=True)

    def run(m):
        return judge.denoising_error(torch.zeros(m, 3, 16, 16), cond.expand(m, -1), torch.zeros(m, dtype=torch.long),
                                     torch.zeros(m, 3, 16, 16))
    one, two = memory.saved_tensor_bytes(lambda: run(1)), memory.saved_tensor_bytes(lambda: run(2))
    per_pair, fixed = two - one, 2 * one - two
    free = int((fixed + 3.5 * memory.BACKWARD_FACTOR * per_pair) / memory.FREE_MEMORY_SHARE)
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: free)
    assert memory.micro_batch_from_memory(run, 12, torch.device("cpu")) == 3
    # Measured on one image, the cost scales with the images a micro-batch holds (3 pairs' room, 2 images: 1 pair).
    assert memory.micro_batch_from_memory(run, 12, torch.device("cpu"), images=2) == 1
    # A budget below the free memory caps the micro-batch; the adapter takes it in GB (memory_gb).
    budget = free * memory.FREE_MEMORY_SHARE
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 100 * free)
    assert memory.micro_batch_from_memory(run, 12, torch.device("cpu"), budget_bytes=budget) == 3
    adapter = tta.create_adapter("diffusion_tta", tiny_classifier(), judge=judge,
                                 **{**STEP, "micro_batch": 0, "memory_gb": 1e-9})
    with pytest.warns(RuntimeWarning, match=r"allowed \(memory_gb\)"):
        adapter.compute_gradients(x)
    assert adapter.micro_batch_used == 1
    with pytest.raises(ValueError, match=r"memory_gb must be a number in \(0, "):
        tta.create_adapter("diffusion_tta", tiny_classifier(), judge=judge, memory_gb=0.0)


def test_saved_tensor_bytes_counts_what_autograd_keeps():
    a = torch.rand(100, requires_grad=True)
    b = torch.rand(100, requires_grad=True)
    assert memory.saved_tensor_bytes(lambda: a * b) == 2 * 100 * 4  # mul saves both factors
    assert memory.saved_tensor_bytes(lambda: a + b) == 0  # add saves nothing
    assert memory.saved_tensor_bytes(lambda: (a * b) * a) == 3 * 100 * 4  # a once, b, and the product
    assert memory.free_memory_bytes(torch.device("cpu")) > 0


def test_gradient_checkpointing_and_channels_last_give_the_same_step(judge):
    reference = step_gradients(judge)
    try:
        assert_same_step(reference, step_gradients(judge, checkpointing=True), rtol=1e-5)
        assert judge.unet.is_gradient_checkpointing
        assert_same_step(reference, step_gradients(judge, channels_last=True), rtol=1e-5)
        assert judge.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    finally:  # the judge fixture is shared: undo the in-place options
        judge.unet.disable_gradient_checkpointing()
        judge.unet.to(memory_format=torch.contiguous_format)


def test_checkpointing_an_adapted_judge_gives_it_the_same_gradients(tmp_path):
    """Checkpointing when the judge adapts too (adapt_judge): the judge's own weights get the gradients they get
    without it, as does the classifier."""
    judge = create_judge(save_pixel_judge(tmp_path / "judge", num_classes=5, size=16, channels=3))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = []
    for checkpointing in (False, True):
        adapter = tta.create_adapter("diffusion_tta", tiny_classifier(), judge=judge, adapt_judge=True,
                                     checkpointing=checkpointing, **STEP)
        adapter.compute_gradients(x)
        steps.append((adapter.last_loss, {n: p.grad.clone() for n, p in adapter.adapted_params}, adapter))
        adapter.optimizer.zero_grad()  # the judge is shared by both adapters
    assert judge.unet.is_gradient_checkpointing
    judge_grads = [n for n, g in steps[0][1].items() if "unet" in n and g.abs().sum() > 0]
    assert len(judge_grads) > 10  # the judge's weights do get gradients
    assert steps[1][1].keys() == steps[0][1].keys()
    assert_same_step(*steps, rtol=1e-5)


def test_checkpointing_needs_a_denoiser_that_supports_it(judge, monkeypatch):
    monkeypatch.setattr(type(judge.unet), "_supports_gradient_checkpointing", False)
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        tta.create_adapter("diffusion_tta", tiny_classifier(), judge=judge, checkpointing=True)


def test_autocast_modes():
    assert check_autocast(True) == "auto" and check_autocast(False) == "off" and check_autocast("bf16") == "bf16"
    with pytest.raises(ValueError, match="autocast must be one of"):
        check_autocast("fp16")
    with pytest.raises(ValueError, match=r"unknown autocast 'half'\. Valid choices: auto, bf16, off "
                                         r"\(or true or false\);.*'bf16' also on CPUs with native bf16"):
        tta.create_adapter("diffusion_tta", tiny_classifier(), judge=None, autocast="half")
    cpu = torch.device("cpu")
    for mode in ("auto", "off", True, False):  # float32 on the CPU unless bf16 is asked for
        with autocast_for(cpu, mode):
            assert not torch.is_autocast_enabled("cpu")
    with autocast_for(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") == cpu_has_native_bf16()


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16: autocast='bf16' stays float32")
def test_cpu_bf16_is_close_to_float32(judge):
    reference, fast = step_gradients(judge), step_gradients(judge, autocast="bf16", micro_batch=0)
    assert fast[0] != reference[0]  # it did run in bf16
    assert fast[0] == pytest.approx(reference[0], rel=2e-2)
    for name, g in reference[1].items():
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), fast[1][name].flatten(), dim=0)
        assert cosine > 0.95, name


def test_per_example_batch_equals_separate_runs_of_one_image(judge, fixed_draws):
    """Three images adapted at once on their own parameter copies = three episodic runs of batch 1, on the same
    (t, eps) draws (a fake sample_pairs hands every run its images' rows of fixed per-step draws)."""
    state, steps, pairs = fixed_draws, 2, 6
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    # a large lr: predictions move; per_example needs the judge fixed (preset classifier-only)
    options = {"steps": steps, "pairs": pairs, "micro_batch": 4, "lr": 0.5, "preset": "classifier-only"}
    model = tiny_classifier()
    source = {k: v.clone() for k, v in model.state_dict().items()}
    together = tta.create_adapter("diffusion_tta", model, judge=judge, per_example=True, **options)(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.items())  # the model never changed
    alone = []
    for i in range(3):
        state.update(step=0, rows=slice(i, i + 1))
        alone.append(tta.create_adapter("diffusion_tta", tiny_classifier(), judge=judge, **options)(x[i:i + 1]))
    with torch.no_grad():
        unadapted = model(x)
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)
    assert not torch.allclose(together, unadapted, atol=1e-3)
    with pytest.raises(ValueError, match="per_example"):
        tta.create_adapter("diffusion_tta", tiny_classifier(), judge=judge, per_example=True, episodic=False)
    # A wrapped model (input checks, normalisation) runs per example too, and gives what its network gives.
    wrapped = tta.wrap_model(tiny_classifier(), (0.0,) * 3, (1.0,) * 3, input_size=(3, 16, 16))
    state.update(step=0, rows=slice(0, 3))
    out = tta.create_adapter("diffusion_tta", wrapped, judge=judge, per_example=True, **options)(x)
    assert torch.allclose(out, together, atol=1e-5)


class GatedClassifier(nn.Module):
    """tiny_classifier plus sqrt(c + relu(mean(x) - 0.5)) on every logit, c starting at 0: an image darker than 0.5
    on average puts sqrt's infinite slope at 0 into c's gradient, so its updates are non-finite; a brighter image
    adapts normally."""

    def __init__(self):
        super().__init__()
        self.body, self.c = tiny_classifier(), nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.body(x) + torch.sqrt(self.c + torch.relu(x.mean((1, 2, 3)) - 0.5))[:, None]


@pytest.mark.parametrize("case", ["nonfinite_gradient", "exploded"])
def test_per_example_guards_every_image_as_its_own_run_would(judge, fixed_draws, case):
    """The divergence guard acts image by image on the per-example copies, as it acts on separate batch-1 runs:
    a non-finite update is skipped for that image only, and an image whose weights blow up gets the source
    model's prediction; the other images are untouched. Without the guard the dark image's output is NaN."""
    state = fixed_draws
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([0.5 * torch.rand(1, 3, 16, 16, generator=gen), 0.5 + 0.5 * torch.rand(2, 3, 16, 16, generator=gen)])
    # adapt="all": c is held by a module with children, which the default all_but_last leaves fixed
    options = {"steps": 2, "pairs": 6, "micro_batch": 4, "lr": 0.5 if case == "nonfinite_gradient" else 1e9,
               "adapt": "all", "preset": "classifier-only"}
    together = tta.create_adapter("diffusion_tta", GatedClassifier(), judge=judge, per_example=True, **options)
    out = together(x)
    alone, events = [], {}
    for i in range(3):
        state.update(step=0, rows=slice(i, i + 1))
        single = tta.create_adapter("diffusion_tta", GatedClassifier(), judge=judge, **options)
        alone.append(single(x[i:i + 1]))
        for k, v in single.guard_events.items():
            events[k] = events.get(k, 0) + v
    with torch.no_grad():
        source = GatedClassifier()(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, torch.cat(alone), atol=1e-5)
    assert together.guard_events == events
    assert torch.allclose(out[0], source[0])  # the dark image never adapts (or is reset)
    if case == "nonfinite_gradient":
        assert events == {"nonfinite_grad": 2}  # the dark image, both steps
        assert not torch.allclose(out[1:], source[1:], atol=1e-3)  # the bright ones adapted
    else:
        # the bright images blew up (one to NaN) and were reset: every image reads the source prediction
        assert events.get("exploded", 0) + events.get("diverged", 0) == 2 and torch.allclose(out, source)
    state.update(step=0, rows=slice(0, 3))
    unguarded = tta.create_adapter("diffusion_tta", GatedClassifier(), judge=judge, per_example=True, guard=False,
                                   **options)(x)
    assert not torch.isfinite(unguarded[0]).all()


def test_checkpointing_a_dit_judge_keeps_the_soft_labels(tmp_path):
    """DiT's label tables sit inside its checkpointed blocks: the blocks' re-run during backward must embed the
    same soft labels (the bug: hooks that had already been removed, so the re-run saw other tensors and failed)."""
    from fixtures import save_dit_judge
    dit = create_judge(save_dit_judge(tmp_path / "dit", num_classes=5))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = []
    for checkpointing in (False, True):
        adapter = tta.create_adapter("diffusion_tta", tiny_classifier(), judge=dit, checkpointing=checkpointing,
                                     **STEP)
        adapter.compute_gradients(x)
        steps.append((adapter.last_loss, {n: p.grad.clone() for n, p in adapter.model.named_parameters()}, adapter))
    assert dit.transformer.is_gradient_checkpointing
    assert_same_step(*steps, rtol=1e-5)
    dit.transformer.disable_gradient_checkpointing()
