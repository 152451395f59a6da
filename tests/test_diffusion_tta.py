"""Diffusion-TTA: what adapts, the loss against an independent re-implementation, and the classifier / CLIP /
segmentation / depth paths with tiny judges loaded from folders (test_isolation checks episodes and reset())."""
import copy
import json

import pytest
import torch
from torch import nn

import tta
import tta.methods.diffusion_tta  # noqa: F401  (registers the method before tta.methods imports it)
from tta.params import norm_layers

from fixtures import save_map_judge, save_pixel_judge, save_sd_judge, tiny_model

diffusers = pytest.importorskip("diffusers")
FAST = {"pairs": 6, "micro_batch": 4, "steps": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def pixel_judge(tmp_path_factory):
    return save_pixel_judge(tmp_path_factory.mktemp("pixel") / "judge", num_classes=5, size=16)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 16, 16)


def grads(module):
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def expected_params(adapt, model):
    if adapt == "all":
        return {n for n, _ in model.named_parameters()}
    if adapt == "norm":
        return {f"{ln}.{pn}" for ln, layer in norm_layers(model) for pn, _ in layer.named_parameters()}
    if adapt == "all_but_last":  # the official default: every layer but the classification layer
        return {n for n, _ in model.named_parameters()} - {"net.head.3.weight", "net.head.3.bias"}
    return {"net.head.3.weight", "net.head.3.bias"}  # the classification layer of fixtures' TinyNet


@pytest.mark.parametrize("adapt", ["all_but_last", "all", "norm", "last"])
@pytest.mark.parametrize("adapt_judge", [False, True])
def test_gradients_reach_exactly_what_adapts(pixel_judge, images, adapt, adapt_judge):
    model = tiny_model()
    adapter = tta.create_adapter("diffusion_tta", model, judge=pixel_judge, adapt=adapt,
                                 adapt_judge=adapt_judge, **FAST)
    expected = expected_params(adapt, model)
    assert {n for n in adapter.adapted_names if not n.startswith("judge.")} == expected
    adapter.compute_gradients(images)
    assert grads(model) == expected
    judge_grads = grads(adapter.judge)
    if adapt_judge:
        assert judge_grads == {f"unet.{n}" for n, _ in adapter.judge.unet.named_parameters()}
        assert {f"judge.{n}" for n in judge_grads} == {n for n in adapter.adapted_names if n.startswith("judge.")}
    else:
        assert not judge_grads and all(p.grad is None for p in adapter.judge.parameters())


def test_one_step_equals_the_papers_loss(pixel_judge, images):
    """Re-implements the loss from the paper: mean over (t, eps) of ||eps_theta(x_t, t, softmax(f(x)) @ E) - eps||^2,
    with the class embedding fed straight into the UNet (no hooks), one pair at a time, then one SGD step."""
    model = tiny_model()
    source = copy.deepcopy(model).eval()  # Diffusion-TTA keeps batch-norm on its running statistics
    lr, pairs, seed = 0.5, 6, 7
    # The reference below updates every classifier weight and keeps the judge fixed: say so, not the defaults.
    adapter = tta.create_adapter("diffusion_tta", model, judge=pixel_judge, steps=1, pairs=pairs, micro_batch=4,
                                 lr=lr, seed=seed, episodic=False, adapt="all", adapt_judge=False)
    adapter(images)

    unet = copy.deepcopy(adapter.judge.unet)
    table = unet.class_embedding.weight.detach()
    unet.class_embedding = nn.Identity()  # the UNet then adds the given embedding to its time embedding
    alphas = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    x0 = images * 2 - 1
    t = torch.randint(0, 1000, (2, pairs), generator=g)
    eps = torch.randn(2, pairs, 3, 16, 16, generator=g)
    c = source(images).softmax(1) @ table
    losses = []
    for b in range(2):
        for j in range(pairs):
            a = alphas[t[b, j]]
            x_t = a.sqrt() * x0[b] + (1 - a).sqrt() * eps[b, j]
            pred = unet(x_t[None], t[b, j][None], class_labels=c[b:b + 1]).sample
            losses.append((pred[0] - eps[b, j]).pow(2).mean())
    torch.stack(losses).mean().backward()
    with torch.no_grad():
        for (name, p), (_, q) in zip(source.named_parameters(), model.named_parameters()):
            expected = p - lr * p.grad  # SGD with momentum: the first step's buffer is the gradient
            assert torch.allclose(q, expected, atol=1e-6), name
    assert any(not torch.equal(p, q) for p, q in zip(source.parameters(), model.parameters()))


