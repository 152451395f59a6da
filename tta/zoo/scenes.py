"""Scene members of the zoo: composed Fashion-MNIST scenes (tta.data.scenes, 24x24, 2 items of 4 classes).

  scenes-seg     a small UNet-like segmenter with batch norm (5 classes: background + 4 items), `zoo:scenes-seg`
  scenes-judge   a map-conditioned pixel diffusion judge (map-unet layout, conditioned on per-pixel class
                 probabilities by channel concatenation; trained on one-hot masks), for diffusion_tta
  scenes-slots   the slot-attention autoencoder (tta.nets) trained on scene reconstruction, for slow_inference;
                 `zoo:scenes-slots` loads it with task "object_discovery" (scored by ARI / FG-ARI)

Recipes are seeded and sized for one thread of a 2-core CPU (each under 6 minutes); `tta zoo train NAME`
reproduces a checkpoint and prints its training metrics. Training scenes come from the Fashion-MNIST train
split, test scenes from the shipped test subset, so the corruptions and the test items stay unseen.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.scenes import CANVAS, CLASS_NAMES, test_scenes, train_scenes
from ..models.weights import load_weights
from ..models.wrapper import ImageModel
from ..segmentation_metrics import adjusted_rand_index, confusion_matrix, foreground_ari, mean_iou, pixel_accuracy
from .ddpm import log_progress
from .registry import ZooMember, register_member

MEAN, STD = (0.127,), (0.255,)   # pixel mean / std of the training scenes
INPUT_SIZE = (1, CANVAS, CANVAS)
TRAIN_SCENES = 20000


# ---- scenes-seg ------------------------------------------------------------------------------------------------
def _conv_bn(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SceneUNet(nn.Module):
    """Two poolings down (24 -> 12 -> 6), two bilinear upsamplings with skip connections, a 1x1 class head."""

    def __init__(self, num_classes: int = len(CLASS_NAMES), width: int = 16):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(*_conv_bn(1, w), *_conv_bn(w, w))
        self.enc2 = nn.Sequential(*_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w))
        self.mid = nn.Sequential(*_conv_bn(2 * w, 4 * w), *_conv_bn(4 * w, 4 * w))
        self.dec2 = nn.Sequential(*_conv_bn(6 * w, 2 * w))
        self.dec1 = nn.Sequential(*_conv_bn(3 * w, w))
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2, mode="bilinear", align_corners=False), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False), e1], 1))
        return self.head(d1)


def load_segmenter(path: Optional[Path], **kwargs) -> ImageModel:
    net = SceneUNet()
    if path is not None:
        load_weights(net, path)
    return ImageModel(net, MEAN, STD, CLASS_NAMES, INPUT_SIZE, task="segmentation", name="zoo:scenes-seg")


def _seg_scores(model, images, masks):
    """mIoU and pixel accuracy over all the scenes (one confusion matrix), as the harness's SegmentationMeter."""
    conf = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), dtype=torch.int64)
    with torch.no_grad():
        for i in range(0, len(images), 256):
            pred = model(images[i:i + 256]).argmax(1)
            conf += confusion_matrix(pred.cpu(), masks[i:i + 256].cpu(), len(CLASS_NAMES))
    return {"miou": mean_iou(conf), "pixel_accuracy": pixel_accuracy(conf)}


def train_segmenter(out: Path, steps: Optional[int] = None, device: str = "cpu", seed: int = 0,
                    batch_size: int = 32) -> dict:
    """Cross-entropy, Adam with a one-cycle schedule (peak 3e-3), batch 32, 2500 steps by default, no
    augmentation (the corruptions must stay unseen). Reports mIoU / pixel accuracy on 200 clean test scenes."""
    torch.manual_seed(seed)
    data = train_scenes(TRAIN_SCENES, seed)
    test = test_scenes(200, seed)
    model = load_segmenter(None).to(device)
    steps = steps or 2500
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    running = None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(data.images[idx].to(device)), data.masks[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            log_progress(step, steps, start, loss=running)
    model.eval()
    scores = _seg_scores(model.cpu(), test.images, test.masks)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.net.state_dict(), out)
    metrics = {"test_miou": scores["miou"], "test_pixel_accuracy": scores["pixel_accuracy"], "steps": steps,
               "final_loss_ema": running, "seconds": time.perf_counter() - start}
    print(json.dumps(metrics))
    return metrics


# ---- scenes-judge ----------------------------------------------------------------------------------------------
def build_judge_unet():
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=CANVAS, in_channels=1 + len(CLASS_NAMES), out_channels=1,
                       block_out_channels=(16, 32, 32), layers_per_block=1, down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3, norm_num_groups=8)


