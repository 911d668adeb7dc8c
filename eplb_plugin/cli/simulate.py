"""``eplb simulate``: replay a trace through policies and dispatch modes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING

from ..fileio import atomic_write
from ..names import (
    DISPATCH_MODES,
    DSV2_LITE_EXPERT_BYTES,
    HARDWARE_PRESETS,
    MEMORY_WINDOWS,
    MODEL_PRESETS,
    PREDICTORS,
    ROUNDINGS,
    SHIFT_THRESHOLD,
    WATERFILL_ITERS,
    policy_names,
)
from .common import add_topology_options, format_table, topology_from_args
from .plan import check_out_folder

if TYPE_CHECKING:  # torch is imported by the command, not by its parser (`eplb simulate --help`)
    import torch

    from ..layout import Topology
    from ..simulate import CostSpec, ReplayResult, SimConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="replay a routing or load trace through policies and dispatch modes",
        description="Replay a trace: cut it into steps of --batch-tokens tokens (dealt "
        "round-robin to the GPUs' ranks), re-plan every --interval steps from the "
        "predictor, serve each step with the layout in service and the dispatch mode, and "
        "report the realized balancedness (mean over steps of the mean over layers of mean "
        "/ max GPU load), slots and bytes moved per rebalance, and plan time.",
    )
    p.add_argument(
        "--trace",
        help="routing trace (.npz with topk_ids [T, L, K]) or load trace ([steps, L, E] in "
        ".pt/.npy/.npz/.safetensors; each rank is then given an equal share of each step)",
    )
    add_topology_options(p)
    p.add_argument("--experts", type=int, help="logical experts E (default: largest id + 1)")
    p.add_argument("--batch-tokens", type=int, default=256, help="tokens per step (default 256)")
    p.add_argument("--interval", type=int, default=4, help="steps between re-plans (default 4)")
    p.add_argument("--window", type=int, default=4, help="past steps each plan sees (default 4)")
    p.add_argument("--predictor", choices=PREDICTORS, default="window", help="default window")
    p.add_argument("--ema-decay", type=float, default=0.8, help="ema weight per step (0.8)")
    p.add_argument(
        "--policy",
        default="default",
        help=f"policy, or a comma-separated list ({', '.join(policy_names())})",
    )
    p.add_argument(
        "--dispatch",
        default="global",
        help=f"dispatch mode, or a comma-separated list ({', '.join(DISPATCH_MODES)}); "
        "default global",
    )
    p.add_argument(
        "--phase",
        choices=("prefill", "decode"),
        help="deployment phase preset of the default policy: prefill = hierarchical "
        "placement (groups kept within nodes), decode = global placement",
    )
    p.add_argument(
        "--migrate",
        action="store_true",
        help="migration-aware planning: pass the layout in service to the policy (the "
        "default policy keeps slots where moving them does not pay; deepseek ignores it)",
    )
    p.add_argument(
        "--max-moved",
        type=float,
        default=0.25,
        help="with --migrate: largest fraction of slots one rebalance may move (0.25)",
    )
    p.add_argument(
        "--migration-cost",
        type=float,
        default=0.0,
        help="with --migrate: balancedness points a layer must gain per layer-full of "
        "slots it moves (0)",
    )
    p.add_argument(
        "--waterfill-iters",
        type=int,
        default=WATERFILL_ITERS,
        help=f"water-fill sweeps of local/global dispatch (default {WATERFILL_ITERS}, as the "
        "device op)",
    )
    p.add_argument(
        "--shift-threshold",
        type=float,
        default=SHIFT_THRESHOLD,
        help="re-plan at once when a run of steps departs from the plan's load this many "
        "times as far as a run of that load would, as the Balancer does (default "
        f"{SHIFT_THRESHOLD:g}; 0: only every --interval steps; the baseline never does)",
    )
    p.add_argument(
        "--memory-windows",
        type=int,
        default=MEMORY_WINDOWS,
        help="windows of load a plan sees: its own and earlier plans' back to the last "
        f"detected shift, as the Balancer does (default {MEMORY_WINDOWS}; 1: its own only, "
        "as the baseline)",
    )
    p.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default="fractional",
        help="fractional: each rank's tokens split in fractions (the dispatch model "
        "slot_loads, default); tokens: the whole tokens the device op gives each slot, rank "
        "by rank (token_loads; needs a routing trace)",
    )
    p.add_argument(
        "--bytes-per-slot",
        type=int,
        default=DSV2_LITE_EXPERT_BYTES,
        help=f"bytes of one expert's weights (default {DSV2_LITE_EXPERT_BYTES}: a "
        "DeepSeek-V2-Lite expert in bf16)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run the vLLM/SGLang baseline (deepseek, window sum, static uniform) and "
        "an oracle (deepseek on each step's own counts); report the share of the gap closed",
    )
    p.add_argument(
        "--hardware",
        default="h800-ib400-multinode",
        help=f"hardware preset of the step-time model ({', '.join(HARDWARE_PRESETS)}; default "
        "h800-ib400-multinode)",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"MoE shape preset of the step-time model ({', '.join(MODEL_PRESETS)}; default "
        "deepseek-v2-lite for a trace, deepseek-v3 for --recommend)",
    )
    p.add_argument(
        "--hw-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one hardware figure, e.g. fused_waterfill=0 (model the torch-ops "
        "water-fill instead of the fused kernel), waterfill_us=30 or hbm_gbps=3000 (repeatable)",
    )
    p.add_argument(
        "--recommend",
        action="store_true",
        help="no trace: model each dispatch mode for the deployment (--gpus EP ranks, --nodes, "
        "--replicas, --model, --hidden) over --tokens-per-gpu on a synthetic drifting load, "
        "print the fastest mode per batch size and where the answer changes",
    )
    p.add_argument(
        "--tokens-per-gpu",
        default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192",
        help="with --recommend: comma-separated tokens per GPU per step to evaluate",
    )
    p.add_argument("--hidden", type=int, help="with --recommend: model hidden size (override)")
    p.add_argument(
        "--layers", type=int, default=4, help="with --recommend: synthetic layers (default 4)"
    )
    p.add_argument("--plot", help="write a PNG of balancedness over steps here")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _split(value: str, name: str, allowed: list[str] | tuple[str, ...]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"--{name} is empty")
    for item in items:
        if item not in allowed:
            raise ValueError(f"--{name} {item!r} is not one of {', '.join(allowed)}")
    return items


def load_rank_counts(args: argparse.Namespace, topology: Topology) -> torch.Tensor:
    """[S, R, L, E] per-step, per-rank counts from a routing or a load trace."""
    from ..traces import is_routing_trace, read_load, read_routing_trace, steps_from_routing_trace

    if is_routing_trace(args.trace):
        trace = read_routing_trace(args.trace)
        return steps_from_routing_trace(
            trace.topk_ids, args.batch_tokens, topology.num_gpus, args.experts
        )
    if args.rounding == "tokens":
        raise ValueError(
            f"--rounding tokens needs a routing trace (per-token expert ids); {args.trace!r} "
            "is a load trace, which has no per-rank split of whole tokens"
        )
    load = read_load(args.trace)
    if load.dim() != 3:
        raise ValueError(
            f"--trace {args.trace!r}: a load trace must be [steps, layers, experts], got "
            f"shape {tuple(load.shape)}"
        )
    if args.experts is not None and load.shape[2] != args.experts:
        raise ValueError(f"--experts {args.experts} but the load trace has {load.shape[2]}")
    ranks = topology.num_gpus
    _check_cells(load.shape[0], ranks, load.shape[1], load.shape[2], "--trace")
    return (load / ranks).unsqueeze(1).expand(-1, ranks, -1, -1).contiguous()


def _check_cells(steps: int, ranks: int, layers: int, experts: int, option: str) -> None:
    """ValueError before a [steps, ranks, layers, experts] count array over the bound a
    routing trace is held to is allocated (a typo in --layers asked for 78 GB)."""
    from ..traces import MAX_COUNT_CELLS

    cells = steps * ranks * layers * experts
    if cells > MAX_COUNT_CELLS:
        raise ValueError(
            f"{option}: {steps} steps x {ranks} GPUs x {layers} layers x {experts} experts is "
            f"{cells} counts, more than {MAX_COUNT_CELLS}"
        )


def configs_from_args(args: argparse.Namespace) -> list[SimConfig]:
    from ..policies import available_policies
    from ..simulate import SimConfig

    policies = _split(args.policy, "policy", available_policies())
    modes = _split(args.dispatch, "dispatch", DISPATCH_MODES)
    configs = []
    for policy in policies:
        options: dict = {}
        if policy == "default":
            if args.phase:
                options["phase"] = args.phase
            if args.migrate:
                options.update(max_moved=args.max_moved, migration_cost=args.migration_cost)
        for mode in modes:
            configs.append(
                SimConfig(
                    policy=policy,
                    dispatch=mode,
                    interval=args.interval,
                    window=args.window,
                    predictor=args.predictor,
                    ema_decay=args.ema_decay,
                    migrate=args.migrate,
                    bytes_per_slot=args.bytes_per_slot,
                    policy_options=dict(options),
                    waterfill_iters=args.waterfill_iters,
                    rounding=args.rounding,
                    shift_threshold=args.shift_threshold,
                    memory_windows=args.memory_windows,
                )  # fmt: skip
            )
    return configs


# Tokens per GPU per step --recommend models: far above any batch (tens of thousands);
# beyond int64 the synthetic load cannot even be built.
MAX_TOKENS_PER_GPU = 1 << 24


def _positive_ints(value: str, name: str, most: int = MAX_TOKENS_PER_GPU) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} {value!r} must be comma-separated integers") from None
    if not items or any(not 1 <= v <= most for v in items):
        raise ValueError(f"--{name} {value!r} must list integers in [1, {most}]")
    return sorted(set(items))


def cost_from_args(args: argparse.Namespace, num_experts: int | None) -> CostSpec:
    """The step-time model's hardware, MoE shape and node count from the options."""
    from ..costmodel import get_hardware, get_model
    from ..simulate import CostSpec

    overrides: dict[str, float] = {}
    for item in args.hw_param:
        name, sep, value = item.partition("=")
        try:
            overrides[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--hw-param {item!r} must be NAME=NUMBER")
    hardware = get_hardware(args.hardware, **overrides)
    default = "deepseek-v3" if args.recommend else "deepseek-v2-lite"
    model = get_model(args.model or default)
    if num_experts is not None and num_experts != model.num_experts:
        model = dataclasses.replace(model, num_experts=num_experts)
    if getattr(args, "hidden", None) is not None:
        model = dataclasses.replace(model, hidden=args.hidden)
    return CostSpec(hardware, model, args.nodes)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..simulate import compare, num_scored_steps, replay

    # the replay runs many small tensor ops: extra intra-op threads only add overhead
    torch.set_num_threads(1)
    topology = topology_from_args(args)
    check_options(args)
    if args.recommend:
        return run_recommend(args, topology)
    if not args.trace:
        raise ValueError("--trace is required (or --recommend for a deployment without one)")
    configs = configs_from_args(args)
    rank_counts = load_rank_counts(args, topology)
    topology.check_experts(rank_counts.shape[-1])
    cost = cost_from_args(args, rank_counts.shape[-1])
    scored = num_scored_steps(rank_counts.shape[0], configs[0])
    if scored == 0:
        raise ValueError(
            f"the trace has {rank_counts.shape[0]} steps of {args.batch_tokens} tokens; "
            f"--window {args.window} leaves none to score"
        )
    runs = len(configs) + (2 if args.compare else 0)
    progress = _progress(scored * runs, disable=args.no_progress)
    try:
        if args.compare:
            outcome = compare(rank_counts, topology, configs, progress.update, cost)
            results = [outcome["baseline"], outcome["oracle"], *outcome["results"]]
            gaps = [0.0, 1.0, *outcome["gap_closed"]]
        else:
            results = [replay(rank_counts, topology, c, progress.update, cost) for c in configs]
            gaps = None
    finally:
        progress.close()
    summary = _summary(args, topology, rank_counts, results, gaps)
    summary["cost_model"] = _cost_dict(cost)
    if args.plot:
        write_plot(args.plot, results, summary["title"], args.interval)
        summary["plot"] = args.plot
    if args.json:
        summary["per_step"] = {r.label: r.balancedness.tolist() for r in results}
        summary["step_index"] = results[0].steps
        print(json.dumps(summary, indent=2))
        return 0
    _print(summary, args)
    return 0


def _progress(total: int, disable: bool):
    from tqdm import tqdm

    # disable=None: tqdm draws only on a terminal (a pipe or log file would get every redraw)
    return tqdm(
        total=total, desc="simulate", unit="step", disable=True if disable else None, leave=False
    )


def _summary(
    args: argparse.Namespace,
    topology: Topology,
    rank_counts: torch.Tensor,
    results: list[ReplayResult],
    gaps: list[float] | None,
) -> dict:
    from ..simulate import SimConfig, num_scored_steps

    steps, ranks, layers, experts = rank_counts.shape
    rows = []
    base_us = results[0].mean_layer_us if gaps is not None else math.nan
    for i, result in enumerate(results):
        row = result.summary()
        if gaps is not None:
            row["gap_closed"] = None if math.isnan(gaps[i]) else gaps[i]
            row["throughput_vs_baseline"] = base_us / result.mean_layer_us
        rows.append(row)
    title = (
        f"{os.path.basename(args.trace)}: {layers} layers x {experts} experts -> "
        f"{topology.num_replicas} slots on {topology.num_gpus} GPUs, B={args.batch_tokens}, "
        f"N={args.interval}, W={args.window}, {args.predictor}"
        + (f", plans see up to {args.memory_windows} windows since a shift (baseline: 1)"
           if args.predictor == "window" and args.memory_windows > 1 else "")
    )  # fmt: skip
    return {
        "title": title,
        "trace": args.trace,
        "topology": topology.to_dict(),
        "steps": steps,
        "scored_steps": num_scored_steps(steps, SimConfig(window=args.window)),
        "batch_tokens": args.batch_tokens,
        "interval": args.interval,
        "window": args.window,
        "memory_windows": args.memory_windows,
        "predictor": args.predictor,
        "bytes_per_slot": args.bytes_per_slot,
        "results": rows,
    }


def _print(summary: dict, args: argparse.Namespace) -> None:
    print(summary["title"])
    print(f"{summary['scored_steps']} of {summary['steps']} steps scored (the first window fills)")
    header = ["policy/dispatch", "balancedness"]
    compare_mode = "gap_closed" in summary["results"][0]
    if compare_mode:
        header.append("gap closed")
    header += ["layer us (model)"]
    if compare_mode:
        header.append("vs baseline")
    header += ["rebalances (on shift)", "slots moved/rebal", "% slots", "GB moved/rebal"]
    header += ["plan ms (median)"]
    rows = []
    for r in summary["results"]:
        row: list[object] = [r["label"], r["balancedness"]]
        if compare_mode:
            gap = r["gap_closed"]
            row.append("n/a" if gap is None else f"{100 * gap:.1f}%")
        oracle = r["label"].startswith("oracle")
        row.append(f"{r['layer_us']:.1f}")
        if compare_mode:
            row.append(f"{r['throughput_vs_baseline']:.3f}x")
        row += [
            "-" if oracle else f"{r['rebalances']} ({r['shift_rebalances']})",
            "-" if oracle else f"{r['slots_moved_per_rebalance']:.1f}",
            "-" if oracle else f"{100 * r['slots_moved_fraction']:.1f}",
            "-" if oracle else f"{r['bytes_moved_per_rebalance'] / 1e9:.2f}",
            f"{r['plan_ms_median']:.1f}",
        ]
        rows.append(row)
    print(format_table(header, rows))
    print(
        "slots moved: per rebalance after the first (the first replaces the starting layout); "
        f"bytes at {args.bytes_per_slot} per slot"
    )
    model = summary["cost_model"]
    print(
        f"layer us: modelled MoE-layer time per step (mean over layers and steps), hardware "
        f"{model['hardware']['name']}, model {model['model']['name']}; vs baseline: modelled "
        "throughput against the baseline (docs/policy.md, step-time model)"
    )
    if any(r["label"].endswith("/node") or "/node+" in r["label"] for r in summary["results"]):
        print(
            f"node: the split within each of --nodes {args.nodes} node(s) of "
            f"{-(-args.gpus // args.nodes)} GPUs (one node: the same as global)"
        )
    if args.plot:
        print(f"plot written to {args.plot}")


def _cost_dict(cost: CostSpec) -> dict:
    return {
        "hardware": dataclasses.asdict(cost.hardware),
        "model": dataclasses.asdict(cost.model),
        "nodes": cost.nodes,
    }


def run_recommend(args: argparse.Namespace, topology: Topology) -> int:
    """``--recommend``: the fastest dispatch mode per batch size for one deployment."""
    from ..costmodel import waterfill_impl, waterfill_us
    from ..simulate import CostSpec, SimConfig, crossovers, recommend

    grid = _positive_ints(args.tokens_per_gpu, "tokens-per-gpu")
    if isinstance(args.layers, bool) or args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    cost = cost_from_args(args, args.experts)
    topology.check_experts(cost.model.num_experts)
    config = SimConfig(
        interval=args.interval, window=args.window, waterfill_iters=args.waterfill_iters,
        shift_threshold=args.shift_threshold, memory_windows=args.memory_windows,
    )  # fmt: skip
    steps = config.window + 2 * config.interval
    _check_cells(steps, topology.num_gpus, args.layers, cost.model.num_experts, "--layers")
    progress = _progress(len(grid) * 4 * (steps - config.window), disable=args.no_progress)
    try:
        rows = recommend(
            cost, topology, grid, num_layers=args.layers, steps=steps, config=config,
            progress=progress.update,
        )  # fmt: skip
    finally:
        progress.close()
    changes = crossovers(rows)
    hw, iters = cost.hardware, args.waterfill_iters
    wf, impl = waterfill_us(hw, iters), waterfill_impl(hw)
    # the same rows with the other water-fill implementation (an additive per-layer term)
    other = dataclasses.replace(hw, fused_waterfill=1 - hw.fused_waterfill, waterfill_us=-1.0)
    alt_rows = _rows_with_cost(rows, CostSpec(other, cost.model, cost.nodes), cost, topology,
                               iters)  # fmt: skip
    alt = {"waterfill": waterfill_impl(other), "waterfill_us": waterfill_us(other, iters),
           "rows": alt_rows, "crossovers": [list(c) for c in crossovers(alt_rows)]}  # fmt: skip
    if args.json:
        out = {"cost_model": _cost_dict(cost), "topology": topology.to_dict(), "rows": rows}
        out["crossovers"] = [list(c) for c in changes]
        out["waterfill_us"] = wf
        out["waterfill"] = impl
        out["other_waterfill"] = alt
        print(json.dumps(out, indent=2))
        return 0
    m = cost.model
    source = "measured" if hw.waterfill_us >= 0 else "estimate"
    print(
        f"{m.name} (hidden {m.hidden}, {m.num_experts} experts, top-{m.top_k}) on "
        f"{topology.num_gpus} GPUs / {topology.num_nodes} nodes, {topology.num_replicas} slots; "
        f"hardware {cost.hardware.name}; water-fill {wf:.1f} us per layer ({_WF_NAMES[impl]}, "
        f"{source})"
    )
    header = [
        "tokens/GPU", "baseline us", "static us", "local us", "node us", "global us", "best",
        "speedup",
    ]  # fmt: skip
    print(format_table(header, [_row_cells(r) for r in rows]))
    print(
        "modelled MoE-layer time per step (mean over layers and steps) on a synthetic drifting "
        "load; speedup: the best mode's throughput against the baseline (deepseek, static)"
    )
    _print_answer(rows, changes)
    print(
        f"\nwith the {_WF_NAMES[alt['waterfill']]} instead: water-fill "
        f"{alt['waterfill_us']:.1f} us per layer (estimate, not measured on a GPU)"
    )
    print(format_table(header, [_row_cells(r) for r in alt_rows]))
    _print_answer(alt_rows, crossovers(alt_rows))
    return 0


_WF_NAMES = {"torch": "torch-ops water-fill", "fused": "fused Triton water-fill kernel"}


def _row_cells(r: dict) -> list:
    return [
        r["tokens_per_gpu"], f"{r['baseline_us']:.1f}", f"{r['static_us']:.1f}",
        f"{r['local_us']:.1f}", f"{r['node_us']:.1f}", f"{r['global_us']:.1f}", r["best"],
        f"{r['speedup']:.3f}x",
    ]  # fmt: skip


def _print_answer(rows: list[dict], changes: list) -> None:
    if not changes:
        print(f"recommended dispatch: {rows[0]['best']} at every batch size evaluated")
    for below, above, best_below, best_above in changes:
        print(
            f"the answer changes between {below} and {above} tokens per GPU: "
            f"{best_below} below, {best_above} above"
        )


def _rows_with_cost(
    rows: list[dict], new: CostSpec, old: CostSpec, topology: Topology, iters: int
) -> list[dict]:
    """``recommend`` rows re-timed under ``new`` hardware that differs from ``old`` only in
    the modes' own per-layer cost (``mode_overhead_us``, added to every layer of every
    step, so the mean shifts by the difference); best mode and speedup recomputed."""
    from ..costmodel import mode_overhead_us
    from ..simulate import RECOMMEND_MODES

    ranks, nodes = topology.num_gpus, old.nodes
    out = []
    for row in rows:
        r = dict(row)
        for mode in RECOMMEND_MODES:
            shift = mode_overhead_us(new.hardware, new.model, mode, ranks, nodes, iters)
            shift -= mode_overhead_us(old.hardware, old.model, mode, ranks, nodes, iters)
            r[f"{mode}_us"] = row[f"{mode}_us"] + shift
        r["best"] = min(RECOMMEND_MODES, key=lambda m: r[f"{m}_us"])
        r["speedup"] = r["baseline_us"] / r[f"{r['best']}_us"]
        out.append(r)
    return out


def check_options(args: argparse.Namespace) -> None:
    """Refuse values the replay would take without complaint but cannot honour (checked
    before the trace is read: a replay of minutes is not lost to them)."""
    from ..config import MAX_WATERFILL_ITERS

    if args.waterfill_iters > MAX_WATERFILL_ITERS:
        # the device op's bound (EplbConfig); 10**8 sweeps would run for hours
        raise ValueError(
            f"--waterfill-iters {args.waterfill_iters} must be <= {MAX_WATERFILL_ITERS}"
        )
    if not math.isfinite(args.migration_cost):
        raise ValueError(f"--migration-cost {args.migration_cost} must be a finite number")
    if args.experts is not None and args.experts < 1:
        raise ValueError(f"--experts {args.experts} must be >= 1")
    if args.plot is not None:
        check_out_folder(args.plot, "--plot", (args.trace,))
        if not args.plot.lower().endswith(".png"):
            raise ValueError(f"--plot {args.plot!r} must end with .png")


def _same_curve(a: ReplayResult, b: ReplayResult) -> bool:
    """Both results scored the same steps with the same balancedness."""
    return list(a.steps) == list(b.steps) and bool(a.balancedness.equal(b.balancedness))


def write_plot(path: str, results: list[ReplayResult], title: str, interval: int = 1) -> None:
    """Balancedness over steps, one line per result, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    styles = {"baseline": ("#888888", "--"), "oracle": ("#222222", ":")}
    baseline = next((r for r in results if r.label.startswith("baseline")), None)
    for result in results:
        key = next((k for k in styles if result.label.startswith(k)), None)
        color, line = styles.get(key, (None, "-"))
        label, width = f"{result.label}  (mean {result.mean:.3f})", 1.6
        if baseline is not None and result is not baseline and _same_curve(result, baseline):
            # a run equal to the baseline (static dispatch of the same plans) is drawn wide
            # and pale under the dashed baseline, so that both stay visible
            label, width = f"{label}, identical to baseline", 4.0
        ax.plot(
            result.steps, result.balancedness.numpy(), line, color=color, linewidth=width,
            alpha=0.45 if width > 1.6 else 1.0, label=label, zorder=3 if key == "baseline" else 2,
        )  # fmt: skip
    shifted = sorted({step for result in results for step in result.shift_steps})
    if results:
        # regular re-plans every `interval` steps from the first scored step (a plan on a
        # shift restarts that count, so the grey lines are where a fixed cadence re-plans)
        steps = results[0].steps
        for step in steps[:: max(interval, 1)]:
            ax.axvline(step, color="#cccccc", linewidth=0.6, zorder=0)
    for step in shifted:
        ax.axvline(step, color="#b03030", linewidth=1.0, linestyle="--", zorder=1)
    xlabel = "step (grey lines: re-plans every --interval steps"
    xlabel += "; red dashed: re-plans on a load shift)" if shifted else ")"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("balancedness (mean / max GPU load)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(top=1.0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
