"""The tiny nets, judges and batches the tests share (CPU, offline, seconds), and what each registered method is.

Test files import what they need from here (`from fixtures import tiny_model`); pytest fixtures stay in conftest.
"""
import copy
import functools
import json
import os
import tempfile
from typing import Optional

import torch
from torch import nn

import tta
from tta.generative import DiffusionJudge


# ---- what each registered method is ------------------------------------------------------------------------------
# Tests pick methods by kind rather than by hard-coded name lists; test_contract checks that every registered method
# is listed here, so a new method is never silently left out.
KINDS = {
    "source": {"baseline", "statistics"},
    "norm": {"baseline", "statistics", "batch_statistics"},
    "tent": {"baseline", "entropy", "batch_statistics", "optimizing"},
    "eata": {"baseline", "entropy", "batch_statistics", "optimizing"},
    "sar": {"baseline", "entropy", "batch_statistics", "optimizing"},
    "cotta": {"baseline", "entropy", "batch_statistics", "optimizing"},
    "memo": {"baseline", "entropy", "optimizing"},
    "it3": {"optimizing", "own_loop"},
    "slow_inference": {"own_loop"},
    "ttt_mae": {"own_loop"},
    "diffusion_tta": {"optimizing", "own_loop"},
    "diffusion_classifier": set(),
}
# baseline: the seven standard methods; statistics: adapts only normalisation statistics, so it takes regression
# outputs; batch_statistics: its batch-norm layers run in train mode; entropy: minimises prediction entropy, so it
# needs class scores; optimizing: refuses a learning rate no step survives; own_loop: runs its own step loop and
# predicts after it.


def methods(*kinds):
    """The registered methods that are all of `kinds`, in registry order."""
    return [name for name in tta.list_adapters() if set(kinds) <= KINDS.get(name, set())]


# ---- tiny classifiers --------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A small BN + GN + LN classifier or segmenter; `sharpness` scales the logits so that entropy filters
    (EATA, SAR) keep samples."""

    def __init__(self, num_classes=5, dense=False, sharpness=1.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.dense = dense
        self.head = nn.Conv2d(8, num_classes, 1) if dense else nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, num_classes))
        self.sharpness = sharpness

    def forward(self, x):
        return self.sharpness * self.head(self.features(x))


def tiny_model(num_classes=5, dense=False, sharpness=1.0, seed=0, task=None):
    torch.manual_seed(seed)
    net = TinyNet(num_classes, dense, sharpness)
    task = task or ("segmentation" if dense else "classification")
    return tta.wrap_model(net, class_names=[f"c{i}" for i in range(num_classes)], input_size=(3, 16, 16), task=task)


def make_adapter(name, **config):
    """(model, adapter): `name` on a fresh sharp TinyNet, with the tests' cheap settings."""
    model = tiny_model(sharpness=20.0)
    return model, tta.create_adapter(name, model, **{**FAST.get(name, {}), **config})


# ---- tiny judges, saved as diffusers folders so that create_judge's real loading path runs ------------------
def tiny_scheduler(cls_name="DDPMScheduler"):
    import diffusers
    return getattr(diffusers, cls_name)(num_train_timesteps=1000)


def save_pixel_judge(folder, num_classes=5, size=16, channels=3, seed=0, flat=False, class_names=None):
    """A class-conditional UNet2DModel judge, in the DDPMPipeline layout (or flat)."""
    import diffusers
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=num_classes)
    if flat:
        unet.save_pretrained(folder)
        tiny_scheduler().save_pretrained(folder)
    else:
        diffusers.DDPMPipeline(unet=unet, scheduler=tiny_scheduler()).save_pretrained(folder)
    if class_names is not None:
        with open(os.path.join(folder, "tta_backend.json"), "w") as f:
            json.dump({"class_names": list(class_names)}, f)
    return str(folder)


def save_map_judge(folder, map_channels=5, size=16, channels=3, seed=0, map_kind=None, map_range=None):
    import diffusers
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=channels + map_channels, out_channels=channels,
                                 layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    diffusers.DDPMPipeline(unet=unet, scheduler=tiny_scheduler()).save_pretrained(folder)
    meta = {k: v for k, v in (("map_kind", map_kind), ("map_range", map_range)) if v is not None}
    if meta:
        with open(os.path.join(folder, "tta_backend.json"), "w") as f:
            json.dump(meta, f)
    return str(folder)


def tiny_vae():
    import diffusers
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2,
                                   latent_channels=4, norm_num_groups=4, sample_size=16)


