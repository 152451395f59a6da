"""Diagnostic (never a reported result): does Diffusion-TTA pull the classifier toward what its judge knows?

The zoo judge is fine-tuned on corrupted *training* images of one corruption, so that it knows the shifted
domain; then, on the evidence suite's images of that domain (benchmarks/evidence.yaml, the same 200 images):
  1. the judge's own accuracy as a Diffusion Classifier (what feedback could at best carry), clean judge beside it;
  2. Diffusion-TTA's accuracy after each step (0 = source) with either judge, and the update size |dtheta|/|theta|;
  3. the gradient at the source weights: its signal-to-noise ratio over (t, eps) pairs (|mean|^2 over the
     variance of the mean of `pairs` single-pair gradients) and its cosine with the cross-entropy gradient of
     the true label (> 0: a step of Diffusion-TTA raises the true class).
If the shifted judge is accurate and Diffusion-TTA does not move toward it, the update is too weak or too noisy.

    python benchmarks/diagnostics/shifted_judge.py            # ~25 min on one CPU thread
Writes results/diagnostic-shifted-judge.md; the fine-tuned judge goes to runs/ (resumable, not committed).
Fine-tuning reads the full training split (`apt-get install -y dataset-fashion-mnist`, or torchvision online).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
# The diagnostic studies the gradient every classifier weight gets from a fixed judge, the setting of its recorded
# runs (Diffusion-TTA's defaults, the official DiT setting, also adapt the judge and leave the last layer out).
CLASSIFIER_GRADIENT = {"adapt": "all", "preset": "classifier-only"}


def finetune_judge(out: Path, corruption: str, steps: int, images: int, seed: int) -> None:
    """fmnist-judge's recipe (tta.zoo.ddpm) started from its weights, on corrupted training images."""
    from diffusers import UNet2DModel

    from tta.data.corruptions import corrupt_images
    from tta.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
    from tta.generative.base import prepare_images
    from tta.zoo import checkpoint_path
    from tta.zoo.ddpm import save_judge_folder, train_ddpm, training_state_path
    from tta.zoo.fmnist import JUDGE_SIZE
    if (out / "unet").exists() and not training_state_path(out).exists():
        return
    x, y = load_fashion_mnist("train")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:images]
    shifted = corrupt_images(x[pick], corruption, 5, seed=seed + 1)  # training images: never the test images
    x0 = prepare_images(shifted, (JUDGE_SIZE, JUDGE_SIZE), 1)
    labels = y[pick]
    source = checkpoint_path("fmnist-judge") / "unet"
    meta = {"kind": "pixel-unet", "class_names": list(CLASS_NAMES),
            "data": f"Fashion-MNIST train ({images} images) under {corruption}-5, 16x16 (diagnostic only)",
            "recipe": "benchmarks/diagnostics/shifted_judge.py"}
    train_ddpm(lambda: UNet2DModel.from_pretrained(source), len(x0), lambda idx: (x0[idx], labels[idx]),
               lambda unet, x_t, t, c: unet(x_t, t, class_labels=c).sample,
               lambda ema, scheduler, info: save_judge_folder(ema, scheduler, out, {**meta, "training": info}),
               steps, 128, seed, "cpu", 100, training_state_path(out), resume=True)
    training_state_path(out).unlink()  # done: the judge folder is what remains


def evaluation_images(corruption: str):
    """The evidence suite's images of `corruption`-5, built by the harness itself (the same 200 images)."""
    from tta.bench.datasets import BuildContext, build_domains
    from tta.bench.spec import load_spec
    spec = load_spec(ROOT / "benchmarks" / "evidence.yaml")
    domain = next(d for d in build_domains(spec.data, BuildContext((1, 28, 28))) if d.name == corruption)
    xs, ys = zip(*(domain.dataset[i] for i in range(len(domain.dataset))))
    return torch.stack(xs), torch.tensor(ys)


def dc_accuracy(judge: str, x: torch.Tensor, y: torch.Tensor) -> float:
    import tta
    dc = tta.create_adapter("diffusion_classifier", tta.create_model("zoo:fmnist-cnn"), judge=judge, keep=(3, 1),
                            samples=(20, 60), micro_batch=100, seed=0)
    with torch.no_grad():
        return float(sum((dc(x[i:i + 1]).argmax(1) == y[i:i + 1]).item() for i in range(len(x))) / len(x))


def dtta_trajectory(judge: str, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float):
    """Accuracy after each step 0..steps (one SGD step per call on a non-episodic adapter reset per image, the
    same as one episodic call with `steps` steps) and the relative update size after the last step."""
    import tta
    adapter = tta.create_adapter("diffusion_tta", tta.create_model("zoo:fmnist-cnn"), judge=judge, steps=1,
                                 **CLASSIFIER_GRADIENT, pairs=32, micro_batch=32, lr=lr, seed=0, episodic=False)
    theta0 = torch.cat([p.detach().flatten() for _, p in adapter.adapted_params]).clone()
    correct = np.zeros((steps + 1, len(x)))
    moved = []
    for i in range(len(x)):
        adapter.reset()
        xi = x[i:i + 1]
        with torch.no_grad():
            correct[0, i] = float(adapter.model(xi).argmax(1).item() == y[i].item())
        for s in range(1, steps + 1):
            correct[s, i] = float(adapter(xi).argmax(1).item() == y[i].item())
        theta = torch.cat([p.detach().flatten() for _, p in adapter.adapted_params])
        moved.append(float((theta - theta0).norm() / theta0.norm()))
    return correct.mean(1), float(np.mean(moved))