def test_judge_from_a_folder_string_config_or_object(pixel_judge, images):
    model = tiny_model()
    by_path = tta.create_adapter("diffusion_tta", model, judge=pixel_judge, **FAST)
    assert by_path.cfg.judge == pixel_judge  # recorded in result rows, as `tta run --set judge=...` sets it
    by_config = tta.create_adapter("diffusion_tta", tiny_model(), {"judge": f"pixel-unet:{pixel_judge}"}, **FAST)
    assert by_config.judge.kind == "pixel-unet"
    obj = tta.generative.create_judge(pixel_judge)
    by_object = tta.create_adapter("diffusion_tta", tiny_model(), judge=obj, **FAST)
    assert by_object.judge is obj and by_object.cfg.judge == f"pixel-unet:{pixel_judge}"
    assert by_path(images).shape == (2, 5)


def test_clear_errors(pixel_judge, tmp_path):
    with pytest.raises(ValueError, match="judge="):
        tta.create_adapter("diffusion_tta", tiny_model())
    with pytest.raises(ValueError, match="knows 3"):
        tta.create_adapter("diffusion_tta", tiny_model(),
                           judge=save_pixel_judge(tmp_path / "three", num_classes=3, size=16))
    with pytest.raises(ValueError, match="map-conditioned"):
        tta.create_adapter("diffusion_tta", tiny_model(), judge=save_map_judge(tmp_path / "map", map_channels=5))
    with pytest.raises(ValueError, match="map-unet"):
        tta.create_adapter("diffusion_tta", tiny_model(dense=True), judge=pixel_judge)
    with pytest.raises(ValueError, match="has none"):
        tta.create_adapter("diffusion_tta", tiny_model(), judge=pixel_judge, adapt="lora")
    with pytest.raises(ValueError, match="Valid choices"):
        tta.create_adapter("diffusion_tta", tiny_model(), judge=pixel_judge, adapt="bias")


def test_segmentation_with_a_map_judge(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = tta.create_model("smp:Unet/resnet18", pretrained=False, num_classes=3, input_size=(3, 32, 32),
                             encoder_depth=3, decoder_channels=(16, 8, 4))
    judge = save_map_judge(tmp_path / "seg", map_channels=3, size=16)
    adapter = tta.create_adapter("diffusion_tta", model, judge=judge, adapt="norm", episodic=False, lr=0.5, **FAST)
    before = copy.deepcopy(model.state_dict())
    out = adapter(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


class TinyDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 1, 1))

    def forward(self, x):
        return nn.functional.softplus(self.body(x))  # positive depth


def test_depth_with_a_map_judge(tmp_path):
    torch.manual_seed(0)
    model = tta.wrap_model(TinyDepth(), input_size=(3, 24, 24), task="depth")
    judge = save_map_judge(tmp_path / "depth", map_channels=1, size=16, map_kind="depth", map_range=[0.0, 5.0])
    # adapt="all": the check below is that every layer's weights move, the last one included
    adapter = tta.create_adapter("diffusion_tta", model, judge=judge, episodic=False, lr=0.5, adapt="all", **FAST)
    before = copy.deepcopy(model.state_dict())
    out = adapter(torch.rand(2, 3, 24, 24))
    assert out.shape == (2, 1, 24, 24)
    assert grads(model) == set()  # applied and cleared
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.endswith("weight"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    config = tmp_path_factory.mktemp("clip") / "tta-test-tiny-clip.json"
    config.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}))
    open_clip.add_model_config(config)

    def make():
        torch.manual_seed(0)
        return tta.create_model("clip:tta-test-tiny-clip", pretrained=False, class_names=["cat", "dog", "car"])
    return make