def save_dit_judge(folder, num_classes=5, seed=0):
    """A DiTPipeline folder: 2-layer DiT on 4x4x4 latents of a 2x-downsampling VAE (8x8 images)."""
    import diffusers
    torch.manual_seed(seed)
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4,
                                                  out_channels=8, num_layers=2, sample_size=4, patch_size=2,
                                                  num_embeds_ada_norm=num_classes)
    diffusers.DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=tiny_scheduler("DDIMScheduler")
                          ).save_pretrained(folder)
    index_file = os.path.join(folder, "model_index.json")
    with open(index_file) as f:
        index = json.load(f)
    index["id2label"] = {str(i): f"thing{i}, synonym" for i in range(num_classes)}  # as the hub's DiT repos
    with open(index_file, "w") as f:
        json.dump(index, f)
    return str(folder)


def _byte_vocab():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in cs:
        vocab.setdefault(chr(c), len(vocab))
    for c in cs:
        vocab.setdefault(chr(c) + "</w>", len(vocab))
    return vocab


def save_sd_judge(folder, seed=0, prediction_type="epsilon"):
    """A StableDiffusionPipeline folder with a character-level CLIP tokenizer and a 1-layer text encoder."""
    import diffusers
    import pytest
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    vocab = _byte_vocab()
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(8, 16),
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    scheduler = diffusers.PNDMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, steps_offset=1,
                                        skip_prk_steps=True)
    diffusers.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(folder)
    return str(folder)


# ---- one small model (and batch) per registered method -----------------------------------------------------
# Keep augmentation-heavy methods cheap in the tests.
FAST = {"memo": {"n_augmentations": 4}, "cotta": {"n_augmentations": 2}}


def _it3_model():
    from tta.nets import IT3Net
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return IT3Net(net, num_outputs=5, layer="3"), {}, torch.rand(8, 3, 16, 16)


def _slot_model():
    from tta.nets import SlotAttentionAutoEncoder
    torch.manual_seed(0)
    model = SlotAttentionAutoEncoder(image_size=(16, 16), in_channels=1, num_slots=3, dim=16, hidden=8)
    return model, {"steps": 3}, torch.rand(2, 1, 16, 16)


def _mae_model():
    import timm
    from tta.nets import MaskedAutoencoderViT
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                            embed_dim=32, num_heads=2, in_chans=1, num_classes=3)
    return MaskedAutoencoderViT(vit, decoder_dim=16), {"steps": 2, "views": 2}, torch.rand(2, 1, 16, 16)


@functools.lru_cache(maxsize=None)
def tiny_judge_folder():
    """One pixel judge saved once per session, for the methods that need one."""
    return save_pixel_judge(tempfile.mkdtemp(prefix="tta-judge-"), num_classes=5, size=16)


def _diffusion_model(name):
    torch.manual_seed(1)
    config = ({"judge": tiny_judge_folder(), "steps": 1, "pairs": 4, "micro_batch": 4} if name == "diffusion_tta"
              else {"judge": tiny_judge_folder(), "samples": (4,), "micro_batch": 20})
    return tiny_model(sharpness=20.0), config, torch.rand(8, 3, 16, 16)


SPECIAL_MODELS = {"it3": _it3_model, "slow_inference": _slot_model, "ttt_mae": _mae_model,
                  "diffusion_tta": functools.partial(_diffusion_model, "diffusion_tta"),
                  "diffusion_classifier": functools.partial(_diffusion_model, "diffusion_classifier")}


def model_and_config(name, **overrides):
    """(model, config, batch) that `name` accepts: the shared TinyNet for most methods, their own for the rest."""
    if name in SPECIAL_MODELS:
        model, config, batch = SPECIAL_MODELS[name]()
    else:
        torch.manual_seed(1)
        model, config, batch = tiny_model(sharpness=20.0), dict(FAST.get(name, {})), torch.rand(8, 3, 16, 16)
    return model, {**config, **overrides}, batch


