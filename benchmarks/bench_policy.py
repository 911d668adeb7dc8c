"""Default policy vs DeepSeek's at DeepSeek-V3 scale: balancedness and plan time.

Loads are those of bench_plan.py (58 layers x 256 experts; per-layer LogNormal(0, s) or
shuffled Zipf(s) popularity, 65,536 multinomial token choices per layer). For each case:

- ``static uniform``: the layout's balancedness with every expert split evenly over its
  replicas (what vLLM/SGLang's static dispatch does);
- ``global``: the balancedness after global water-filling dispatch on the same load;
- ``bound`` (hierarchical only): the best balancedness any group-to-node assignment allows
  (mean GPU load over the lightest possible most-loaded node's per-GPU load);
- plan time of ``plan()``: wall clock (median, p90) and CPU time of this process (median;
  closer to what a quiet machine shows when other processes compete for the cores), over
  repeats, DeepSeek's and ours interleaved so that both see the same machine load.

- ``vs eplb.py``: how many times less CPU time than deepseek-ai/EPLB's ``eplb.py`` (the
  faithful copy in ``tests/eplb_reference.py``), timed in the same run on the same load
  (medians; ``--reference-repeats`` calls, interleaved with the first repeats of the others;
  CPU time because wall time on a shared machine mostly measures the other processes);
  ``vs SGLang's copy``: the same against the copy SGLang vendors, whose packing sums Python
  floats instead of tensor elements (``rebalance_experts_sglang``): 15-30x faster than
  eplb.py, and it breaks near-ties differently (see tests/eplb_reference.py).

    python benchmarks/bench_policy.py                  # 20 repeats
    python benchmarks/bench_policy.py --repeats 50 --json
    python benchmarks/bench_policy.py --scale          # + 512 experts / 1024 slots / 128 GPUs

- ``--baseline DIR``: also times the ``eplb_plugin`` package found in DIR (an older version,
  e.g. ``git archive <commit> eplb_plugin | tar -x -C DIR``), loaded under another name
  and interleaved call by call with this one, so that both see the same machine load; the
  table then adds its CPU time and the speedup (min and median over the repeats; on a
  machine shared with other work the min is the steadier figure). The baseline's layouts
  are checked to be the same as this version's.

    python benchmarks/bench_policy.py --repeats 30 --scale --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from eplb_plugin import Topology, plan
from eplb_plugin.dispatch import gpu_loads_of, slot_loads
from eplb_plugin.layout import uniform_share
from eplb_plugin.policies.group_packing import partitions_peak_bound

SCENARIOS = {
    "288 slots, 8 groups, 4 nodes, 32 GPUs (hierarchical)": (288, 8, 4, 32),
    "320 slots, 64 GPUs (global)": (320, 1, 1, 64),
}
LOADS = [("lognormal", 0.5), ("lognormal", 1.0), ("zipf", 0.8)]
# issue 12's scale target: 512 experts on 1024 slots, 128 GPUs on 16 nodes
SCALE_NAME = "1024 slots, 16 nodes, 128 GPUs (global)"
SCALE = (1024, 1, 16, 128)
# (label, policy, options)
POLICIES = [
    ("deepseek", "deepseek", {}),
    ("default", "default", {}),
    ("default (dispatch=global)", "default", {"dispatch": "global"}),
]


def synthetic_load(
    layers: int, experts: int, dist: str, s: float, tokens: int, seed: int
) -> torch.Tensor:
    """[layers, experts] float32 token counts, as in bench_plan.py."""
    gen = torch.Generator().manual_seed(seed)
    if dist == "lognormal":
        popularity = torch.exp(torch.randn(layers, experts, generator=gen) * s)
    else:
        ranks = torch.arange(1, experts + 1, dtype=torch.float64).pow(-s)
        perm = torch.stack([torch.randperm(experts, generator=gen) for _ in range(layers)])
        popularity = ranks[perm]
    probs = popularity / popularity.sum(-1, keepdim=True)
    rows = [torch.multinomial(p.float(), tokens, True, generator=gen) for p in probs]
    return torch.stack([torch.bincount(r, minlength=experts) for r in rows]).float()


def balancedness(gpu: torch.Tensor) -> float:
    return float((gpu.mean(-1) / gpu.amax(-1)).mean())


def figures(layout, weight: torch.Tensor) -> dict:
    uniform = layout.with_share(uniform_share(layout.phy2log, layout.logcnt))
    return {
        "static_uniform": uniform.balancedness(weight),
        "static_planned_shares": layout.balancedness(weight),
        "global": balancedness(gpu_loads_of(layout, slot_loads(layout, weight, "global"))),
    }


def bound(weight: torch.Tensor, topology: Topology) -> float | None:
    if topology.num_nodes == 1 or not topology.hierarchical:
        return None
    w = weight.double().numpy()
    groups = w.reshape(w.shape[0], topology.num_groups, -1).sum(-1)
    peak_node = partitions_peak_bound(groups, topology.num_nodes)
    return float((w.sum(1) / topology.num_nodes / peak_node).mean())


def load_baseline(directory: str):
    """The ``eplb_plugin`` package in ``directory``, imported as ``eplb_baseline``."""
    init = os.path.join(directory, "eplb_plugin", "__init__.py")
    if not os.path.exists(init):
        raise SystemExit(f"bench_policy.py: error: no eplb_plugin package in {directory}")
    spec = importlib.util.spec_from_file_location(
        "eplb_baseline", init, submodule_search_locations=[os.path.dirname(init)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["eplb_baseline"] = module
    spec.loader.exec_module(module)
    return module


def same_layout(a, b) -> bool:
    return all(
        torch.equal(getattr(a, n), getattr(b, n))
        for n in ("phy2log", "log2phy", "logcnt", "replica_share")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192 * 8, help="tokens x top-k per layer")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--reference-repeats", type=int, default=3,
        help="calls of deepseek-ai/EPLB's eplb.py per case (0: not timed)",
    )  # fmt: skip
    parser.add_argument(
        "--scale", action="store_true",
        help="also 512 experts on 1024 slots, 128 GPUs, 16 nodes (global placement)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", metavar="DIR",
        help="also time the eplb_plugin package in DIR, interleaved (see the module doc)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline) if args.baseline else None

    reference = None
    if args.reference_repeats > 0:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
        import eplb_reference

        reference = eplb_reference.rebalance_experts
        reference_sglang = eplb_reference.rebalance_experts_sglang
    loads = {
        f"{dist}({s})": synthetic_load(args.layers, args.experts, dist, s, args.tokens, seed)
        for seed, (dist, s) in enumerate(LOADS)
    }
    results = []
    jobs = [(n, t, ln, loads[ln]) for n, t in SCENARIOS.items() for ln in loads]
    if args.scale:
        big = synthetic_load(args.layers, 512, "lognormal", 1.0, args.tokens, 0)
        jobs.append((SCALE_NAME, SCALE, "lognormal(1.0), 512 experts", big))
    for name, topo_args, load_name, weight in tqdm(jobs, desc="cases", disable=args.json):
        topology = Topology(*topo_args)
        times: dict[str, list[float]] = {label: [] for label, _, _ in POLICIES}
        cpu: dict[str, list[float]] = {label: [] for label, _, _ in POLICIES}
        base_cpu: dict[str, list[float]] = {label: [] for label, _, _ in POLICIES}
        differs: set[str] = set()
        ref_times: list[float] = []
        sglang_times: list[float] = []
        layouts = {}
        for repeat in range(args.repeats):  # interleaved: every policy sees the same load
            if reference is not None and repeat < args.reference_repeats:
                start = time.process_time()
                reference(weight, *topo_args)
                ref_times.append((time.process_time() - start) * 1e3)
                start = time.process_time()
                reference_sglang(weight, *topo_args)
                sglang_times.append((time.process_time() - start) * 1e3)
            for label, policy, options in POLICIES:
                start, start_cpu = time.perf_counter(), time.process_time()
                layouts[label] = plan(weight, topology, policy, **options)
                times[label].append((time.perf_counter() - start) * 1e3)
                cpu[label].append((time.process_time() - start_cpu) * 1e3)
                if baseline is not None:
                    base_topology = baseline.Topology(*topo_args)
                    start_cpu = time.process_time()
                    old = baseline.plan(weight, base_topology, policy, **options)
                    base_cpu[label].append((time.process_time() - start_cpu) * 1e3)
                    if repeat == 0 and not same_layout(old, layouts[label]):
                        differs.add(label)
        ref_ms = statistics.median(ref_times) if ref_times else None
        sglang_ms = statistics.median(sglang_times) if sglang_times else None
        for label, _, _ in POLICIES:
            t = sorted(times[label])
            results.append(
                {
                    "scenario": name, "load": load_name, "policy": label,
                    "median_ms": statistics.median(t), "p90_ms": t[int(0.9 * (len(t) - 1))],
                    "cpu_median_ms": statistics.median(cpu[label]),
                    "eplb_py_cpu_ms": ref_ms,
                    "vs_eplb_py": None
                    if ref_ms is None
                    else ref_ms / statistics.median(cpu[label]),
                    "sglang_copy_cpu_ms": sglang_ms,
                    "vs_sglang_copy": None
                    if sglang_ms is None
                    else sglang_ms / statistics.median(cpu[label]),
                    "bound": bound(weight, topology), **figures(layouts[label], weight),
                }
            )  # fmt: skip
            if baseline is not None:
                b, c = base_cpu[label], cpu[label]
                results[-1].update(
                    {
                        "baseline_cpu_min_ms": min(b),
                        "baseline_cpu_median_ms": statistics.median(b),
                        "cpu_min_ms": min(c), "speedup_min": min(b) / min(c),
                        "speedup_median": statistics.median(b) / statistics.median(c),
                        "same_layout_as_baseline": label not in differs,
                    }
                )  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{args.layers} layers x {args.experts} experts, {args.repeats} repeats, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, numpy {np.__version__}"
    )
    head = ["scenario", "load", "policy", "static uniform", "global", "bound", "median ms",
            "p90 ms", "CPU ms", "eplb.py CPU ms", "vs eplb.py (CPU)", "SGLang's copy CPU ms",
            "vs SGLang's copy (CPU)"]  # fmt: skip
    if baseline is not None:
        head += ["CPU ms min", "baseline CPU ms min / median", "speedup min / median",
                 "same layout"]  # fmt: skip
    print(" | ".join(head))
    for r in results:
        b = "-" if r["bound"] is None else f"{r['bound']:.4f}"
        ref = "-" if r["eplb_py_cpu_ms"] is None else f"{r['eplb_py_cpu_ms']:.0f}"
        speed = "-" if r["vs_eplb_py"] is None else f"{r['vs_eplb_py']:.0f}x"
        sg = "-" if r["sglang_copy_cpu_ms"] is None else f"{r['sglang_copy_cpu_ms']:.0f}"
        sg_speed = "-" if r["vs_sglang_copy"] is None else f"{r['vs_sglang_copy']:.0f}x"
        line = (
            f"{r['scenario']} | {r['load']} | {r['policy']} | {r['static_uniform']:.4f} | "
            f"{r['global']:.4f} | {b} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['cpu_median_ms']:.1f} | {ref} | {speed} | {sg} | {sg_speed}"
        )
        if baseline is not None:
            line += (
                f" | {r['cpu_min_ms']:.1f} | {r['baseline_cpu_min_ms']:.1f} / "
                f"{r['baseline_cpu_median_ms']:.1f} | {r['speedup_min']:.2f}x / "
                f"{r['speedup_median']:.2f}x | {'yes' if r['same_layout_as_baseline'] else 'NO'}"
            )
        print(line)


if __name__ == "__main__":
    main()
