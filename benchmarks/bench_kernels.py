"""Benchmark the kernel ops against a plain ``copy_`` of the same bytes.

    .venv/bin/python benchmarks/bench_kernels.py            # CPU: torch path
    python benchmarks/bench_kernels.py --device cuda        # GPU: Triton path (and torch)

- ``shuffle_experts``: one MoE layer's expert tensors (bf16 w13/w2 of a Qwen3-30B-A3B-sized
  expert, plus a bias) over S local slots, shuffled by a random permutation with cycles
  and a few replicas; baseline = ``copy_`` of a contiguous buffer holding exactly the bytes
  the shuffle writes into slots (staging traffic excluded, so the ratio includes it).
- ``pack_slots`` / ``unpack_slots``: half the slots into one buffer and back; baseline =
  ``copy_`` of the buffer's bytes.
- ``map_and_count``: static dispatch over a batch of N tokens x top-8 on E=128 experts,
  P=144 slots; baseline = the gather ``log2phy[ids, 0]`` plus a ``bincount`` (what a
  dispatch without replica choice costs).

Prints one markdown table; figures are medians over ``--repeat`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from tqdm import tqdm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs, after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_tensors(slots: int, hidden: int, inter: int, device) -> list[torch.Tensor]:
    return [
        torch.randn(slots, 2 * inter, hidden, device=device).to(torch.bfloat16),
        torch.randn(slots, hidden, inter, device=device).to(torch.bfloat16),
        torch.randn(slots, 2 * inter, device=device),
    ]


def shuffle_mapping(slots: int, rng: random.Random) -> list[int]:
    """A random permutation (cycles) where every 8th slot replicates another instead."""
    perm = list(range(slots))
    rng.shuffle(perm)
    return [rng.randrange(slots) if s % 8 == 7 else perm[s] for s in range(slots)]


def bench_shuffle(args, device, rows_out):
    from eplb_plugin.kernels import shuffle_experts

    rng = random.Random(0)
    tensors = layer_tensors(args.slots, args.hidden, args.inter, device)
    per_slot = sum(t[0].numel() * t.element_size() for t in tensors)
    mapping = shuffle_mapping(args.slots, rng)
    written = sum(1 for s, m in enumerate(mapping) if m >= 0 and m != s)
    src = torch.empty(written * per_slot, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    base = timed(lambda: dst.copy_(src), device, args.repeat)
    for name, budget in (("1 row/tensor", None), ("8 rows/tensor", 8 * per_slot + 64)):
        t = timed(
            lambda b=budget: shuffle_experts(tensors, mapping, staging_bytes=b), device, args.repeat
        )
        rows_out.append(
            (
                f"shuffle_experts, staging {name}",
                f"S={args.slots}, {per_slot / 2**20:.1f} MiB/slot, {written} slots written",
                t,
                base,
            )
        )


def bench_pack(args, device, rows_out):
    from eplb_plugin.kernels import pack_slots, unpack_slots

    tensors = layer_tensors(args.slots, args.hidden, args.inter, device)
    slots = list(range(0, args.slots, 2))
    buffer = pack_slots(tensors, slots)
    other = torch.empty_like(buffer)
    base = timed(lambda: other.copy_(buffer), device, args.repeat)
    size = f"{len(slots)} slots, {buffer.numel() / 2**20:.0f} MiB"
    t = timed(lambda: pack_slots(tensors, slots, out=buffer), device, args.repeat)
    rows_out.append(("pack_slots", size, t, base))
    t = timed(lambda: unpack_slots(tensors, slots, buffer), device, args.repeat)
    rows_out.append(("unpack_slots", size, t, base))


def bench_map(args, device, rows_out):
    from eplb_plugin.kernels import make_map_and_count_workspace, map_and_count
    from eplb_plugin.layout import ExpertLayout, Topology

    num_experts, num_slots, top_k = 128, 144, 8
    g = torch.Generator().manual_seed(0)
    extra = torch.randint(0, num_experts, (num_slots - num_experts,), generator=g)
    row = torch.cat([torch.arange(num_experts), extra])[torch.randperm(num_slots, generator=g)]
    layout = ExpertLayout.from_phy2log(
        row.unsqueeze(0), Topology(num_replicas=num_slots, num_gpus=8), num_experts=num_experts
    )
    log2phy, logcnt = layout.log2phy.to(device), layout.logcnt.to(device)
    share = layout.replica_share.to(device)
    counts = torch.zeros(1, num_slots, dtype=torch.int32, device=device)
    for tokens in args.tokens:
        weights = torch.rand(num_experts, generator=g) ** 2 + 0.01
        ids = torch.multinomial(weights.expand(tokens, -1), top_k, generator=g).to(device)
        ids = ids.to(torch.int32)
        out = torch.empty_like(ids)
        work = make_map_and_count_workspace(tokens, top_k, num_experts, device)
        num_valid = torch.tensor(tokens, device=device)

        def op(ids=ids, out=out, work=work, num_valid=num_valid):
            map_and_count(
                ids,
                log2phy,
                logcnt,
                share,
                counts,
                0,
                num_valid,
                out=out,
                workspace=work,
                validate=False,
            )

        def plain(ids=ids):
            phys = log2phy[0, ids.long(), 0]
            torch.bincount(phys.view(-1), minlength=num_slots)

        rows_out.append(
            (
                "map_and_count (static)",
                f"N={tokens} x K={top_k}, E={num_experts}, P={num_slots}",
                timed(op, device, args.repeat),
                timed(plain, device, args.repeat),
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backend",
        choices=("torch", "triton"),
        default=None,
        help="force EPLB_KERNELS (default: Triton on CUDA, torch on CPU)",
    )
    parser.add_argument("--slots", type=int, default=16, help="local expert slots per layer")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768, help="expert intermediate size")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu" and args.backend != "triton":
        # the interpreter is a correctness tool, not something to time
        os.environ.pop("TRITON_INTERPRET", None)
    if args.backend:
        os.environ["EPLB_KERNELS"] = args.backend
    torch.set_num_threads(args.threads)
    from eplb_plugin.kernels import backend_for

    backend = backend_for(device)
    rows: list[tuple[str, str, float, float]] = []
    for bench in tqdm((bench_shuffle, bench_pack, bench_map), desc="benchmarks", leave=False):
        bench(args, device, rows)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name}, backend: {backend}, torch {torch.__version__}, "
        f"threads: {torch.get_num_threads()}"
    )
    print()
    print("| op | case | time (ms) | baseline (ms) | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for op, case, t, base in rows:
        print(f"| {op} | {case} | {t * 1e3:.3f} | {base * 1e3:.3f} | {t / base:.2f} |")
    print()
    print(
        "baseline: copy_ of the same bytes (shuffle, pack, unpack); gather + bincount "
        "without replica choice (map_and_count)"
    )


if __name__ == "__main__":
    main()
