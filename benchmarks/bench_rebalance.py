"""Cost of a rebalance: bytes moved, time of a full move vs plain copies, longest step pause.

1. Bytes (host only, no processes): moving from the layout planned on one load window to the
   layout planned on the next (drifted) window, at full DeepSeek-V3 scale (58 layers, 256
   experts, 288 slots, 8 groups, 4 nodes x 8 GPUs, fp8 experts with 128x128 block scales:
   42 MiB per slot) and at this benchmark's scale, without and with migration-aware planning:
   - reload: every slot rewritten from another rank;
   - changed slots: only slots whose expert changed, each received from another rank;
   - plan_transfer: changed slots, experts already on the rank copied locally, each missing
     expert received once per rank and fanned out locally;
   - align + plan_transfer: the planned layout's slots first reordered within each GPU so
     that experts staying on a GPU keep their slot (``align_slots``), then plan_transfer.
2. Time (``--ranks`` gloo processes on the CPU, scaled-down DeepSeek-V3 experts: hidden and
   intermediate sizes divided by ``--scale``): a full rebalance (every layer in one step),
   with a freshly allocated staging arena and with one pre-faulted beforehand (what the
   Balancer does in the background), vs plain tensor copies of the same bytes on each rank
   (``copy_`` of one buffer into touched and into fresh pages) and vs a bare
   ``all_to_all_single`` with the same split sizes.
3. Longest pause of one engine step (``Balancer.step()``) during a rebalance driven by the
   Balancer itself (routing, recording, background plan, broadcast, chunks), with all layers
   in one step and with ``--layers-per-step`` layers per step.

    python benchmarks/bench_rebalance.py                    # 4 ranks, 12 layers, scale 16
    python benchmarks/bench_rebalance.py --layers 58 --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time

import torch
from tqdm import tqdm

from eplb_plugin import EplbConfig, ExpertLayout, Topology, plan
from eplb_plugin.transfer import align_slots, plan_transfer

DSV3 = {"layers": 58, "experts": 256, "slots": 288, "groups": 8, "nodes": 4, "gpus": 32,
        "hidden": 7168, "intermediate": 2048}  # fmt: skip


# ---------------------------------------------------------------------- shapes and loads
def slot_shapes(hidden: int, inter: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Per-slot tensors of a DeepSeek-V3 expert in fp8 with 128x128 block scales."""
    blocks = lambda n: -(-n // 128)  # noqa: E731
    return [
        ((2 * inter, hidden), torch.float8_e4m3fn),  # gate_up_proj
        ((hidden, inter), torch.float8_e4m3fn),  # down_proj
        ((blocks(2 * inter), blocks(hidden)), torch.float32),  # its scales
        ((blocks(hidden), blocks(inter)), torch.float32),
    ]


def slot_bytes(shapes) -> int:
    return sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for s, d in shapes)


