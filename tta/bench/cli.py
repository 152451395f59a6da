"""`tta bench`, `tta report` and `tta compare`: `register(subparsers)` adds them to the main `tta` parser
(tta/cli.py), which runs them."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


def _split(values: Optional[List[str]]) -> Optional[List[str]]:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def cmd_bench(args) -> int:
    from .runner import Runner
    from .spec import load_spec
    spec = load_spec(args.benchmark)
    # Not results/ by default: a checkout's results/ holds the committed runs, which a run would otherwise extend or
    # mix with rows of this machine; runs/ is the user's own, and the committed run serves as the reference.
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.benchmark).stem}.jsonl"
    kwargs = dict(methods=_split(args.methods), limit=args.limit, device=args.device, data_root=args.data_root,
                  download=args.download, progress=not args.no_progress, num_workers=args.num_workers,
                  allow_code=args.allow_code, on_error=args.on_error)
    from .distributed import distributed_env, run_distributed
    if distributed_env().world_size > 1:  # torchrun: this rank's share, merged into `out` by rank 0
        summary = run_distributed(spec, out, **kwargs)
        print(f"{spec.name} rank {summary['rank']}/{summary['world_size']}: {summary['written']} row(s) written")
        if summary["rank"] != 0:
            return 0
        print(f"{spec.name}: {summary['merged']} row(s) merged -> {out}")
    else:
        runner = Runner(spec, out, **kwargs)
        try:
            summary = runner.run()
        except KeyboardInterrupt:
            # Rows are written whole as each domain finishes, so everything up to here is safe and resumable.
            print(f"tta bench: interrupted; {runner.written} row(s) written by this run and every earlier row are "
                  f"kept in {out} (the domain in progress is lost); rerun the same command to resume",
                  file=sys.stderr)
            return INTERRUPTED
        print(f"{spec.name}: {summary['written']} row(s) written, {summary['skipped']} already present -> {out}")
    from .results import compare_runs, reference_file
    reference = Path(args.reference) if args.reference else reference_file(args.benchmark)
    if reference is not None and reference.resolve() != out.resolve():
        print(compare_runs(out, reference))
    if args.report:
        from .report import write_report
        made = write_report([out], command=getattr(args, "command_line", None))
        print(f"report: {made['markdown'][0]}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    made = write_report([args.results], out=args.out, plots=not args.no_plots,
                        command=getattr(args, "command_line", None), pairs=args.pair or (),
                        published=args.published)
    for kind in ("markdown", "csv", "plots"):
        for p in made[kind]:
            print(p)
    return 0


def cmd_compare(args) -> int:
    from .report import write_report
    out = args.out or str(Path(args.results[0]).parent / "compare")
    made = write_report(args.results, out=out, plots=not args.no_plots, command=getattr(args, "command_line", None),
                        pairs=args.pair or ())
    for kind in ("markdown", "csv", "plots"):
        for p in made[kind]:
            print(p)
    return 0


def register(subparsers) -> None:
    """Add `bench`, `report` and `compare` to an argparse subparsers object."""
    from ..devices import default_device
    from ..threads import add_threads_option
    p = subparsers.add_parser("bench", help="run a benchmark file; resumes: rows already in --out are skipped")
    p.add_argument("benchmark", help="a benchmark YAML file, e.g. benchmarks/imagenet-c.yaml")
    p.add_argument("--methods", action="append", metavar="LABEL[,LABEL]", help="run only these methods (labels)")
    p.add_argument("--limit", type=int, help="at most N images per domain (a seeded random subset), for a quick look")
    p.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N (default: cuda when present)")
    p.add_argument("--out", help="results file (JSON lines); default runs/<benchmark file name>.jsonl")
    p.add_argument("--reference", metavar="FILE",
                   help="a results file to compare this run's outcomes with, row by row (default: the committed run "
                        "results/<benchmark file name>.jsonl, when there is one)")
    p.add_argument("--data-root", help="the folder of your copy of the data; overrides data.root of the file")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download missing zero-shot sets (nothing is ever downloaded without it)")
    p.add_argument("--num-workers", type=int, help="data loader worker processes (default: the file's num_workers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report", action="store_true", help="write the report next to the results when done")
    p.add_argument("--allow-code", action="store_true",
                   help="let model.factory call functions outside tta, timm, torchvision, open_clip, "
                        "segmentation_models_pytorch and diffusers (a factory runs code: only for files you trust)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="unreadable image files (data kinds folder, foolbox, imagenet-c, imagenet-variant): raise "
                        "stops naming the file; skip reads every file once up front, drops and lists the unreadable "
                        "ones, and records how many in each row (domain_info.skipped_files)")
    add_threads_option(p)
    p.set_defaults(func=cmd_bench)

    p = subparsers.add_parser("report", help="markdown/CSV tables and plots from a results file")
    p.add_argument("results", help="a results file written by `tta bench`")
    p.add_argument("--out", help="output prefix (default: the results file without .jsonl)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"),
                   help="also compare label A with label B image by image, e.g. two models' source rows "
                        "(repeatable)")
    p.add_argument("--published", metavar="FILE",
                   help="a published-numbers table, e.g. benchmarks/published/cifar10-c.yaml: each published row "
                        "beside your run of the same method and setting, with the difference")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("compare", help="one report over several results files")
    p.add_argument("results", nargs="+", help="results files written by `tta bench`")
    p.add_argument("--out", help="output prefix (default: <folder of the first file>/compare)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"),
                   help="also compare label A with label B image by image, e.g. two models' source rows "
                        "(repeatable)")
    p.set_defaults(func=cmd_compare)

