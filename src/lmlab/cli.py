"""`lmlab` console commands."""

from __future__ import annotations

import argparse
import sys

from lmlab.errors import LmlabError


def _export(args: argparse.Namespace) -> None:
    from lmlab.export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmlab", description="lmlab command-line tools")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="merge a run's adapters into its backbone and write it out")
    export.add_argument("checkpoint", help="an lmlab checkpoint, e.g. outputs/runs/<run>/checkpoints/last.ckpt")
    export.add_argument("out", help="output directory (model.ckpt, config.json, tokenizer/)")
    export.set_defaults(func=_export)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LmlabError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
