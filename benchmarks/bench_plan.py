"""Plan time and balancedness per policy on synthetic DeepSeek-V3-scale loads.

Loads: per layer, expert popularity drawn from LogNormal(0, s) or a shuffled Zipf(s),
then multinomial token counts (tokens_per_layer x top-k). Figures are medians over repeats.

    python benchmarks/bench_plan.py                      # DSv3: 58 x 256 -> 288 / 320 slots
    python benchmarks/bench_plan.py --policies deepseek --repeats 50 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from eplb_plugin import Topology, available_policies, plan

SCENARIOS = {
    # name: (num_replicas, num_groups, num_nodes, num_gpus)
    "288 slots, 8 groups, 4 nodes, 32 GPUs (hierarchical)": (288, 8, 4, 32),
    "320 slots, 64 GPUs (global)": (320, 1, 1, 64),
}


def synthetic_load(
    layers: int, experts: int, dist: str, s: float, tokens: int, seed: int
) -> torch.Tensor:
    """[layers, experts] float32 token counts with skewed expert popularity."""
    gen = torch.Generator().manual_seed(seed)
    if dist == "lognormal":
        popularity = torch.exp(torch.randn(layers, experts, generator=gen) * s)
    elif dist == "zipf":
        ranks = torch.arange(1, experts + 1, dtype=torch.float64).pow(-s)
        perm = torch.stack([torch.randperm(experts, generator=gen) for _ in range(layers)])
        popularity = ranks[perm]
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    probs = popularity / popularity.sum(-1, keepdim=True)
    rows = [torch.multinomial(p.float(), tokens, True, generator=gen) for p in probs]
    return torch.stack([torch.bincount(r, minlength=experts) for r in rows]).float()


def bench(policy: str, weight: torch.Tensor, topology: Topology, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layout = plan(weight, topology, policy=policy)
        times.append(time.perf_counter() - start)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
        "balancedness": layout.balancedness(weight),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=available_policies())
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192 * 8, help="tokens x top-k per layer")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    loads = {
        f"{dist}({s})": synthetic_load(args.layers, args.experts, dist, s, args.tokens, seed)
        for seed, (dist, s) in enumerate([("lognormal", 0.5), ("lognormal", 1.0), ("zipf", 0.8)])
    }
    results = []
    jobs = [(n, t, ln, p) for n, t in SCENARIOS.items() for ln in loads for p in args.policies]
    for name, topo_args, load_name, policy in tqdm(jobs, desc="plan", disable=args.json):
        figures = bench(policy, loads[load_name], Topology(*topo_args), args.repeats)
        results.append({"scenario": name, "load": load_name, "policy": policy, **figures})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.layers} layers x {args.experts} experts, {args.repeats} repeats, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'scenario':<52} {'load':<15} {'policy':<10} {'median ms':>9} {'p90 ms':>8} "
          f"{'balancedness':>12}")  # fmt: skip
    for r in results:
        print(f"{r['scenario']:<52} {r['load']:<15} {r['policy']:<10} {r['median_ms']:>9.2f} "
              f"{r['p90_ms']:>8.2f} {r['balancedness']:>12.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
