"""Replay benchmark: share of the baseline-to-oracle gap each policy and dispatch mode closes.

For each trace and topology (E=64 experts, P=80 slots on 16 GPUs and P=96 on 32 GPUs by
default), the trace is cut into steps of B tokens dealt round-robin to the ranks, re-planned
every N steps from a window of W steps, and each step scored by its realized balancedness.
Rows: the vLLM/SGLang baseline (DeepSeek, window sum, static uniform split), the oracle
(DeepSeek on each step's own counts), then the configurations below. ``gap`` is
``(b - baseline) / (oracle - baseline)``.

    python benchmarks/bench_simulate.py                       # examples/traces, B=256, N=W=4
    python benchmarks/bench_simulate.py --traces ../shared/data/*.npz --synthetic
    python benchmarks/bench_simulate.py --json > replay.json

Each gap comes with a 95% interval: a moving-block bootstrap (blocks of one plan interval)
of the per-step difference against the baseline, so a figure whose interval spans 0 is not
told apart from the baseline on that trace.

Every step is also timed by the step-time model (``eplb_plugin.costmodel``; ``--hardware``
preset, DeepSeek-V2-Lite's expert shape, the traces' model): ``speedup`` is the modelled
MoE-layer throughput against the baseline.

``--synthetic`` adds four synthetic routing traces whose expert popularity shifts between
sequences (``eplb_plugin.traces.synthetic_routing_trace``): a check that the figures are not
an artefact of the two real traces.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

import torch
from tqdm import tqdm

from eplb_plugin import Topology
from eplb_plugin.costmodel import HARDWARE, get_hardware, get_model
from eplb_plugin.names import MEMORY_WINDOWS, SHIFT_THRESHOLD
from eplb_plugin.simulate import CostSpec, SimConfig, compare
from eplb_plugin.traces import read_routing_trace, steps_from_routing_trace, synthetic_routing_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (label, SimConfig keyword arguments)
CONFIGS = [
    ("deepseek/global", {"policy": "deepseek", "dispatch": "global"}),
    ("default/static", {"policy": "default", "dispatch": "static"}),
    (
        "default/static, migrate <= 25%",
        {
            "policy": "default",
            "dispatch": "static",
            "migrate": True,
            "policy_options": {"max_moved": 0.25},
        },
    ),  # fmt: skip
    ("default/local", {"policy": "default", "dispatch": "local"}),
    ("default/node", {"policy": "default", "dispatch": "node"}),
    ("default/global", {"policy": "default", "dispatch": "global"}),
    (
        "default/global, migrate <= 25%",
        {
            "policy": "default",
            "dispatch": "global",
            "migrate": True,
            "policy_options": {"max_moved": 0.25},
        },
    ),  # fmt: skip
    (
        "default/global, ema predictor",
        {"policy": "default", "dispatch": "global", "predictor": "ema"},
    ),  # fmt: skip
]
# name: (tokens, seq_tokens, skew, shift, seed)
SYNTHETIC = {
    "synthetic A (short seqs)": (8192, 256, 0.5, 0.4, 0),
    "synthetic B (long seqs)": (8192, 1024, 0.5, 0.4, 1),
    "synthetic C (skewed)": (8192, 512, 0.8, 0.6, 2),
    "synthetic D (big shifts)": (8192, 2048, 0.3, 0.8, 3),
}


def traces(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    out = {}
    for path in args.traces:
        out[os.path.basename(path)] = read_routing_trace(path).topk_ids
    if args.synthetic:
        for name, (tokens, seq, skew, shift, seed) in SYNTHETIC.items():
            trace = synthetic_routing_trace(
                tokens, 26, 64, 6, seq_tokens=seq, skew=skew, shift=shift, seed=seed
            )
            out[name] = trace.topk_ids
    return out


def paired_ci(diff: torch.Tensor, block: int, reps: int = 2000, seed: int = 0) -> tuple:
    """95% interval of the mean of ``diff`` [steps] float64 (a configuration's per-step
    balancedness minus the baseline's) by a moving-block bootstrap: blocks of ``block``
    consecutive steps (one plan interval) are resampled, since steps served by the same
    plan are correlated. Returns (low, high)."""
    n = diff.numel()
    if n == 0:
        return (float("nan"), float("nan"))
    block = max(1, min(block, n))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - block + 1, (reps, -(-n // block)), generator=gen)
    index = (starts.unsqueeze(-1) + torch.arange(block)).flatten(1)[:, :n]
    means = diff[index].mean(-1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype))
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_traces = sorted(glob.glob(os.path.join(ROOT, "examples", "traces", "*.npz")))
    parser.add_argument("--traces", nargs="*", default=default_traces)
    parser.add_argument("--synthetic", action="store_true", help="add 4 synthetic traces")
    parser.add_argument("--topologies", nargs="*", default=["80:16", "96:32"], help="P:G")
    parser.add_argument(
        "--gpus-per-node", type=int,
        help="GPUs per node (the nodes of node dispatch, and the all-reduces' network hops; "
        "default: the --hardware preset's, 8)",
    )  # fmt: skip
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--hardware", default="h800-ib400-multinode", choices=list(HARDWARE))
    parser.add_argument(
        "--waterfill-us", type=float, default=-1.0,
        help="device time of one water-fill per layer (default: the fused kernel's estimate)",
    )  # fmt: skip
    parser.add_argument(
        "--configs", nargs="+", metavar="LABEL", help="a subset of the configurations, by label"
    )
    parser.add_argument(
        "--rounding", choices=["fractional", "tokens"], default="fractional",
        help="count each slot's tokens as the dispatch model splits them (fractional) or as "
        "the device op rounds them per rank (tokens); baseline and oracle alike",
    )  # fmt: skip
    parser.add_argument(
        "--shift-threshold", type=float, default=SHIFT_THRESHOLD,
        help="re-plan on a detected load shift (eplb_plugin.shift; 0: every N steps only; the "
        "baseline never does)",
    )  # fmt: skip
    parser.add_argument(
        "--memory-windows", type=int, default=MEMORY_WINDOWS,
        help="windows a plan sees: its own and earlier plans' back to the last detected shift "
        "(eplb_plugin.plan_memory; 1: its own only; the baseline always 1)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.gpus_per_node is None:
        args.gpus_per_node = HARDWARE[args.hardware].gpus_per_node
    if args.gpus_per_node < 1:
        parser.error(f"--gpus-per-node must be at least 1, got {args.gpus_per_node}")
    configs = CONFIGS
    if args.configs:
        unknown = sorted(set(args.configs) - {label for label, _ in CONFIGS})
        if unknown:
            labels = "; ".join(label for label, _ in CONFIGS)
            parser.error(f"unknown configuration(s) {unknown}; known: {labels}")
        configs = [c for c in CONFIGS if c[0] in args.configs]
    hardware = get_hardware(args.hardware, waterfill_us=args.waterfill_us)
    torch.set_num_threads(1)

    cases = []
    for name, ids in traces(args).items():
        for spec in args.topologies:
            slots, gpus = (int(x) for x in spec.split(":"))
            nodes = -(-gpus // args.gpus_per_node)
            cases.append((name, Topology(slots, 1, nodes, gpus), ids))
    rows = []
    for name, topology, ids in tqdm(cases, desc="replays", disable=args.json):
        counts = steps_from_routing_trace(ids, args.batch_tokens, topology.num_gpus)
        sims = [
            SimConfig(
                interval=args.interval,
                window=args.window,
                rounding=args.rounding,
                shift_threshold=args.shift_threshold,
                memory_windows=args.memory_windows,
                **kw,
            )
            for _, kw in configs
        ]
        model = get_model("deepseek-v2-lite")
        cost = CostSpec(hardware, model, nodes=topology.num_nodes)
        out = compare(counts, topology, sims, cost=cost)
        case = f"{name}, P={topology.num_replicas}/{topology.num_gpus} GPUs"
        results = [out["baseline"], out["oracle"], *out["results"]]
        labels = ["baseline", "oracle"] + [label for label, _ in configs]
        gaps = [0.0, 1.0, *out["gap_closed"]]
        base_us = out["baseline"].mean_layer_us
        span = out["oracle"].mean - out["baseline"].mean
        for label, result, gap in zip(labels, results, gaps):
            s = result.summary()
            speedup = base_us / result.mean_layer_us
            diff = result.balancedness.double() - out["baseline"].balancedness.double()
            low, high = paired_ci(diff, args.interval)
            ci = [low / span, high / span] if span > 1e-12 else [float("nan")] * 2
            rows.append({"case": case, "config": label, "gap": gap, "gap_ci95": ci,
                         "speedup": speedup, **s})  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"B={args.batch_tokens}, N={args.interval}, W={args.window}, shift threshold "
        f"{args.shift_threshold:g}; balancedness (gap closed); moved = slots moved per "
        "rebalance / all slots; rebalances (of them on a shift)"
    )
    print(
        f"step-time model: {hardware.name}, deepseek-v2-lite experts, "
        f"{args.gpus_per_node} GPUs per node"
    )
    print(
        "case | config | balancedness | gap closed (95% interval) | moved | rebalances | "
        "layer us | speedup | plan ms"
    )
    for r in rows:
        moved = "-" if r["config"] == "oracle" else f"{100 * r['slots_moved_fraction']:.0f}%"
        low, high = r["gap_ci95"]
        print(
            f"{r['case']} | {r['config']} | {r['balancedness']:.4f} | {100 * r['gap']:.0f}% "
            f"({100 * low:.0f}..{100 * high:.0f}%) | {moved} | {r['rebalances']} "
            f"({r['shift_rebalances']}) | {r['layer_us']:.1f} | "
            f"{r['speedup']:.3f}x | {r['plan_ms_median']:.1f}"
        )
    print("\nmean share of the gap closed over all cases:")
    for label, _ in configs:
        gaps = [r["gap"] for r in rows if r["config"] == label]
        print(f"  {label}: {100 * statistics.mean(gaps):.0f}% (min {100 * min(gaps):.0f}%)")


if __name__ == "__main__":
    main()