def drifting_loads(layers: int, experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two consecutive windows [L, E]: lognormal popularity, then x lognormal(0, 0.5) drift."""
    gen = torch.Generator().manual_seed(seed)
    pop = torch.exp(torch.randn(layers, experts, generator=gen))
    drift = pop * torch.exp(0.5 * torch.randn(layers, experts, generator=gen))
    scale = lambda p: (p / p.sum(-1, keepdim=True) * 100_000).round()  # noqa: E731
    return scale(pop), scale(drift)


def bytes_table(layers, experts, topo: Topology, bps: int, seed: int, policy: str) -> dict:
    """Bytes of moving from the plan of window A to a plan of window B, per strategy."""
    a, b = drifting_loads(layers, experts, seed)
    old = plan(a, topo, policy=policy)
    scratch = plan(b, topo, policy=policy)  # from scratch: ignores the layout in service
    gib = 1 << 30

    def row(net, local, worst, cross, layout) -> dict:
        return {
            "network_GiB": net / gib,
            "local_copy_GiB": None if local is None else local / gib,
            "max_rank_received_GiB": worst / gib,
            "cross_node_GiB": None if cross is None else cross / gib,  # None: no sender chosen
            "balancedness": layout.balancedness(b),
        }

    def planned(layout: ExpertLayout) -> dict:
        t = plan_transfer(old, layout, topo, bps)
        return row(t.total_bytes, int(t.bytes_local.sum()), int(t.bytes_received.max()),
                   t.cross_node_bytes, layout)  # fmt: skip

    changed = (old.phy2log != scratch.phy2log).view(layers, topo.num_gpus, -1)
    rows = {
        "reload every slot": row(layers * topo.num_replicas * bps, None,
                                 layers * topo.slots_per_gpu * bps, None, scratch),
        "changed slots": row(int(changed.sum()) * bps, None,
                             int(changed.sum((0, 2)).max()) * bps, None, scratch),
        "plan_transfer": planned(scratch),
        "align_slots + plan_transfer": planned(align_slots(old, scratch)),
    }  # fmt: skip
    try:  # migration-aware policies take the layout in service (the Balancer passes it)
        aware = plan(b, topo, policy=policy, previous=old)
        rows["policy(previous=) + align + plan_transfer"] = planned(align_slots(old, aware))
        for budget in (0.25, 0.1):
            capped = plan(b, topo, policy=policy, previous=old, max_moved=budget)
            rows[f"... max_moved={budget}"] = planned(align_slots(old, capped))
    except (TypeError, ValueError) as exc:  # a policy without these options
        rows["policy(previous=)"] = {"error": str(exc)}
    return {"rows": rows, "balancedness_before": old.balancedness(b)}


# ---------------------------------------------------------------------- rank processes
def _fill(tensors: list[list[torch.Tensor]], phy2log: torch.Tensor, rank: int) -> None:
    """Slot of expert e in layer l: every byte = (7 * l + e) % 251 (cheap to check)."""
    for layer, per_layer in enumerate(tensors):
        S = per_layer[0].shape[0]
        for s in range(S):
            value = (7 * layer + int(phy2log[layer, rank * S + s])) % 251
            for t in per_layer:
                t[s].view(-1).view(torch.uint8).fill_(value)


def _wrong(tensors, phy2log: torch.Tensor, rank: int) -> int:
    bad = 0
    for layer, per_layer in enumerate(tensors):
        S = per_layer[0].shape[0]
        for s in range(S):
            value = (7 * layer + int(phy2log[layer, rank * S + s])) % 251
            bad += sum(int((t[s].view(-1).view(torch.uint8) != value).any()) for t in per_layer)
    return bad


def _max_over_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _pause_run(rank, args, topo, old, load, tensors, comm, lps: int) -> dict:
    """One Balancer-driven rebalance from ``old``; step pauses (max over ranks)."""
    from eplb_plugin.balancer import Balancer

    _fill(tensors, old.phy2log, rank)
    config = EplbConfig(
        num_redundant_experts=topo.num_replicas - DSV3["experts"], num_groups=topo.num_groups,
        num_nodes=topo.num_nodes, window=args.window, interval=10**9, plan_delay=2,
        layers_per_step=lps, min_gain=0.0, staging_bytes=args.staging_mib << 20, timeout_s=600,
    )  # fmt: skip
    bal = Balancer(config, old, tensors, communicator=comm)
    gen = torch.Generator().manual_seed(args.seed + 17 * rank)
    probs = load / load.sum(-1, keepdim=True)
    step_pauses, events = [], []
    done_at = None
    for step in range(1, 10_000):
        for layer in range(len(tensors)):
            ids = torch.multinomial(probs[layer], args.tokens * 8, True, generator=gen)
            bal.route(ids.view(args.tokens, 8), layer, seed=step)
        if step == args.window:
            bal.request_rebalance()  # one rebalance, on the same step on every rank
        start = time.perf_counter()
        report = bal.step()
        step_pauses.append(time.perf_counter() - start)
        events.append(report.event if report else None)
        if report is not None and report.event in ("done", "failed"):
            done_at = done_at or step
        if done_at and step >= done_at + 3:
            break
    assert bal.stats.rebalances == 1, events
    assert _wrong(tensors, bal.layout.phy2log, rank) == 0
    bal.close()
    quiet = [p for p, e in zip(step_pauses, events) if e is None]
    return {
        "longest_pause_s": _max_over_ranks(max(step_pauses)),
        "rebalance_steps": sum(e in ("chunk", "done") for e in events),
        "median_quiet_step_s": _max_over_ranks(statistics.median(quiet)),
        "trace": [(e, round(p * 1e3, 1)) for e, p in zip(events, step_pauses) if e],
    }


def _rank_main(rank: int, args: argparse.Namespace, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from eplb_plugin.comm.torch_dist import TorchCommunicator
    from eplb_plugin.executor import Executor

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks,
        timeout=datetime.timedelta(seconds=600),
    )  # fmt: skip
    topo = Topology(DSV3["slots"], DSV3["groups"], min(2, args.ranks), args.ranks)
    shapes = slot_shapes(DSV3["hidden"] // args.scale, DSV3["intermediate"] // args.scale)
    S, L, E = topo.slots_per_gpu, args.layers, DSV3["experts"]
    a, b = drifting_loads(L, E, args.seed)
    old = plan(a, topo)
    new = align_slots(old, plan(b, topo))
    tensors = [[torch.empty((S,) + s, dtype=d) for s, d in shapes] for _ in range(L)]
    _fill(tensors, old.phy2log, rank)
    comm = TorchCommunicator(timeout_s=600)
    ex = Executor(tensors, topo, comm, staging_bytes=args.staging_mib << 20)
    result: dict = {"rank": rank}

    # -- 2. full rebalance vs plain copies, alternating old -> new -> old
    times, warm, copies, fresh, a2a = [], [], [], [], []
    layouts = [old, new]
    for it in range(2 * args.repeats):
        src, dst = layouts[it % 2], layouts[(it + 1) % 2]
        transfer = plan_transfer(src, dst, topo, ex.bytes_per_slot)
        chunks = ex.chunks(transfer, 0)
        warm_arena = it % 2 == 1  # alternate: fresh arena (cold) / pre-faulted (as Balancer)
        if warm_arena:
            ex.adopt(ex.new_arena(transfer, chunks, touch=True))
        dist.barrier()
        start = time.perf_counter()
        if not warm_arena:
            ex.reserve(transfer, chunks)
        for chunk in chunks:
            assert ex.run_chunk(transfer, chunk).ok
        ex.release()
        (warm if warm_arena else times).append(_max_over_ranks(time.perf_counter() - start))
        assert _wrong(tensors, dst.phy2log, rank) == 0
        moved = int(transfer.bytes_sent[rank] + transfer.bytes_received[rank]
                    + transfer.bytes_local[rank])  # fmt: skip
        buf_a, buf_b = torch.ones(moved, dtype=torch.uint8), torch.zeros(moved, dtype=torch.uint8)
        dist.barrier()
        start = time.perf_counter()
        buf_b.copy_(buf_a)
        copies.append(_max_over_ranks(time.perf_counter() - start))
        dist.barrier()
        start = time.perf_counter()
        torch.empty(moved, dtype=torch.uint8).copy_(buf_a)  # into fresh (untouched) pages
        fresh.append(_max_over_ranks(time.perf_counter() - start))
        bps = ex.bytes_per_slot
        send_splits = [0] * args.ranks
        recv_splits = [0] * args.ranks
        for t in transfer.transfers:
            if t.src_rank == rank:
                send_splits[t.dst_rank] += bps
            if t.dst_rank == rank:
                recv_splits[t.src_rank] += bps
        send = torch.ones(sum(send_splits), dtype=torch.uint8)
        recv = torch.zeros(sum(recv_splits), dtype=torch.uint8)  # touched: no page faults timed
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(recv, send, recv_splits, send_splits)
        a2a.append(_max_over_ranks(time.perf_counter() - start))
        del buf_a, buf_b, send, recv
        if it == 0:
            result["moved_bytes_rank"] = moved
            result["network_bytes_total"] = transfer.total_bytes
    result.update(
        rebalance_s=times, warm_rebalance_s=warm, copy_s=copies, fresh_copy_s=fresh,
        all_to_all_s=a2a,
    )  # fmt: skip

    # -- 3. longest step pause, Balancer-driven, chunking off (0) and on, --repeats runs each
    pauses = {}
    for lps in (0, args.layers_per_step):
        runs = [
            _pause_run(rank, args, topo, old, b, tensors, comm, lps) for _ in range(args.repeats)
        ]
        longest = sorted(r["longest_pause_s"] for r in runs)
        pauses[lps] = {
            "longest_pause_s_median": statistics.median(longest),
            "longest_pause_s_runs": longest,
            "rebalance_steps": runs[0]["rebalance_steps"],
            "median_quiet_step_s": statistics.median(r["median_quiet_step_s"] for r in runs),
            "trace": runs[0]["trace"],
        }
    result["pauses"] = pauses
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12, help="MoE layers on the ranks")
    parser.add_argument("--scale", type=int, default=16, help="divide hidden/intermediate by")
    parser.add_argument("--repeats", type=int, default=3, help="rebalances timed per direction")
    parser.add_argument("--layers-per-step", type=int, default=1)
    parser.add_argument("--staging-mib", type=int, default=512)
    parser.add_argument("--window", type=int, default=6, help="steps before the plan is due")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per rank per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default="default", help="placement policy for the bytes table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    full_topo = Topology(DSV3["slots"], DSV3["groups"], DSV3["nodes"], DSV3["gpus"])
    full_bps = slot_bytes(slot_shapes(DSV3["hidden"], DSV3["intermediate"]))
    small_topo = Topology(DSV3["slots"], DSV3["groups"], min(2, args.ranks), args.ranks)
    small_bps = slot_bytes(slot_shapes(DSV3["hidden"] // args.scale,
                                       DSV3["intermediate"] // args.scale))  # fmt: skip
    summary: dict = {"slot_bytes_full": full_bps, "slot_bytes_scaled": small_bps}
    for name, layers, topo, bps in tqdm(
        [("DeepSeek-V3 full scale, 32 GPUs", DSV3["layers"], full_topo, full_bps),
         (f"scaled, {args.ranks} ranks", args.layers, small_topo, small_bps)],
        desc="planning bytes",
    ):  # fmt: skip
        summary[name] = bytes_table(layers, DSV3["experts"], topo, bps, args.seed, args.policy)

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        print(f"running {args.ranks} gloo ranks ...", flush=True)
        mp.spawn(_rank_main, args=(args, _free_port(), out_dir), nprocs=args.ranks, join=True)
        ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(args.ranks)]
    r0 = ranks[0]
    med = statistics.median
    summary["timing"] = {
        "rebalance_s": med(r0["rebalance_s"]),
        "rebalance_warm_arena_s": med(r0["warm_rebalance_s"]),
        "plain_copy_s": med(r0["copy_s"]),
        "fresh_copy_s": med(r0["fresh_copy_s"]),
        "bare_all_to_all_s": med(r0["all_to_all_s"]),
        "ratio_vs_copy": med(r0["rebalance_s"]) / med(r0["copy_s"]),
        "ratio_vs_fresh_copy": med(r0["rebalance_s"]) / med(r0["fresh_copy_s"]),
        "ratio_vs_all_to_all": med(r0["rebalance_s"]) / med(r0["all_to_all_s"]),
        "warm_ratio_vs_copy": med(r0["warm_rebalance_s"]) / med(r0["copy_s"]),
        "warm_ratio_vs_all_to_all": med(r0["warm_rebalance_s"]) / med(r0["all_to_all_s"]),
        "network_MiB": r0["network_bytes_total"] / 2**20,
        "max_rank_touched_MiB": max(r["moved_bytes_rank"] for r in ranks) / 2**20,
    }
    summary["pauses"] = r0["pauses"]
    summary["args"] = vars(args)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"\nslot: {full_bps / 2**20:.1f} MiB (DeepSeek-V3 fp8 + scales), scaled "
          f"{small_bps / 2**10:.1f} KiB (/{args.scale})")  # fmt: skip
    for name in ("DeepSeek-V3 full scale, 32 GPUs", f"scaled, {args.ranks} ranks"):
        t = summary[name]
        print(f"\nbytes moved, {name}, policy {args.policy!r} (balancedness on the new window "
              f"with the layout in service: {t['balancedness_before']:.3f}):")  # fmt: skip
        print(f"  {'strategy':43s} {'network GiB':>11s} {'local GiB':>9s} {'max recv GiB':>12s}"
              f" {'cross-node':>10s} {'balanced':>8s}")  # fmt: skip
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        for key, r in t["rows"].items():
            if "error" in r:
                print(f"  {key:43s} n/a: {r['error']}")
                continue
            print(f"  {key:43s} {r['network_GiB']:11.2f} {fmt(r['local_copy_GiB']):>9s} "
                  f"{r['max_rank_received_GiB']:12.2f} {fmt(r['cross_node_GiB']):>10s} "
                  f"{r['balancedness']:8.3f}")  # fmt: skip
    tm = summary["timing"]
    print(
        f"\nfull rebalance on {args.ranks} CPU ranks, {args.layers} layers "
        f"({tm['network_MiB']:.0f} MiB over the network, up to "
        f"{tm['max_rank_touched_MiB']:.0f} MiB sent+received+copied per rank), medians:"
    )
    print(f"  rebalance, fresh arena            {tm['rebalance_s'] * 1e3:8.1f} ms")
    print(
        f"  rebalance, pre-faulted arena      {tm['rebalance_warm_arena_s'] * 1e3:8.1f} ms  "
        f"(/ copy = {tm['warm_ratio_vs_copy']:.1f}, / all_to_all = "
        f"{tm['warm_ratio_vs_all_to_all']:.2f})"
    )
    print(
        f"  copy_ of the same bytes           {tm['plain_copy_s'] * 1e3:8.1f} ms  "
        f"(fresh-arena rebalance / copy = {tm['ratio_vs_copy']:.1f})"
    )
    print(
        f"  copy_ into freshly allocated pages {tm['fresh_copy_s'] * 1e3:7.1f} ms  "
        f"(ratio {tm['ratio_vs_fresh_copy']:.1f})"
    )
    print(f"  bare all_to_all_single, same splits {tm['bare_all_to_all_s'] * 1e3:6.1f} ms  "
          f"(ratio {tm['ratio_vs_all_to_all']:.2f})")  # fmt: skip
    print(f"\nlongest Balancer.step() pause during a rebalance (max over ranks; median of "
          f"{args.repeats} runs, all runs in brackets):")  # fmt: skip
    for lps, p in summary["pauses"].items():
        label = "all layers in one step" if str(lps) == "0" else f"{lps} layer(s) per step"
        runs = ", ".join(f"{x * 1e3:.0f}" for x in p["longest_pause_s_runs"])
        print(f"  {label:24s} {p['longest_pause_s_median'] * 1e3:8.1f} ms [{runs}] over "
              f"{p['rebalance_steps']} step(s); quiet step median "
              f"{p['median_quiet_step_s'] * 1e3:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
