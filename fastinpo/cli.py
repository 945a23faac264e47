"""The ``fastinpo`` command line.

Subcommands so far: ``env`` (what runs here) and ``quickstart`` (one DDIM-InPO and one Inversion-DPO loss on a
tiny SDXL-shaped UNet, end to end). ``train``, ``sample``, ``eval``, ``bench`` and ``demo`` arrive with their
issues.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    from fastinpo.env import format_report, report

    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from fastinpo.quickstart import run

    run(pairs=args.pairs, seed=args.seed, backend=args.backend)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastinpo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("env", help="print versions, devices and which backends can run here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("quickstart", help="InPO inversion + DPO losses + backward on a tiny SDXL-shaped UNet")
    p.add_argument("--pairs", type=int, default=3, help="preference pairs in the batch (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--backend", default=None, help="backend of the loss and the inversion step (default: automatic)")
    p.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fastinpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
