"""What each runtime fault costs the other ranks, and when rebalancing resumes (4 gloo ranks).

Runs the fault soak of ``tests/test_faults.py``: a Balancer on each of 4 gloo ranks (12 slots
of 3 layers, a rebalance every 3 steps moving one layer per step), local faults injected at
random steps on random ranks (``stage``: setting up the chunk, ``pack``: packing the sends,
``exchange``: the all_to_all raises before the bytes go out), then one terminal fault:
``kill`` (rank 3 exits in the middle of a chunk), ``hang`` (rank 3 sleeps 3 x timeout_s in
the middle of a chunk) or ``commit`` (rank 2 raises while committing). For each kind it prints
the longest ``Balancer.step()`` of any rank at a step where that fault happened (what the
fault cost every rank's serving step), and the steps from a failed chunk to the next
completed rebalance. The soak's checks (every slot on every surviving rank holds its
expert's bytes, ranks agree) run too.

    python benchmarks/bench_faults.py                       # none, kill, hang; timeout_s 10
    python benchmarks/bench_faults.py --terminal kill --steps 150 --timeout-s 60 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def resume_steps(events: list, kinds: tuple[str, ...]) -> list[int]:
    """Steps from each failed chunk to the next event of ``kinds``."""
    out = []
    for i, e in enumerate(events):
        if e and e[0] == "failed":
            nxt = next((j for j in range(i + 1, len(events)) if events[j] and
                        events[j][0] in kinds), None)  # fmt: skip
            if nxt is not None:
                out.append(nxt - i)
    return out


def run(terminal: str | None, steps: int, rate: float, timeout_s: float, seed: int) -> dict:
    from dist_utils import run_ranks
    from test_faults import _soak, check_soak

    start = time.perf_counter()
    results = run_ranks(
        _soak, 4, steps, seed, rate, terminal, timeout_s,
        timeout=steps * 10 + 8 * timeout_s + 120, env={"EPLB_KERNELS": "torch"},
        allow_missing=True,
    )  # fmt: skip
    figures = check_soak(results, terminal, timeout_s)
    alive = [r for r in results if r is not None]
    last = alive[0]["last"]
    events = alive[0]["events"][: last - 1]
    normal = [p for r in alive for i, p in enumerate(r["pauses"][: last - 1])
              if events[i] and events[i][0] in ("chunk", "done")]  # fmt: skip
    retries = resume_steps(events, ("chunk", "done", "failed"))
    resumes = resume_steps(events, ("done",))
    return {
        "terminal": terminal or "none",
        "timeout_s": timeout_s,
        "local_faults": sum(1 for e in events if e and e[0] == "failed"),
        "rebalances": sum(1 for e in events if e and e[0] == "done"),
        "longest_step_s": {k: round(v, 3) for k, v in figures.items()},
        "longest_normal_chunk_step_s": round(max(normal), 3),
        "steps_to_retry": sorted(set(retries)),
        "steps_to_next_rebalance": sorted(set(resumes)),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def hung_policy() -> dict:
    """3 ranks, plan_on rank0, plan_wait_s 2 s: policy call 1 never returns, call 2 is fast,
    calls 3 and later never return (tests/test_faults.py)."""
    from dist_utils import run_ranks
    from test_faults import _hung_policy

    start = time.perf_counter()
    results = run_ranks(_hung_policy, 3, "rank0", [1] + list(range(3, 100)), timeout=300,
                        env={"EPLB_KERNELS": "torch"})  # fmt: skip
    return {
        "terminal": "hung policy (plan_wait_s=2)",
        "longest_step_s": [round(r["max_pause"], 3) for r in results],
        "extra_threads": [r["threads"] for r in results],
        "rebalances": results[0]["stats"].rebalances,
        "not_ready": results[0]["stats"].skip_reasons.get("not ready", 0),
        "close_s": [round(r["close_s"], 4) for r in results],
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--terminal", choices=("none", "kill", "hang", "commit", "policy"),
                        action="append", help="default: all but commit")  # fmt: skip
    parser.add_argument("--steps", type=int, default=60, help="steps of the random phase")
    parser.add_argument("--rate", type=float, default=0.25, help="local faults per step")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="EplbConfig.timeout_s")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in args.terminal or ["none", "kill", "hang", "policy"]:
        if name == "policy":
            rows.append(hung_policy())
        else:
            terminal = None if name == "none" else name
            rows.append(run(terminal, args.steps, args.rate, args.timeout_s, args.seed))
        if not args.json:
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
