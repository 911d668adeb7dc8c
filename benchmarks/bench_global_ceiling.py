"""What limits ``global`` dispatch on a replay: the split, the placement, or the forecast?

For each trace and topology the replay of ``default/global`` (migration-aware, ``--max-moved``)
is re-run step by step, keeping the layout in service, and every scored step is scored five
ways (gap closed between the vLLM/SGLang baseline and the per-step oracle, as in
``eplb simulate --compare``):

- ``measured``: the layout in service with the device op's water-fill (``--iters`` sweeps):
  what ``eplb simulate`` reports;
- ``exact split``: the same layout with the water-fill run to convergence (``--exact-iters``
  sweeps; 128 sweeps equal the linear program's min-max split to 4 decimals on these
  traces): the best any dispatch rule can do with that placement;
- ``whole trace``: one plan on the whole trace's load (hindsight: the best stationary
  forecast there is), kept for every step, exact split;
- ``one step ahead``: a from-scratch ``default/global`` plan whose window also holds the
  interval's first step (the newest W steps up to it), exact split, scored on the interval's
  later steps: a forecast one step fresher than any engine has;
- ``own interval``: a plan made on the interval's own steps (perfect knowledge of the
  interval's load, in-sample), exact split;
- ``own step``: a plan made on each step's own counts, exact split (the ceiling of
  placement plus global split).

The last four are references, not policies. Scores are over the steps after each interval's
first (the step the ``one step ahead`` plan has seen), for every column alike.

    python benchmarks/bench_global_ceiling.py                   # examples/traces, 80:16, 96:32
    python benchmarks/bench_global_ceiling.py --synthetic
    python benchmarks/bench_global_ceiling.py --options '{"prior": 1.0}'
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

import torch

from eplb_plugin import Topology, plan
from eplb_plugin.dispatch import dispatch_shares, gpu_loads_of
from eplb_plugin.layout import ExpertLayout
from eplb_plugin.simulate import SimConfig, compare, step_balancedness
from eplb_plugin.traces import steps_from_routing_trace

ROOT = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("measured", "exact split", "whole trace", "one step ahead", "own interval", "own step")


def global_balancedness(layout: ExpertLayout, totals: torch.Tensor, iters: int) -> torch.Tensor:
    """[K] balancedness of ``totals`` [K, L, E] (all-rank counts of K steps) under global
    dispatch with ``iters`` water-fill sweeps."""
    shares = dispatch_shares(layout, totals, iters).double()  # [K, L, P]
    index = layout.phy2log.unsqueeze(0).expand(totals.shape[0], -1, -1)
    loads = totals.double().gather(2, index) * shares
    return step_balancedness(gpu_loads_of(layout, loads))


def plan_global(
    load: torch.Tensor, topology: Topology, options: dict, previous: ExpertLayout | None = None
) -> ExpertLayout:
    """The default policy's plan for global dispatch on ``load`` ([S, L, E] or [L, E])."""
    return plan(load, topology, "default", previous=previous, dispatch="global", **options)


def own_step(totals: torch.Tensor, topology: Topology, options: dict, iters: int) -> torch.Tensor:
    """[K] balancedness of each step of ``totals`` [K, L, E] under a plan made on its own counts."""
    scores = [
        global_balancedness(plan_global(x, topology, options), x[None], iters)[0] for x in totals
    ]
    return torch.stack(scores)


def ceiling(
    counts: torch.Tensor, topology: Topology, args: argparse.Namespace, options: dict
) -> dict[str, list[float]]:
    """Per scored step (after each interval's first), the balancedness of each column."""
    totals = counts.sum(1)  # [S, L, E]
    window, interval = args.window, args.interval
    served = {**options, "max_moved": args.max_moved}
    out: dict[str, list[float]] = {name: [] for name in COLUMNS}
    out["step"] = []
    whole = plan_global(totals.sum(0), topology, options)
    layout = None
    for start in range(window, totals.shape[0], interval):
        layout = plan_global(totals[start - window : start], topology, served, previous=layout)
        later = totals[start + 1 : start + interval]
        if later.shape[0] == 0:
            continue
        ahead = plan_global(totals[start + 1 - window : start + 1], topology, options)
        own = plan_global(totals[start : start + interval], topology, options)
        columns = {
            "measured": global_balancedness(layout, later, args.iters),
            "exact split": global_balancedness(layout, later, args.exact_iters),
            "whole trace": global_balancedness(whole, later, args.exact_iters),
            "one step ahead": global_balancedness(ahead, later, args.exact_iters),
            "own interval": global_balancedness(own, later, args.exact_iters),
            "own step": own_step(later, topology, options, args.exact_iters),
        }
        for name, values in columns.items():
            out[name] += values.tolist()
        out["step"] += list(range(start + 1, start + 1 + later.shape[0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_traces = sorted(glob.glob(os.path.join(ROOT, "..", "examples", "traces", "*.npz")))
    parser.add_argument("--traces", nargs="*", default=default_traces)
    parser.add_argument("--synthetic", action="store_true", help="add 4 synthetic traces")
    parser.add_argument("--topologies", nargs="*", default=["80:16", "96:32"], help="P:G")
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--max-moved", type=float, default=0.25)
    parser.add_argument("--iters", type=int, default=8, help="sweeps of the device op")
    parser.add_argument("--exact-iters", type=int, default=128, help="sweeps to convergence")
    parser.add_argument("--options", default="{}", help="default-policy options, JSON")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.interval < 2:
        parser.error("--interval must be >= 2 (the first step of each interval is not scored)")
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        parser.error(f"--options is not JSON: {exc}")
    if not isinstance(options, dict):
        parser.error("--options must be a JSON object")
    torch.set_num_threads(1)

    rows = []
    # the same traces (and four synthetic ones) as bench_simulate.py, run from this folder
    from bench_simulate import traces

    for name, ids in traces(args).items():
        for spec in args.topologies:
            slots, gpus = (int(x) for x in spec.split(":"))
            topology = Topology(slots, 1, 1, gpus)
            counts = steps_from_routing_trace(ids, args.batch_tokens, gpus)
            refs = compare(
                counts, topology,
                [SimConfig(interval=args.interval, window=args.window, dispatch="global")],
            )  # fmt: skip
            first = refs["baseline"].steps[0]
            values = ceiling(counts, topology, args, options)
            pick = [s - first for s in values["step"]]
            base = float(refs["baseline"].balancedness[pick].mean())
            best = float(refs["oracle"].balancedness[pick].mean())
            row = {"case": f"{name}, P={slots}/{gpus} GPUs", "baseline": base, "oracle": best}
            for column in COLUMNS:
                mean = statistics.mean(values[column])
                row[column] = {"balancedness": mean, "gap": (mean - base) / (best - base)}
            rows.append(row)
            if not args.json:
                cells = " | ".join(
                    f"{row[c]['balancedness']:.4f} ({100 * row[c]['gap']:.1f}%)" for c in COLUMNS
                )
                print(f"{row['case']} | {base:.4f} | {best:.4f} | {cells}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("columns: case | baseline | oracle | " + " | ".join(COLUMNS))
    for column in COLUMNS:
        gaps = [r[column]["gap"] for r in rows]
        print(f"  {column}: mean {100 * statistics.mean(gaps):.1f}% (min {100 * min(gaps):.1f}%)")


if __name__ == "__main__":
    main()
