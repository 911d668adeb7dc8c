"""``eplb`` entry point: dispatches to one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` which registers its parser and
sets ``func(args) -> int``. A ValueError raised by a subcommand is bad input: it is
printed as ``eplb <cmd>: error: ...`` with exit code 2 and nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `eplb --help` lists them.
SUBCOMMANDS = ("plan", "simulate", "export", "verify", "convert", "demo", "vllm", "sglang")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eplb", description="Expert-parallel load balancing for MoE serving."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"eplb_plugin.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"eplb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
