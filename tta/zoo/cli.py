"""`tta zoo list` and `tta zoo train NAME`."""
from __future__ import annotations

from pathlib import Path


def cmd_zoo(args) -> int:
    from . import ZOO, checkpoint_path, list_zoo, train
    if args.action == "list":
        for name in list_zoo():
            path = checkpoint_path(name)
            print(f"{name:<16} {ZOO.get(name).description}  [{'present' if path.exists() else 'missing'}: {path}]")
        return 0
    if not args.name:
        raise ValueError(f"tta zoo train needs a member name: {', '.join(list_zoo())}")
    ZOO.get(args.name)  # an unknown name fails here, listing the members, before anything is created
    # A fresh model goes to a folder of the user's, never over the checkpoints the package ships and tests use
    # (pass --out with the package's folder, `tta zoo list` shows it, to replace those deliberately).
    out = Path(args.out) if args.out else Path("runs") / "zoo" / checkpoint_path(args.name).name
    train(args.name, out, args.steps, args.device, args.seed, args.resume)
    print(f"{args.name}: written to {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("zoo", help="list or (re)train the project's small model zoo")
    p.add_argument("action", choices=["list", "train"])
    p.add_argument("name", nargs="?")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    p.add_argument("--out", help="where to write the checkpoint (default: runs/zoo/<checkpoint name> under the current "
                        "folder; the package's own checkpoints are replaced only when --out names them)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from the state saved beside --out (diffusion judges)")
    p.set_defaults(func=cmd_zoo)