def gradient_stats(judge: str, x: torch.Tensor, y: torch.Tensor, pairs: int):
    """Per image at the source weights: SNR of the `pairs`-pair mean gradient and its descent direction's cosine
    with the descent direction of the true label's cross-entropy."""
    import tta
    adapter = tta.create_adapter("diffusion_tta", tta.create_model("zoo:fmnist-cnn"), judge=judge, steps=1,
                                 **CLASSIFIER_GRADIENT, pairs=1, micro_batch=1, seed=0)
    params = [p for _, p in adapter.adapted_params]

    def flat_grad():
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        for p in params:
            p.grad = None
        return g

    snr, cosine = [], []
    for i in range(len(x)):
        xi = x[i:i + 1]
        with torch.enable_grad():
            grads = []
            for _ in range(pairs):
                adapter.compute_gradients(xi)
                grads.append(flat_grad())
            g = torch.stack(grads)
            mean = g.mean(0)
            noise = g.var(0, unbiased=True).sum() / pairs  # variance of the mean, summed over coordinates
            snr.append(float(mean.pow(2).sum() / noise))
            F.cross_entropy(adapter.model(xi), y[i:i + 1]).backward()
            ce = flat_grad()
        cosine.append(float(F.cosine_similarity(mean, ce, dim=0)))
    return float(np.median(snr)), float(np.mean(cosine)), float(np.mean(np.array(cosine) > 0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corruption", default="gaussian_noise")
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--train-images", type=int, default=12000)
    parser.add_argument("--steps", type=int, default=20, help="Diffusion-TTA steps per image to trace")
    parser.add_argument("--lr", type=float, default=5e-3, help="Diffusion-TTA's SGD lr (the paper's DiT runs)")
    parser.add_argument("--gradient-images", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "results" / "diagnostic-shifted-judge.md"))
    parser.add_argument("--work", default=str(ROOT / "runs"), help="where the fine-tuned judge is kept")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    judge_dir = Path(args.work) / f"fmnist-judge-{args.corruption}"
    finetune_judge(judge_dir, args.corruption, args.finetune_steps, args.train_images, seed=0)
    x, y = evaluation_images(args.corruption)
    judges = {"clean judge (zoo:fmnist-judge)": "zoo:fmnist-judge",
              f"judge fine-tuned on {args.corruption}-5 training images": str(judge_dir)}
    lines = []
    for label, judge in judges.items():
        acc_dc = dc_accuracy(judge, x, y)
        curve, moved = dtta_trajectory(judge, x, y, args.steps, args.lr)
        snr, cos, positive = gradient_stats(judge, x[:args.gradient_images], y[:args.gradient_images], args.pairs)
        lines.append((label, acc_dc, curve, moved, snr, cos, positive))
        print(label, acc_dc, curve.round(3).tolist(), moved, snr, cos, positive, flush=True)
    shown = [s for s in (0, 1, 2, 5, 10, 20, args.steps) if s <= args.steps]
    shown = sorted(set(shown))
    md = ["# Diagnostic: Diffusion-TTA with a judge that knows the shift", "",
          f"Command: `{shlex.join(['python', 'benchmarks/diagnostics/shifted_judge.py', *sys.argv[1:]])}`", "",
          "A diagnostic, not a result: the second judge has seen corrupted training images of the very corruption "
          "it is tested on. zoo:fmnist-cnn, the evidence suite's "
          f"{len(x)} images of {args.corruption}-5 (benchmarks/evidence.yaml), episodic, batch 1; Diffusion-TTA "
          f"SGD lr {args.lr:g} momentum 0.9, 32 (t, eps) pairs per step, all parameters. "
          f"Judge fine-tuning: fmnist-judge's recipe from its weights, {args.finetune_steps} steps of 128 on "
          f"{args.train_images} training images. Gradient statistics on the first {args.gradient_images} images, "
          f"{args.pairs} single-pair gradients each, at the source weights. Top-1 accuracy in percent.", "",
          "| judge | Diffusion Classifier | " + " | ".join(f"DTTA step {s}" for s in shown)
          + f" | update size after {args.steps} steps | gradient SNR (median) | cos(DTTA, true-label CE) | "
            "share cos > 0 |",
          "|---|---|" + "---|" * len(shown) + "---|---|---|---|"]
    for label, acc_dc, curve, moved, snr, cos, positive in lines:
        md.append(f"| {label} | {100 * acc_dc:.1f} | " + " | ".join(f"{100 * curve[s]:.1f}" for s in shown)
                  + f" | {moved:.2e} | {snr:.2f} | {cos:+.3f} | {100 * positive:.0f}% |")
    md += ["", f"_{len(x)} images; {time.perf_counter() - start:.0f} s on one CPU thread; torch "
               f"{torch.__version__}_", ""]
    Path(args.out).write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
