"""Choose IT3's test-time learning rate and step count on held-out data, before reporting on other data.

Sweeps Adam's lr and the number of steps of `tta.create_adapter("it3", ...)` (per example, frozen anchor: the
paper's setting) with the shipped zoo model `zoo:fmnist-it3` on held-out Fashion-MNIST test images (5000 onwards,
disjoint from the first 1000 that scripts/evidence_issue5.py reports on) under held-out corruptions (speckle
noise severity 5 and gaussian noise severity 3, neither in the reported table). Prints a markdown table and the
setting with the best mean accuracy over the held-out domains; scripts/evidence_issue5.py --part it3 runs the
same sweep and reports the chosen setting next to the paper's.

    python scripts/probe_it3.py
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Sequence, Tuple

import torch

import tta
import tta.methods.it3  # noqa: F401  (registers "it3")
from tta.data.corruptions import corrupt_images
from tta.data.fashion_mnist import load_fashion_mnist

HELD_OUT = (("speckle_noise", 5), ("gaussian_noise", 3))
LRS = (1e-4, 3e-4, 1e-3)
STEPS = (1, 3)


def load_model():
    """The shipped IT3 classifier in eval mode (create_model returns it in train mode: a forward pass before an
    adapter is built would otherwise move BN's running statistics)."""
    return tta.create_model("zoo:fmnist-it3").eval()


def per_example(model, x: torch.Tensor, **config) -> Tuple[torch.Tensor, float]:
    """IT3 per test input (batch 1, episodic: every image starts from the source model); (logits, seconds)."""
    adapter = tta.create_adapter("it3", model, **config)
    t0 = time.time()
    out = torch.cat([adapter(xi) for xi in x.split(1)])
    secs = time.time() - t0
    if adapter.guard_events:
        print(f"  guard events {adapter.guard_events} for {config}")
    return out, secs


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1) == labels


def sweep(model, domains: Dict[str, Tuple[torch.Tensor, torch.Tensor]], lrs: Sequence[float] = LRS,
          steps_list: Sequence[int] = STEPS) -> Dict[str, object]:
    """Accuracy of source and of IT3 for every (lr, steps) on each domain. Returns a dict: table (markdown), best
    ((lr, steps) with the best mean accuracy over the domains), scores ({(lr, steps): mean}), source (the source
    model's mean), seconds."""
    t_start = time.time()
    names = list(domains)
    with torch.no_grad():
        src = {d: 100.0 * correct(model(x), y).float().mean().item() for d, (x, y) in domains.items()}
    rows: List[str] = ["| source | - | " + " | ".join(f"{src[d]:.1f}" for d in names)
                       + f" | {sum(src.values()) / len(src):.1f} | - |"]
    scores = {}
    for lr in lrs:
        for steps in steps_list:
            accs, secs = {}, 0.0
            for d, (x, y) in domains.items():
                out, s = per_example(model, x, lr=lr, steps=steps)
                accs[d] = 100.0 * correct(out, y).float().mean().item()
                secs += s
            mean = sum(accs.values()) / len(accs)
            scores[(lr, steps)] = mean
            n = sum(len(x) for x, _ in domains.values())
            rows.append(f"| it3, Adam {lr:g} | {steps} | " + " | ".join(f"{accs[d]:.1f}" for d in names)
                        + f" | {mean:.1f} | {1000 * secs / n:.1f} |")
            print(rows[-1], flush=True)
    best = max(scores, key=lambda k: (scores[k], -k[1]))  # ties: fewer steps
    header = ("| method | steps | " + " | ".join(names) + " | mean | ms / image |\n"
              "|---|---|" + "---|" * len(names) + "---|---|\n")
    return {"table": header + "\n".join(rows) + "\n", "best": best, "scores": scores,
            "source": sum(src.values()) / len(src), "seconds": time.time() - t_start}


def held_out_domains(n: int, start: int = 5000) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    x, y = load_fashion_mnist("test")
    x, y = x[start:start + n], y[start:start + n]
    return {f"{name}-{sev}": (corrupt_images(x, name, sev, seed=1), y) for name, sev in HELD_OUT}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=300, help="held-out images per domain")
    parser.add_argument("--start", type=int, default=5000, help="index of the first held-out test image")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = sweep(load_model(), held_out_domains(args.n, args.start))
    (lr, steps), scores = res["best"], res["scores"]
    print(f"\nHeld-out images: test[{args.start}:{args.start + args.n}], {args.n} per domain.\n")
    print(res["table"])
    print(f"Best mean over the held-out domains: Adam lr {lr:g}, {steps} step(s); IT3 means "
          f"{min(scores.values()):.1f} to {max(scores.values()):.1f}, source {res['source']:.1f} "
          f"({res['seconds']:.0f} s).")


if __name__ == "__main__":
    main()