@pytest.fixture(scope="module")
def sd_judge(tmp_path_factory):
    return save_sd_judge(tmp_path_factory.mktemp("sd") / "judge")


def test_clip_zero_shot_with_a_text_conditioned_judge(tiny_clip, sd_judge):
    model = tiny_clip()
    adapter = tta.create_adapter("diffusion_tta", model, judge=sd_judge, episodic=False, lr=0.5, **FAST)
    assert adapter.judge.class_names == ["cat", "dog", "car"]  # the judge's prompts use the CLIP classes
    before = copy.deepcopy(model.state_dict())
    out = adapter(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_clip_lora_adapts_only_the_low_rank_updates(tiny_clip, sd_judge):
    model = tiny_clip()
    adapter = tta.create_adapter("diffusion_tta", model, judge=sd_judge, adapt="lora", lora_rank=2,
                                 preset="official-sd", **FAST)  # the CLIP setting: the judge stays fixed
    assert adapter.adapted_names and all(n.startswith("lora.") for n in adapter.adapted_names)
    for b in adapter.lora.updates[0].B:
        b.data.normal_()  # B starts at zero, where A gets no gradient
    adapter.compute_gradients(torch.rand(2, 3, 32, 32))
    assert grads(model) == set() and grads(adapter.judge) == set()
    assert grads(adapter.lora) == {n for n, _ in adapter.lora.named_parameters()}
    assert adapter.lora.names == ["net.visual.transformer.resblocks.0.attn.in_proj_weight"]


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch: vmap over CPU attention
def test_clip_lora_per_example_equals_separate_runs_of_one_image(tiny_clip, sd_judge, fixed_draws):
    """LoRA with per_example: every image adapts its own copy of the low-rank updates, as its own batch-1 run does
    (the paper's CLIP setting, several images at once)."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    options = {"adapt": "lora", "lora_rank": 2, "steps": 2, "pairs": 4, "micro_batch": 4, "lr": 0.5,
               "preset": "official-sd"}

    def adapter(**extra):
        a = tta.create_adapter("diffusion_tta", tiny_clip(), judge=sd_judge, **options, **extra)
        torch.manual_seed(1)
        for b in a.lora.updates[0].B:
            b.data.normal_()  # B starts at zero, where A gets no gradient and the first step changes nothing
        a._source_state = a._capture_state()  # these B are the state every episode starts from
        return a
    together = adapter(per_example=True)
    out = together(x)
    alone = []
    for i in range(3):
        fixed_draws.update(step=0, rows=slice(i, i + 1))
        alone.append(adapter()(x[i:i + 1]))
    with torch.no_grad():
        unadapted = together.predict(x)  # the LoRA set itself never changes under per_example
    assert torch.allclose(out, torch.cat(alone), atol=1e-5)
    assert not torch.allclose(out, unadapted, atol=1e-4)


def test_clip_last_layer_is_the_image_projection(tiny_clip, sd_judge):
    model = tiny_clip()
    adapter = tta.create_adapter("diffusion_tta", model, judge=sd_judge, adapt="last", preset="official-sd", **FAST)
    assert adapter.adapted_names == ["net.visual.proj"]


def test_paper_settings_run_on_the_tiny_judge(pixel_judge, images):
    adapter = tta.create_adapter("diffusion_tta", tiny_model(), judge=pixel_judge)
    assert (adapter.cfg.steps, adapter.cfg.pairs, adapter.cfg.micro_batch, adapter.cfg.lr) == (5, 180, 15, 5e-3)
    with torch.no_grad():
        out = adapter(images[:1])
    assert out.shape == (1, 5) and adapter.last_loss is not None


def test_config_round_trips_with_the_judge_as_a_string(pixel_judge):
    import dataclasses
    adapter = tta.create_adapter("diffusion_tta", tiny_model(), judge=pixel_judge, **FAST)
    values = dataclasses.asdict(adapter.cfg)
    assert type(adapter.cfg)(**values) == adapter.cfg
    assert tta.create_adapter("diffusion_tta", tiny_model(), **values).cfg == adapter.cfg
