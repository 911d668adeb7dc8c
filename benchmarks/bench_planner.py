"""Policy in a background thread or in a separate process: what each costs the serving loop.

The Balancer runs the placement policy off the critical path. In a thread it shares the GIL
with the engine's Python; in a separate process it does not, but every plan then pays for
sending the load and layout over and back, and registered policies (``register_policy`` in
the engine process) would have to be importable there. This measures, at DeepSeek-V3 scale
(58 layers, 256 experts, 288 slots, 8 groups, 4 nodes x 8 GPUs) with the default policy:

1. the plan time alone;
2. a serving-loop stand-in (a [64, 2048] x [2048, 2048] matmul plus 200 small torch ops of
   Python per step, one torch thread), its median and 99th-percentile step time alone, with
   the policy looping in a thread, and with it looping in a separate (spawned) process;
3. the separate process's costs: start-up (spawn, imports) and one plan's round trip
   (pickling the inputs and the result) minus the plan time.

    python benchmarks/bench_planner.py [--steps 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import threading
import time

import torch

DSV3 = {"layers": 58, "experts": 256, "slots": 288, "groups": 8, "nodes": 4, "gpus": 32}


def inputs(seed: int = 0):
    from eplb_plugin import ExpertLayout, Topology

    topo = Topology(DSV3["slots"], num_groups=DSV3["groups"], num_nodes=DSV3["nodes"],
                    num_gpus=DSV3["gpus"])  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    load = torch.rand(DSV3["layers"], DSV3["experts"], generator=gen) ** 4 * 1000
    previous = ExpertLayout.identity(DSV3["layers"], DSV3["experts"], topo)
    return load, topo, previous


def plan_once(load, topo, previous):
    from eplb_plugin import plan

    return plan(load, topo, previous=previous)


def _policy_loop(stop) -> None:  # module level: the spawned process runs it
    torch.set_num_threads(1)
    load, topo, previous = inputs()
    while not stop.is_set():
        plan_once(load, topo, previous)


def _server(conn) -> None:
    torch.set_num_threads(1)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(plan_once(*msg))


def serving_steps(steps: int) -> list[float]:
    a, b = torch.randn(64, 2048), torch.randn(2048, 2048)
    small = torch.zeros(16)
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        a @ b
        for _ in range(200):  # the engine's per-step Python and small ops
            small.add_(1.0)
        out.append(time.perf_counter() - start)
    return out


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_ms": round(1e3 * statistics.median(ordered), 2),
            "p99_ms": round(1e3 * ordered[int(0.99 * (len(ordered) - 1))], 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load, topo, previous = inputs()
    plan_once(load, topo, previous)  # warm up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        plan_once(load, topo, previous)
        times.append(time.perf_counter() - start)
    plan_s = statistics.median(times)
    result = {"plan_s": round(plan_s, 3), "alone": summary(serving_steps(args.steps))}

    stop = threading.Event()
    thread = threading.Thread(target=_policy_loop, args=(stop,), daemon=True)
    thread.start()
    time.sleep(0.5)
    result["policy_thread"] = summary(serving_steps(args.steps))
    stop.set()
    thread.join()

    ctx = mp.get_context("spawn")
    pstop = ctx.Event()
    start = time.perf_counter()
    proc = ctx.Process(target=_policy_loop, args=(pstop,), daemon=True)
    proc.start()
    time.sleep(0.5)
    result["policy_process"] = summary(serving_steps(args.steps))
    pstop.set()
    proc.join()

    parent, child = ctx.Pipe()
    start = time.perf_counter()
    server = ctx.Process(target=_server, args=(child,), daemon=True)
    server.start()
    parent.send((load, topo, previous))  # the first answer includes start-up and imports
    parent.recv()
    startup = time.perf_counter() - start - plan_s
    trips = []
    for _ in range(3):
        start = time.perf_counter()
        parent.send((load, topo, previous))
        parent.recv()
        trips.append(time.perf_counter() - start - plan_s)
    parent.send(None)
    server.join()
    result["process_start_s"] = round(startup, 2)
    result["process_round_trip_overhead_s"] = round(statistics.median(trips), 4)
    print(json.dumps(result, indent=2 if args.json else None))


if __name__ == "__main__":
    main()
