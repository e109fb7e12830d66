"""The `sparseflow` command line: info, demo (more subcommands register in COMMANDS)."""

from __future__ import annotations

import argparse
import json
import sys

from . import demo as demo_mod
from .info import info


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def cmd_info(args) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        width = max(map(len, data))
        for key, value in data.items():
            print(f"{key:<{width}}  {', '.join(value) if isinstance(value, list) else value}")
    return 0


def cmd_demo(args) -> int:
    report = demo_mod.run(out_dir=args.out, quick=args.quick, show=not args.json)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseflow", description="Compiled-kernel sparse runtime for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, ISA levels, threads, CUDA and Triton availability")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="compress pruned layers, check them against dense and time them")
    p.add_argument("--out", default="sparseflow-demo", help="directory for the JSON report (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smaller shapes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ValueError, TypeError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"sparseflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
