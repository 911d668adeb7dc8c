"""``eplb plan``: a layout from a load file, with a before/after summary."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING

from ..names import policy_names
from .common import add_topology_options, format_table, topology_from_args

if TYPE_CHECKING:  # torch is imported by the command, not by its parser (`eplb plan --help`)
    import torch

    from ..layout import ExpertLayout


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="plan a layout from a load file",
        description="Plan an expert layout from a [L, E] or [steps, L, E] load file "
        "(.pt, .npy, .npz, .safetensors) and print balancedness before and after.",
    )
    p.add_argument("--load", required=True, help="load file")
    add_topology_options(p)
    p.add_argument("--policy", default="default", help=f"one of {', '.join(policy_names())}")
    p.add_argument("--out", help="write the layout here (.safetensors)")
    p.add_argument("--layers", type=int, default=8, help="layers shown in the table (default 8)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..layout import ExpertLayout
    from ..policies import plan
    from ..traces import read_load

    if args.layers < 0:
        raise ValueError(f"--layers {args.layers}: give the number of layers to show (>= 0)")
    topology = topology_from_args(args)
    load = read_load(args.load)
    if args.out is not None:
        check_out_folder(args.out, "--out", (args.load,))
        if not args.out.endswith(".safetensors"):
            raise ValueError(f"--out {args.out!r} must end with .safetensors")
    start = time.perf_counter()
    layout = plan(load, topology, policy=args.policy)
    plan_ms = (time.perf_counter() - start) * 1e3
    weight = load.sum(0) if load.dim() == 3 else load
    before = ExpertLayout.identity(layout.num_layers, layout.num_experts, topology)
    summary = summarize(before, layout, weight)
    summary.update(policy=args.policy, plan_ms=plan_ms, topology=topology.to_dict())
    if args.out:
        layout.save(args.out, {"policy": args.policy})
        summary["out"] = args.out
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{plural(layout.num_layers, 'layer')} x {plural(layout.num_experts, 'expert')} -> "
        f"{plural(topology.num_replicas, 'slot')} on {plural(topology.num_gpus, 'GPU')} / "
        f"{plural(topology.num_nodes, 'node')} ({plural(topology.num_groups, 'group')}), "
        f"policy {args.policy!r}, planned in {plan_ms:.1f} ms"
    )
    rows = [
        [r["layer"], r["before"], r["after"], r["max_over_mean_after"], r["replicated_experts"]]
        for r in summary["layers"][: args.layers]
    ]
    print(format_table(["layer", "balanced before", "after", "max/mean GPU", "replicated"], rows))
    if layout.num_layers > args.layers:
        more = plural(layout.num_layers - args.layers, "more layer")
        print(f"... {more} (--layers N to show them)")
    gpu_rows = [
        [g, b, a] for g, (b, a) in enumerate(zip(summary["gpu_before"], summary["gpu_after"]))
    ]
    print("\nload per GPU, all layers (share of the mean):")
    print(format_table(["gpu", "before", "after"], gpu_rows))
    print(
        f"\nbalancedness (mean GPU load / max, mean over layers): "
        f"{summary['balancedness_before']:.4f} -> {summary['balancedness_after']:.4f}"
    )
    if args.out:
        print(f"layout written to {args.out}")
    return 0


def plural(count: int, noun: str) -> str:
    """``1 node``, ``2 nodes``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def check_out_folder(path: str, option: str, inputs: tuple[str | None, ...] = ()) -> None:
    """ValueError unless the folder ``path`` is to be written in exists (checked before any
    work, so that a long plan is not lost to a typo in the folder), ``path`` is not a
    directory, and it is none of the command's ``inputs`` (the write would replace it)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not path:
        raise ValueError(f"{option} is empty; give a file name")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path!r}: folder {folder!r} does not exist")
    for source in inputs:
        if source and os.path.isfile(path) and os.path.exists(source):
            if os.path.samefile(path, source):
                raise ValueError(
                    f"{option} {path!r} is the input {source!r}: writing it would replace "
                    "the input; give another file name"
                )


def summarize(before: ExpertLayout, after: ExpertLayout, weight: torch.Tensor) -> dict:
    """Per-layer and per-GPU figures of two layouts on one [L, E] load."""
    from ..layout import balancedness_of

    gb, ga = before.gpu_loads(weight), after.gpu_loads(weight)
    layers = []
    for layer in range(after.num_layers):
        mean = ga[layer].mean().item()
        layers.append(
            {
                "layer": layer,
                "before": balancedness_of(gb[layer]),
                "after": balancedness_of(ga[layer]),
                "max_over_mean_after": ga[layer].max().item() / mean if mean > 0 else 1.0,
                "replicated_experts": int((after.logcnt[layer] > 1).sum()),
            }
        )
    total_b, total_a = gb.sum(0), ga.sum(0)
    mean_b, mean_a = total_b.mean().clamp(min=1e-12), total_a.mean().clamp(min=1e-12)
    return {
        "balancedness_before": balancedness_of(gb),
        "balancedness_after": balancedness_of(ga),
        "layers": layers,
        "gpu_before": (total_b / mean_b).tolist(),
        "gpu_after": (total_a / mean_a).tolist(),
    }
