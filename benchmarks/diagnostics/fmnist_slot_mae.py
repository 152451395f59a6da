"""Slow inference (slot attention) and TTT-MAE on Fashion-MNIST from Debian's `dataset-fashion-mnist` package, on
the CPU: each part trains a small model from scratch (a few CPU minutes), then compares the source model with the
adapted one under a corruption, and writes its section of results/fmnist-it3-slot-mae.md (the other sections,
IT3's included, are kept, so the parts can run one at a time):

    python benchmarks/diagnostics/fmnist_slot_mae.py --part slot
    python benchmarks/diagnostics/fmnist_slot_mae.py --part mae

Training a model is not something `tta bench` does, so these two parts stay a script; IT3, which evaluates the
shipped zoo model, is the benchmark files benchmarks/it3-heldout.yaml and benchmarks/it3.yaml.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tta
import tta.methods.slow_inference  # noqa: F401  (register the methods even before tta.methods imports them)
import tta.methods.ttt_mae  # noqa: F401
from tta.data.corruptions import corrupt_images
from tta.data.fashion_mnist import load_fashion_mnist
from tta.nets import MaskedAutoencoderViT, SlotAttentionAutoEncoder
from tta.nets.mae_decoder import ttt_mae_training_loss
from tta.segmentation_metrics import adjusted_rand_index, foreground_ari

OUT = Path(__file__).resolve().parents[2] / "results" / "fmnist-it3-slot-mae.md"
CORRUPTION, SEVERITY = "gaussian_noise", 5  # ImageNet-C gaussian noise, severity 5: sigma 0.38 on [0, 1] pixels


def corrupt(x: torch.Tensor, severity: int = SEVERITY) -> torch.Tensor:
    """The shared ImageNet-C corruption; the library refuses images under 32 px, so pad to 32 and crop back
    (noise is per pixel, so the padding changes nothing inside the crop)."""
    ph, pw = max(0, 32 - x.shape[2]), max(0, 32 - x.shape[3])
    padded = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    out = corrupt_images(padded, CORRUPTION, severity)
    return out[:, :, ph // 2: ph // 2 + x.shape[2], pw // 2: pw // 2 + x.shape[3]]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def batches(n: int, size: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(n, (size,), generator=gen)


# ---- slot attention / slow inference ------------------------------------------------------------------------------
def make_scenes(images: torch.Tensor, n: int, gen: torch.Generator, size: int = 24, item: int = 12):
    """Scenes of two Fashion-MNIST items (shrunk to item x item) in two distinct cells of a 2x2 grid, on black;
    ground truth: 0 background, 1 and 2 the items (pixels brighter than 0.05)."""
    small = F.interpolate(images, size=(item, item), mode="area")
    x = torch.zeros(n, 1, size, size)
    seg = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for j, cell in enumerate(torch.randperm(4, generator=gen)[:2].tolist()):
            it = small[torch.randint(len(small), (1,), generator=gen).item(), 0]
            oy, ox = (cell // 2) * item, (cell % 2) * item
            fg = it > 0.05
            x[i, 0, oy:oy + item, ox:ox + item][fg] = it[fg]
            seg[i, oy:oy + item, ox:ox + item][fg] = j + 1
    return x, seg


def part_slot(args) -> str:
    x_tr, y_tr = load_fashion_mnist("train")
    x_te, y_te = load_fashion_mnist("test")
    gen = torch.Generator().manual_seed(0)
    train_classes = [0, 1, 2, 3, 4]
    tr_scenes, _ = make_scenes(x_tr[torch.isin(y_tr, torch.tensor(train_classes))][:20000], 8000, gen)
    torch.manual_seed(0)
    model = SlotAttentionAutoEncoder(image_size=(24, 24), in_channels=1, num_slots=3, dim=32, hidden=16)
    opt = torch.optim.Adam(model.parameters(), 4e-4)
    t0 = time.time()
    for step, idx in enumerate(batches(len(tr_scenes), 32, args.slot_train_steps, gen)):
        for group in opt.param_groups:  # warm-up, as in Slot Attention
            group["lr"] = 4e-4 * min(1.0, (step + 1) / 300)
        xb = tr_scenes[idx]
        recon, extras = model.reconstruct(xb)
        loss = model.reconstruction_loss(xb, recon, extras).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.time() - t0
    model.eval()
    sets = {}
    test_in = x_te[torch.isin(y_te, torch.tensor(train_classes))]
    sets["training classes, clean"] = make_scenes(test_in, args.n_scenes, gen)
    x_shift, seg_shift = make_scenes(test_in, args.n_scenes, gen)
    sets[f"training classes, {CORRUPTION} {args.slot_severity}"] = (
        corrupt(x_shift, args.slot_severity), seg_shift)
    test_novel = x_te[~torch.isin(y_te, torch.tensor(train_classes))]
    sets["unseen classes (sandal, shirt, sneaker, bag, boot), clean"] = make_scenes(test_novel, args.n_scenes, gen)
    rows = []
    for name, (x, seg) in sets.items():
        with torch.no_grad():
            pred0 = model.predict(x).argmax(1)
            rec0 = F.mse_loss(model.reconstruct(x)[0], x).item()
        adapter = tta.create_adapter("slow_inference", model, steps=args.slot_steps, patience=args.slot_patience,
                                     min_delta=1e-5)
        t0 = time.time()
        masks, recs, used = [], [], []
        for scene in x.split(1):
            masks.append(adapter(scene))
            recs.append(adapter.loss_history[-1])
            used.append(len(adapter.loss_history))
        secs = time.time() - t0
        pred1 = torch.cat(masks).argmax(1)
        rows.append(f"| {name} | {foreground_ari(seg, pred0).mean():.3f} | {foreground_ari(seg, pred1).mean():.3f} "
                    f"| {adjusted_rand_index(seg, pred0).mean():.3f} | {adjusted_rand_index(seg, pred1).mean():.3f} "
                    f"| {rec0:.4f} | {sum(recs) / len(recs):.4f} | {sum(used) / len(used):.0f} "
                    f"| {secs / len(x):.2f} |")
    header = ("| test scenes | FG-ARI before | FG-ARI after | ARI before | ARI after | recon. MSE before "
              "| recon. MSE after (last step) | steps used | s / scene |")
    return f"""## Slow inference (`slow_inference`) with the slot-attention autoencoder

