"""The `tta` command line: list what exists, run a method on a set of images, run benchmarks, report.

    tta list adapters | models [pattern]
    tta run --model tv:mobilenet_v2@IMAGENET1K_V1 --method tent,norm --data foolbox:imagenet --corruption gaussian_noise
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from typing import Dict, List, Optional

import torch

from .bench.cli import INTERRUPTED
from .devices import check_device, default_device
from .threads import add_threads_option, configure_threads

def parse_assignments(pairs: List[str]) -> Dict[str, object]:
    """`key=value` pairs from --set; values are read as numbers or YAML (true, [1, 2], strings)."""
    import yaml
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = parse_value(value, yaml)
    return out


def parse_value(text: str, yaml):
    """Numbers as numbers (YAML would read 1e-3 as a string), everything else as YAML."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def method_configs(assignments: Dict[str, object], methods: List[str]) -> Dict[str, Dict[str, object]]:
    """`lr=1e-3` applies to every method, `memo.n_augmentations=16` to memo only."""
    configs: Dict[str, Dict[str, object]] = {m: {} for m in methods}
    for key, value in assignments.items():
        scope, dot, field = key.rpartition(".")
        if not dot:
            for m in methods:
                configs[m][key] = value
        elif scope in configs:
            configs[scope][field] = value
        else:
            raise ValueError(f"--set {key}=...: {scope!r} is not one of the methods being run ({', '.join(methods)})")
    return configs


def cmd_list(args) -> int:
    import tta
    if args.what == "adapters":
        names = tta.list_adapters(args.pattern or "*")
    else:
        names = tta.list_models(args.pattern or "*")
    print("\n".join(names))
    return 0


def _batches(dataset, batch_size: int, limit: Optional[int]):
    from torch.utils.data import DataLoader, Subset
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _evaluate(predict, loader, corruption, severity, seed, device, desc) -> Dict[str, object]:
    """Run `predict` over the stream; returns counts, accuracy (when labelled), the model time (seconds inside
    `predict`) and the data time (reading and corrupting the images, the same for every pass).

    The bar counts images. A per-example method (one_example_per_call) gets the images of a batch one call at a
    time, so its bar moves per image; the batches are still read and corrupted whole, so every pass sees the same
    images."""
    from tqdm import tqdm
    from .data import corrupt_images
    correct = seen = labelled = 0
    counts: Dict[int, int] = {}
    model_s = data_s = 0.0
    one_by_one = getattr(predict, "one_example_per_call", False)
    with tqdm(total=len(loader.dataset), desc=desc, unit="img", leave=False) as bar:  # cleared on Ctrl-C too
        start = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if corruption:
                x = corrupt_images(x, corruption, severity, seed=seed + i)
            x = x.to(device)
            data_s += time.perf_counter() - start
            preds = []
            for chunk in x.split(1) if one_by_one else (x,):
                start = time.perf_counter()
                preds.append(predict(chunk).argmax(1).cpu())  # .cpu() waits for the device: the time is complete
                model_s += time.perf_counter() - start
                bar.update(len(chunk))
            pred = torch.cat(preds)
            for p in pred.tolist():
                counts[p] = counts.get(p, 0) + 1
            mask = y >= 0
            correct += int((pred[mask] == y[mask]).sum())
            labelled += int(mask.sum())
            seen += len(y)
            start = time.perf_counter()  # reading the next batch starts here
    result = {"n": seen, "seconds": model_s, "data_seconds": data_s, "predictions": counts}
    result["accuracy"] = correct / labelled if labelled else None
    return result


def _warm_up(model, image: torch.Tensor) -> float:
    """One call of the source model on one image outside the passes, so that the one-off costs of a first call
    (kernel selection, lazy allocation, CUDA start-up) are not counted in the first pass; returns its seconds.
    Skipped for a per-example model (the Diffusion Classifier), whose first call is one image among many and costs
    a whole image's work."""
    if getattr(model, "one_example_per_call", False):
        return 0.0
    start = time.perf_counter()
    with torch.no_grad():
        model(image[None]).cpu()
    return time.perf_counter() - start


