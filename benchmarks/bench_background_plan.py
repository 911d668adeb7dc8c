"""How much a plan running in a background thread slows a host-bound serving loop.

The Balancer plans in a background thread of the serving process. A host-bound loop (an
engine's scheduler and kernel launches: many small torch ops on the CPU, one "step" at a
time) shares the cores and the GIL with it. This script times the loop's steps:

- alone;
- while another thread plans continuously (DeepSeek-V3 scale: 58 layers x 256 experts,
  288 slots on 32 GPUs) with the default policy's bounded torch threads (``threads=1``);
- the same with torch's own thread count (``threads=0``, as before the bound).

    python benchmarks/bench_background_plan.py                    # 400 steps per phase
    python benchmarks/bench_background_plan.py --steps 1000 --json

Figures are medians and 99th percentiles of the step time; the machine's other load shows in
them, so run it on a quiet machine or compare phases of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch
from bench_plan import synthetic_load

from eplb_plugin import Topology, plan


def serving_step(state: torch.Tensor, ops: int) -> torch.Tensor:
    """One host-bound step: ``ops`` small dependent tensor ops (dispatch overhead dominates)."""
    for _ in range(ops):
        state = (state * 0.999 + 0.001).clamp_(max=10.0)
    return state


def time_steps(steps: int, ops: int) -> list[float]:
    state = torch.ones(64)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state = serving_step(state, ops)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered),
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))],
        "mean_ms": statistics.fmean(ordered),
    }


def with_planner(steps: int, ops: int, threads: int, weight: torch.Tensor) -> tuple[dict, int]:
    """Time the loop while a thread plans back to back; returns (figures, plans made)."""
    stop = threading.Event()
    plans = [0]
    topology = Topology(288, 8, 4, 32)

    def planner() -> None:
        while not stop.is_set():
            plan(weight, topology, "default", threads=threads)
            plans[0] += 1

    thread = threading.Thread(target=planner, daemon=True)
    thread.start()
    time.sleep(0.05)  # the planner is running before the first timed step
    try:
        times = time_steps(steps, ops)
    finally:
        stop.set()
        thread.join()
    return summary(times), plans[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="serving steps per phase")
    parser.add_argument("--ops", type=int, default=200, help="small torch ops per step")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    weight = synthetic_load(58, 256, "lognormal", 1.0, 8192 * 8, 0)
    time_steps(50, args.ops)  # warm-up
    rows = [{"phase": "alone", **summary(time_steps(args.steps, args.ops)), "plans": 0}]
    for threads in (1, 0):
        figures, plans = with_planner(args.steps, args.ops, threads, weight)
        label = f"background plan, threads={threads}"
        rows.append({"phase": label, **figures, "plans": plans})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{args.steps} steps of {args.ops} small torch ops; torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads by default, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    base = rows[0]["median_ms"]
    print("phase | median ms | p99 ms | slowdown (median) | plans made")
    for r in rows:
        print(
            f"{r['phase']} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} | "
            f"{r['median_ms'] / base:.2f}x | {r['plans']}"
        )


if __name__ == "__main__":
    main()