Scenes: two Fashion-MNIST items shrunk to 12x12, each in its own cell of a 2x2 grid on a black 24x24 canvas,
per-pixel ground truth (item pixels > 0.05). `SlotAttentionAutoEncoder` (3 slots, 3 iterations, 53k parameters)
trained on 8,000 scenes of classes 0-4 (reconstruction only, no labels; Adam 4e-4 with warm-up,
{args.slot_train_steps} steps of batch 32, {train_s:.0f} s). Test: {args.n_scenes} scenes per set; slow inference
with the paper's optimiser (Adam 5e-4, all parameters, reset after every scene), at most {args.slot_steps} steps
with early stopping (patience {args.slot_patience}). Segmentation = argmax over the slot masks.

{header}
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


# ---- TTT-MAE ---------------------------------------------------------------------------------------------------
def part_mae(args) -> str:
    import timm
    x_tr, y_tr = load_fashion_mnist("train")
    x_te, y_te = load_fashion_mnist("test")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, depth=3,
                            embed_dim=64, num_heads=4, in_chans=1, num_classes=10)
    model = MaskedAutoencoderViT(vit, mean=(0.29,), std=(0.35,), decoder_dim=32, decoder_depth=1)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.05)
    t0 = time.time()
    for idx in batches(len(x_tr), 128, args.mae_train_steps, gen):
        opt.zero_grad()
        ttt_mae_training_loss(model, x_tr[idx], y_tr[idx]).backward()
        opt.step()
    train_s = time.time() - t0
    model.eval()
    x, y = x_te[: args.n_mae], y_te[: args.n_mae]
    xc = corrupt(x)
    with torch.no_grad():
        clean_acc = accuracy(model.predict(x), y)
        src = accuracy(model.predict(xc), y)
    rows = [f"| source | - | {src:.1f} | 0.00 |"]
    for steps, lr in ((20, 5e-3), (20, 2e-2)):
        adapter = tta.create_adapter("ttt_mae", model, steps=steps, lr=lr, views=args.mae_views)
        torch.manual_seed(0)
        t0 = time.time()
        out = torch.cat([adapter(xi) for xi in xc.split(1)])
        rows.append(f"| ttt_mae, SGD lr {lr:g}, {steps} steps, {args.mae_views} masked views | per example | "
                    f"{accuracy(out, y):.1f} | {(time.time() - t0) / len(xc):.2f} |")
    return f"""## TTT-MAE (`ttt_mae`)

timm ViT (28x28, patch 4, depth 3, width 64) with a 1-block MAE decoder (`MaskedAutoencoderViT`, mask ratio
0.75, normalised-pixel loss), trained jointly (`ttt_mae_training_loss`: CE + masked MSE; AdamW 1e-3,
{args.mae_train_steps} steps of batch 128, {train_s:.0f} s). Test: the first {args.n_mae} test images with
{CORRUPTION} severity {SEVERITY}; clean accuracy {clean_acc:.1f}%. TTT-MAE adapts the encoder only, per image,
SGD momentum 0.9 (the paper's 5e-3 and a larger rate), then classifies with the head.

| model | mode | accuracy % (corrupted) | s / image |
|---|---|---|---|
{chr(10).join(rows)}
"""