# ---- a judge with a closed-form noise prediction -------------------------------------------------------------
class GaussianJudge(DiffusionJudge):
    """Data x0 ~ N(mu_c, s^2 I) per class: the optimal noise prediction is known in closed form,
    E[eps | x_t, c] = sqrt(1 - a) (x_t - sqrt(a) mu_c) / (a s^2 + 1 - a)."""
    conditioning = "class"

    def __init__(self, means, s):
        import diffusers
        super().__init__(diffusers.DDPMScheduler(num_train_timesteps=1000), means.shape[-2:], means.shape[1],
                         [f"c{i}" for i in range(means.shape[0])])
        self.register_buffer("means", means)
        self.s2 = s ** 2
        self.encodes = 0
        self.predictions = 0

    @property
    def denoiser(self):
        return self

    def encode(self, images):
        self.encodes += 1
        return images * 2 - 1

    def condition(self, weights):
        return torch.einsum("bk,kchw->bchw", weights, self.means)

    def class_condition(self, labels):
        return self.means[labels]

    def predict_noise(self, x_t, t, cond):
        self.predictions += 1
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x_t - a.sqrt() * cond) / (a * self.s2 + 1 - a)


def gaussian_problem(k=10, s=0.15, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(k, 3, 4, 4, generator=g) - 0.5           # x0 space ([-1, 1])
    labels = torch.randint(0, k, (n,), generator=g)
    x0 = (means[labels] + s * torch.randn(n, 3, 4, 4, generator=g)).clamp(-1, 1)
    bayes = torch.cdist(x0.flatten(1), means.flatten(1)).argmin(1)  # equal priors and variances: nearest mean
    return GaussianJudge(means, s), (x0 + 1) / 2, bayes


# ---- a naive Diffusion-TTA loop: the paper's structure, written out plainly --------------------------------------
# The reference the project's step is checked against (test_perf_equivalence) and timed against
# (benchmarks/perf/run.py). What it does: every classifier weight adapts and the judge stays fixed (Diffusion-TTA's
# defaults, the official DiT setting, also adapt the judge and leave the classifier's last layer out).
NAIVE_SETTING = {"adapt": "all", "preset": "classifier-only"}


def naive_diffusion_tta_step(model, judge, x, optimizer, pairs: int = 180, micro_batch: int = 15,
                             generator: Optional[torch.Generator] = None, loss: str = "l2",
                             step: bool = True) -> float:
    """One Diffusion-TTA optimizer step as the authors' code structures it: fp32, `pairs` (t, eps) pairs in
    micro-batches of `micro_batch`, and for every micro-batch the image re-encoded, the classifier re-run, the
    condition rebuilt and the loss back-propagated through judge and classifier; the gradients accumulate and one
    optimizer step follows. (t, eps) are drawn as the project draws them (tta.generative.sampling.sample_pairs:
    all t of the step, then all eps), so both paths see the same pairs. Returns the step's mean loss."""
    from tta.generative.sampling import sample_pairs
    device = judge.alphas_cumprod.device
    x = x.to(device)
    if optimizer is not None:
        optimizer.zero_grad()
    shape_probe = judge.encode(x)  # only for the draws' shape, as the project draws from its x0
    b = shape_probe.shape[0]
    t_all, eps_all = sample_pairs(shape_probe, pairs, judge.num_train_timesteps, "uniform", "independent",
                                  generator)
    total = 0.0
    for start in range(0, pairs, micro_batch):
        m = min(micro_batch, pairs - start)
        x0 = judge.encode(x)                                    # re-encoded every micro-batch
        logits = model(x)                                         # classifier re-run every micro-batch
        cond = judge.condition(logits.softmax(1))
        t = t_all[:, start:start + m].reshape(-1)
        eps = eps_all[:, start:start + m].reshape(b * m, *x0.shape[1:]).float()
        a = judge.alphas_cumprod[t].float().view(-1, *([1] * (x0.dim() - 1)))
        x_t = a.sqrt() * x0.float().repeat_interleave(m, 0) + (1 - a).sqrt() * eps
        pred = judge.predict_noise(x_t, t, cond.repeat_interleave(m, 0)).float()
        diff = pred - eps
        err = (diff.pow(2) if loss == "l2" else diff.abs()).reshape(b * m, -1).mean(1)
        (err.sum() / (b * pairs)).backward()
        total += float(err.detach().sum())
    if step and optimizer is not None:
        optimizer.step()
    return total / (b * pairs)


def naive_diffusion_tta(model, judge, x, steps=5, pairs=180, micro_batch=15, lr=5e-3, momentum=0.9,
                        generator=None, losses: Optional[list] = None) -> torch.Tensor:
    """Episodic Diffusion-TTA on x, naively: a fresh copy of the source weights and a fresh SGD per call."""
    model = copy.deepcopy(model)
    model.eval().requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    with torch.enable_grad():
        for _ in range(steps):
            loss = naive_diffusion_tta_step(model, judge, x, optimizer, pairs, micro_batch, generator)
            if losses is not None:
                losses.append(loss)
    with torch.no_grad():
        return model(x)