def train_judge(out: Path, steps: Optional[int] = None, device: str = "cpu", seed: int = 0,
                batch_size: int = 64, save_every: int = 250) -> dict:
    """As fmnist.train_judge: DDPM epsilon prediction (1000 linear-beta steps), AdamW 1e-3 with warm-up and
    cosine decay, EMA 0.999 (saved every `save_every` steps, atomically). The condition is the one-hot semantic
    mask (B, 5, 24, 24) concatenated to the noisy image; at test time diffusion_tta gives the segmenter's
    per-pixel softmax in its place."""
    from .ddpm import save_judge_folder, train_ddpm
    data = train_scenes(TRAIN_SCENES, seed)
    x = data.images * 2 - 1
    meta = {"kind": "map-unet", "map_kind": "probabilities", "class_names": list(CLASS_NAMES),
            "data": f"composed Fashion-MNIST train scenes (tta.data.scenes), {CANVAS}x{CANVAS}, one-hot masks",
            "recipe": "tta zoo train scenes-judge"}

    def batch(idx):
        return x[idx], F.one_hot(data.masks[idx], len(CLASS_NAMES)).permute(0, 3, 1, 2).float().to(device)

    metrics = train_ddpm(
        build_judge_unet, len(x), batch, lambda unet, x_t, t, cond: unet(torch.cat([x_t, cond], 1), t).sample,
        lambda ema, scheduler, info: save_judge_folder(ema, scheduler, out, {**meta, "training": info}),
        steps or 1300, batch_size, seed, device, save_every)
    metrics.update(judge_map_check(out, seed))
    print(json.dumps(metrics))
    return metrics


@torch.no_grad()
def judge_map_check(path: Path, seed: int = 0, n: int = 64, pairs: int = 32) -> dict:
    """Does the judge use its map? Mean denoising error on test scenes with the true one-hot map, against the
    map of another scene (a wrong map should give a larger error)."""
    from ..generative import create_judge
    judge = create_judge(str(path))
    test = test_scenes(n, seed + 1)
    x0 = judge.encode(test.images)
    right, wrong = judge.condition(test.one_hot()), judge.condition(test.one_hot().roll(1, 0))
    gen = torch.Generator().manual_seed(seed)
    err_right = err_wrong = 0.0
    for _ in range(pairs):
        t = torch.randint(0, judge.num_train_timesteps, (n,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        err_right += judge.denoising_error(x0, right, t, noise).mean().item() / pairs
        err_wrong += judge.denoising_error(x0, wrong, t, noise).mean().item() / pairs
    return {"test_error_true_map": err_right, "test_error_shuffled_map": err_wrong}


# ---- scenes-slots ----------------------------------------------------------------------------------------------
def _slot_class():
    from ..nets import SlotAttentionAutoEncoder

    class SceneSlots(SlotAttentionAutoEncoder):
        """The slot autoencoder as the benchmark sees it: (B, 1, 24, 24) in [0, 1] -> slot masks (B, 3, 24, 24),
        scored by ARI / FG-ARI against the scene's masks (task "object_discovery")."""
        task = "object_discovery"
        class_names = None
        input_size = INPUT_SIZE
        name = "zoo:scenes-slots"
    return SceneSlots


def build_slots():
    return _slot_class()(image_size=(CANVAS, CANVAS), in_channels=1, num_slots=3, dim=32, iters=3, hidden=16)


def load_slots(path: Optional[Path], **kwargs):
    model = build_slots()
    if path is not None:
        load_weights(model, path)
    return model.eval()


def _ari_scores(model, scenes) -> dict:
    with torch.no_grad():
        pred = torch.cat([model.predict(scenes.images[i:i + 256]).argmax(1) for i in range(0, len(scenes), 256)])
    return {"ari": adjusted_rand_index(scenes.instances, pred).mean().item(),
            "fg_ari": foreground_ari(scenes.instances, pred).mean().item()}


def train_slots(out: Path, steps: Optional[int] = None, device: str = "cpu", seed: int = 0,
                batch_size: int = 32) -> dict:
    """Reconstruction only (no labels), as benchmarks/diagnostics/fmnist_slot_mae.py: Adam 4e-4 with a 300-step
    warm-up, batch 32, 2000 steps by default. Reports ARI / FG-ARI of the slot masks on 200 clean test scenes."""
    torch.manual_seed(seed)
    data = train_scenes(TRAIN_SCENES, seed)
    test = test_scenes(200, seed)
    model = build_slots().to(device)
    steps = steps or 2000
    opt = torch.optim.Adam(model.parameters(), 4e-4)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    running = None
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = 4e-4 * min(1.0, step / 300)
        xb = data.images[torch.randint(0, len(data), (batch_size,), generator=gen)].to(device)
        recon, extras = model.reconstruct(xb)
        loss = model.reconstruction_loss(xb, recon, extras).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            log_progress(step, steps, start, loss=running)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    scores = _ari_scores(model.cpu(), test)
    metrics = {"test_ari": scores["ari"], "test_fg_ari": scores["fg_ari"], "steps": steps,
               "final_loss_ema": running, "seconds": time.perf_counter() - start}
    print(json.dumps(metrics))
    return metrics


register_member(ZooMember("scenes-seg", "scene segmenter: small UNet with batch norm (24x24 grey, background + 4 "
                          "Fashion-MNIST classes)", train_segmenter, load_segmenter, "scenes-seg.pt"))
register_member(ZooMember("scenes-judge", "map-conditioned pixel diffusion judge for the scenes (24x24, 5-class "
                          "probability maps concatenated)", train_judge, None, "scenes-judge"))
register_member(ZooMember("scenes-slots", "slot-attention autoencoder for the scenes (3 slots, reconstruction "
                          "only), for slow_inference", train_slots, load_slots, "scenes-slots.pt"))
