"""Options and printing shared by several subcommands."""

from __future__ import annotations

import argparse

from ..layout import Topology


def add_topology_options(parser: argparse.ArgumentParser, replicas_required: bool = True) -> None:
    parser.add_argument(
        "--replicas", type=int, required=replicas_required, help="physical slots P (>= experts)"
    )
    parser.add_argument("--groups", type=int, default=1, help="expert groups (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus", type=int, required=replicas_required, help="GPUs (EP ranks)")


def topology_from_args(args: argparse.Namespace) -> Topology:
    return Topology(args.replicas, args.groups, args.nodes, args.gpus)


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """Plain fixed-width table; floats printed with 4 decimals."""

    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [header] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