def cmd_run(args) -> int:
    import tta
    from .bench.source_data import prepare_adapter
    from .data import open_images
    from .data.images import printable
    device = check_device(args.device)
    torch.manual_seed(args.seed)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    configs = method_configs(parse_assignments(args.set), methods)
    for name in methods:  # a typo in a name or a config key fails here, before any model loads
        cfg = tta.adapter.make_config(tta.adapter.ADAPTERS.get(name).Config, None, configs[name])
        if getattr(cfg, "fisher_data", None) == "clean" and not args.corruption:
            raise ValueError(f"{name}: fisher_data: clean means the --data images before their --corruption, and "
                             "this run has no --corruption, so they are the test images themselves; give "
                             "fisher_data a folder of clean images, or add --corruption")
    model_kwargs = parse_assignments(args.model_set)
    start = time.perf_counter()
    model = tta.create_model(args.model, pretrained=not args.no_pretrained, weights=args.weights, **model_kwargs)
    model = model.to(device).eval()
    load_s = time.perf_counter() - start
    dataset = open_images(args.data, model.input_size, model.class_names, on_error=args.on_error)
    loader = _batches(dataset, args.batch_size, args.limit)
    shift = f"{args.corruption}-{args.severity}" if args.corruption else "clean"
    print(f"model {args.model} | data {printable(args.data)} ({len(loader.dataset)} images, {shift}) | "
          f"device {args.device}")
    if dataset.skipped:
        print(dataset.skipped_summary())

    def show(label: str, res: Dict[str, object]) -> None:
        acc = "n/a (unlabelled data)" if res["accuracy"] is None else f"{100 * res['accuracy']:.1f}%"
        print(f"{label:<24} top-1 {acc:<24} {res['seconds']:.1f} s")

    start = time.perf_counter()
    first_image = loader.dataset[0][0].to(device) if len(loader.dataset) else None
    data_s = time.perf_counter() - start
    warm_s = _warm_up(model, first_image) if first_image is not None else 0.0
    # Every pass starts from the same random state, so a method's result does not depend on those listed before it.
    torch.manual_seed(args.seed)
    with torch.no_grad():
        source = _evaluate(model, loader, args.corruption, args.severity, args.seed, device, "source")
    show("before (source)", source)
    data_s += source["data_seconds"]
    prepare_s = 0.0
    for name in methods:
        if name == "source" and not configs[name]:
            continue  # the unadapted model: already shown as "before (source)"
        adapter = tta.create_adapter(name, copy.deepcopy(model), **configs[name])
        # The clean images a method asks for first (EATA's Fisher), as tta bench computes them; "clean" is the
        # stream before its corruption.
        start = time.perf_counter()
        prepare_adapter(adapter, dataset if args.corruption else None, args.batch_size, args.seed, device,
                        on_error=args.on_error, out=sys.stdout)
        if getattr(adapter.cfg, "fisher_data", None) is not None:
            prepare_s += time.perf_counter() - start
        torch.manual_seed(args.seed)
        res = _evaluate(adapter, loader, args.corruption, args.severity, args.seed, device, name)
        show(f"after ({name})", res)
        data_s += res["data_seconds"]
    print(f"times are model time; not in them: start-up {load_s + warm_s:.1f} s (model load {load_s:.1f} s, first "
          f"call {warm_s:.1f} s), reading and corrupting images {data_s:.1f} s"
          + (f", EATA's Fisher information {prepare_s:.1f} s" if prepare_s else ""))
    if source["accuracy"] is None:
        top = sorted(source["predictions"].items(), key=lambda kv: -kv[1])[:5]
        names = model.class_names or []
        print("most frequent source predictions:",
              ", ".join(f"{names[k] if k < len(names) else k} x{v}" for k, v in top))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tta", description="Test-time adaptation driven by generative feedback")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list adapters or model sources")
    p.add_argument("what", choices=["adapters", "models"])
    p.add_argument("pattern", nargs="?", help="fnmatch pattern; for models also timm:<pattern> or tv:<pattern>")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="adapt a model on a folder of images or a named set and print accuracy")
    p.add_argument("--model", required=True, help="timm:<name>, tv:<name>[@WEIGHTS], clip:<arch>@<tag>, smp:<a>/<enc>")
    p.add_argument("--weights", help="local checkpoint file to load instead of hub weights")
    p.add_argument("--no-pretrained", action="store_true", help="random weights (for smoke tests)")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra model arguments, e.g. num_classes=10")
    p.add_argument("--method", required=True, help="adapter name, or several separated by commas")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method config, e.g. lr=1e-3 (every method) or memo.n_augmentations=16 (one method); "
                        "eata.fisher_data=<folder of clean images> (or clean: the --data images before "
                        "--corruption) turns on EATA's Fisher regulariser")
    p.add_argument("--data", required=True, help="a folder of images (optionally one subfolder per class) "
                                                 "or a named set: foolbox:imagenet|cifar10|cifar100|mnist|fashionMNIST")
    p.add_argument("--corruption", help="apply an ImageNet-C corruption on the fly, e.g. gaussian_noise")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per call for batch methods (default 64); per-example methods (memo, diffusion_tta, "
                        "it3, slow_inference, ttt_mae, diffusion_classifier) get one image per call")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="what to do with unreadable images")
    add_threads_option(p)
    p.set_defaults(func=cmd_run)

    # Subcommands that live with their subsystem.
    from .bench.cli import register as register_bench
    from .zoo.cli import register as register_zoo
    register_bench(sub)
    register_zoo(sub)
    return parser


# Errors that come from what the user gave (a file, a name, a value, the disk) and that the code explains: one line
# and exit 2. Anything else is a bug in tta and keeps its traceback.
USER_ERRORS = (KeyError, ValueError, TypeError, OSError)

# What Ctrl-C leaves behind, per command; commands that write results catch it themselves to count them.
INTERRUPT_NOTES = {
    "run": "tta run keeps no results (it only prints them); rerun the same command",
    "bench": "the rows already in the results file are kept; rerun the same command to resume",
}


def error_line(err: BaseException) -> str:
    """The message of an error as one line: the text of a KeyError without quotes, line breaks folded."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["tta", *argv])  # reports state the command that produced them
    try:
        if hasattr(args, "threads"):  # commands that compute: set before any model or data is touched
            configure_threads(args.threads)
        return args.func(args)
    except KeyboardInterrupt:
        note = INTERRUPT_NOTES.get(args.command, "files written before the interruption are kept")
        print(f"tta {args.command}: interrupted; {note}", file=sys.stderr)
        return INTERRUPTED
    except USER_ERRORS as err:
        print(f"tta {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