PARTS = {"slot": part_slot, "mae": part_mae}
ORDER = ["it3", "slot", "mae"]  # the IT3 section (benchmarks/it3*.yaml now) is kept as it is


def write_section(part: str, text: str, command: str) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    old = OUT.read_text() if OUT.exists() else ""
    sections = {p: m.group(1) for p in ORDER
                for m in [re.search(rf"<!-- part:{p} -->\n(.*?)<!-- /part:{p} -->\n", old, re.S)] if m}
    sections[part] = f"{text}\nProduced by `{command}` ({time.strftime('%Y-%m-%d')}, torch " \
                     f"{torch.__version__}, {torch.get_num_threads()} CPU thread(s)).\n\n"
    header = old.split("<!-- part:", 1)[0] if old else (
        "# IT3, slow inference and TTT-MAE on Fashion-MNIST\n\n"
        "Every figure below comes from the command under its section.\n"
        "Data: Fashion-MNIST from Debian's `dataset-fashion-mnist`. CPU only, seeds fixed.\n\n")
    body = "".join(f"<!-- part:{p} -->\n{sections[p]}<!-- /part:{p} -->\n" for p in ORDER if p in sections)
    OUT.write_text(header + body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slot-train-steps", type=int, default=1500)
    parser.add_argument("--slot-steps", type=int, default=100)
    parser.add_argument("--slot-patience", type=int, default=20)
    parser.add_argument("--slot-severity", type=int, default=3)
    parser.add_argument("--n-scenes", type=int, default=30)
    parser.add_argument("--mae-train-steps", type=int, default=800)
    parser.add_argument("--mae-views", type=int, default=16)
    parser.add_argument("--n-mae", type=int, default=150)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    text = PARTS[args.part](args)
    args_given = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join(["benchmarks/diagnostics/fmnist_slot_mae.py"] + args_given)
    write_section(args.part, text + f"\nWall time of this part: {time.time() - t0:.0f} s.\n", command)
    print(text)


if __name__ == "__main__":
    main()
