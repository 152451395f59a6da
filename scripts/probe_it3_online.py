"""Probe: IT3's online variant (EMA anchor, never reset) on zoo:fmnist-it3, over optimisers and learning rates.

    python scripts/probe_it3_online.py     # about a minute on 2 CPU threads; prints a table, writes nothing

The first 512 Fashion-MNIST test images as a stream of 8 batches of 64, clean and gaussian_noise severity 5
(seed 0), one step per batch, EMA momentum 0.99. Issue 5's evidence (results/issue5_evidence.md) found the
batched and online variants collapse at the paper's Adam 1e-3; this asks whether any nearby setting helps online.
"""
import torch

import tta
from tta.data.corruptions import corrupt_images
from tta.data.fashion_mnist import load_fashion_mnist

SETTINGS = [{"optimizer": "adam", "lr": 1e-3}, {"optimizer": "adam", "lr": 1e-4}, {"optimizer": "adam", "lr": 1e-5},
            {"optimizer": "sgd", "lr": 1e-3}, {"optimizer": "sgd", "lr": 1e-2}]


def accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return (out.argmax(1) == y).float().mean().item() * 100


def main() -> None:
    torch.set_num_threads(2)
    x, y = load_fashion_mnist("test")
    x, y = x[:512], y[:512]
    domains = {"clean": x, "gaussian_noise-5": corrupt_images(x, "gaussian_noise", 5, seed=0)}
    source = tta.create_model("zoo:fmnist-it3")
    print("| setting | " + " | ".join(domains) + " |")
    print("|---|" + "---|" * len(domains))
    with torch.no_grad():
        print("| source | " + " | ".join(f"{accuracy(source(xd), y):.1f}" for xd in domains.values()) + " |")
    for cfg in SETTINGS:
        cells = []
        for xd in domains.values():  # each domain its own stream, from the source model
            adapter = tta.create_adapter("it3", tta.create_model("zoo:fmnist-it3"), episodic=False, anchor="ema",
                                         ema_momentum=0.99, steps=1, **cfg)
            cells.append(f"{accuracy(torch.cat([adapter(xb) for xb in xd.split(64)]), y):.1f}")
        print(f"| it3 online, {cfg['optimizer']} lr {cfg['lr']:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
