"""``eplb export``: write a checkpoint re-arranged into a balanced per-rank layout."""

from __future__ import annotations

import argparse
import signal
from typing import TYPE_CHECKING

from ..names import COPY_MODES, policy_names
from .common import add_topology_options, topology_from_args

if TYPE_CHECKING:  # torch is imported by the command, not by its parser (`eplb export --help`)
    from ..layout import ExpertLayout

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
          "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'4GB', '512M', '1048576' -> bytes (binary units)."""
    raw = text.strip().upper()
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read size {text!r} (use e.g. 4GB, 512MB, 1048576)") from None
    # nan and inf parse as floats; int() of them would raise a bare ValueError/OverflowError
    if unit not in _UNITS or not 0 < value * _UNITS[unit] < float("inf"):
        raise ValueError(f"cannot read size {text!r} (use e.g. 4GB, 512MB, 1048576)")
    return int(value * _UNITS[unit])


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint re-arranged into per-rank expert shards",
        description="Read a Hugging Face safetensors checkpoint and write, for each EP rank, "
        "the tensors of its physical slots (replicas duplicated), the other tensors once, "
        "the layout (eplb and SGLang forms) and an index. The output folder appears "
        "atomically; an interrupted export leaves nothing behind and can be re-run.",
    )
    p.add_argument("--checkpoint", required=True, help="source checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--layout",
        help="layout file: eplb .safetensors or SGLang .pt/.json (physical_to_logical_map)",
    )
    src.add_argument("--load", help="load file to plan a layout from (any `eplb plan` input)")
    add_topology_options(p, replicas_required=False)
    p.add_argument("--policy", default="default", help=f"one of {', '.join(policy_names())}")
    p.add_argument("--ep-size", type=int, help="EP ranks (default: the layout's GPU count)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--max-shard-size", default="4GB", help="largest output file (default 4GB)")
    p.add_argument("--copy", choices=COPY_MODES, default="auto", help="copy method (default auto)")
    p.add_argument("--max-rate", help="throttle to this many bytes/s, e.g. 500MB")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync (faster, not crash-safe)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def layout_from_args(args: argparse.Namespace) -> ExpertLayout:
    from ..formats import read_layout
    from ..policies import plan
    from ..traces import read_load

    if args.layout:
        return read_layout(args.layout, ep_size=args.ep_size or args.gpus)
    if args.replicas is None or args.gpus is None:
        raise ValueError("--load needs --replicas and --gpus to plan a layout")
    return plan(read_load(args.load), topology_from_args(args), policy=args.policy)


def run(args: argparse.Namespace) -> int:
    from ..export import ExportConfig, export_checkpoint

    config = ExportConfig(
        ep_size=args.ep_size,
        max_shard_bytes=parse_size(args.max_shard_size),
        copy_mode=args.copy,
        max_bytes_per_s=parse_size(args.max_rate) if args.max_rate else None,
        fsync=not args.no_fsync,
        progress=False if args.no_progress else None,
    )
    layout = layout_from_args(args)
    # SIGTERM unwinds like Ctrl-C so the temporary folder is removed
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        summary = export_checkpoint(args.checkpoint, layout, args.out, config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(
        f"exported {summary.tensors} tensors in {summary.files} files, "
        f"{summary.nbytes / 2**20:.1f} MiB in {summary.seconds:.2f} s "
        f"({summary.bytes_per_s / 2**20:.1f} MiB/s) to {summary.out}"
    )
    return 0


def _raise_exit(signum, frame):  # noqa: ARG001
    raise SystemExit(128 + signum)
