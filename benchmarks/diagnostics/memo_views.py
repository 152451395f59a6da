"""Diagnostic (never a reported result): why does MEMO fall below the source model on Fashion-MNIST?

MEMO minimises the entropy of the prediction averaged over augmented views of the test image, so its update can
only be as good as that average: if the classifier is mostly wrong on the views, the update pulls toward a wrong
class. On the evidence suite's images (benchmarks/evidence.yaml, the same 200 images per domain, zoo:fmnist-cnn),
for each crop MEMO can use, this measures without adapting:
  1. the source model's accuracy on the original images;
  2. its accuracy on single views (mean over the views);
  3. the accuracy of the views' marginal (the class MEMO's loss pulls toward, argmax of the averaged softmax);
  4. how often that marginal class differs from the original prediction, and how often it is right when it does.
MEMO's default ("tta" preset) crops with RandomResizedCrop at ImageNet's scale (0.08 to 1), meant for 224-pixel
photographs; "pad4" is the CIFAR-10 preset's RandomCrop with 4 pixels of padding.

    python benchmarks/diagnostics/memo_views.py      # ~2 min on one CPU thread
Writes results/diagnostic-memo-views.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shifted_judge import evaluation_images  # noqa: E402  (the evidence suite's images, built by the harness)

DOMAINS = ("clean", "gaussian_noise", "shot_noise", "defocus_blur", "glass_blur", "snow", "frost", "brightness",
           "contrast")


def view_statistics(model, x: torch.Tensor, y: torch.Tensor, views: int, crop: str, seed: int) -> dict:
    """Accuracy on the originals, on single views, of the views' marginal; how the marginal differs."""
    from tta.augment import memo_augment
    torch.manual_seed(seed)
    original_right, view_right, marginal_right, changed, changed_right = 0, 0.0, 0, 0, 0
    with torch.no_grad():
        for i in range(len(x)):
            original = model(x[i:i + 1]).argmax(1).item()
            probs = model(memo_augment(x[i], views, crop)).softmax(1)
            marginal = probs.mean(0).argmax().item()
            label = y[i].item()
            original_right += original == label
            view_right += (probs.argmax(1) == label).float().mean().item()
            marginal_right += marginal == label
            if marginal != original:
                changed += 1
                changed_right += marginal == label
    n = len(x)
    return {"original": 100 * original_right / n, "views": 100 * view_right / n, "marginal": 100 * marginal_right / n,
            "changed": changed, "changed_right": changed_right}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--views", type=int, default=64, help="views per image (MEMO's default preset: 64)")
    ap.add_argument("--crops", nargs="+", default=["resized", "pad4"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "diagnostic-memo-views.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import tta
    model = tta.create_model("zoo:fmnist-cnn").eval()
    start = time.perf_counter()
    rows = []
    for domain in DOMAINS:
        x, y = evaluation_images("fashion-mnist" if domain == "clean" else domain)
        for crop in args.crops:
            s = view_statistics(model, x, y, args.views, crop, args.seed)
            rows.append(f"| {domain} | {crop} | {s['original']:.1f} | {s['views']:.1f} | {s['marginal']:.1f} | "
                        f"{s['changed']} | {s['changed_right']} |")
            print(rows[-1], flush=True)
    command = "python benchmarks/diagnostics/memo_views.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = "\n".join([
        "# Diagnostic: what MEMO's augmented views tell the source model",
        "",
        f"Command: `{command.strip()}`",
        "",
        "A diagnostic, not a result: no adaptation, only the quantity MEMO's loss acts on. zoo:fmnist-cnn on the "
        "evidence suite's images (benchmarks/evidence.yaml, 200 per domain, severity 5), "
        f"{args.views} MEMO views per image (tta.augment.memo_augment: torchvision AugMix, severity 3, after the crop "
        "and a flip), seed "
        f"{args.seed}. `resized` is MEMO's default crop (RandomResizedCrop, scale 0.08 to 1); `pad4` the CIFAR-10 "
        "preset's (RandomCrop with 4 pixels of padding). Accuracy in percent: on the original images, on single "
        "views (mean over views), and of the views' marginal (the argmax of the averaged softmax, the class MEMO's "
        "marginal entropy pulls toward). The last two columns: images whose marginal class differs from the "
        "original prediction, and how many of those the marginal gets right.",
        "",
        "| domain | crop | original | single view | marginal of views | marginal differs | of which right |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"_{len(DOMAINS)} domains x 200 images; {time.perf_counter() - start:.0f} s on one CPU thread; "
        f"torch {torch.__version__}_",
        ""])
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
