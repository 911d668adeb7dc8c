"""Executor on 2, 4 and 8 gloo ranks: exact weights after 100 random rebalances, bytes as
planned, extra memory within the staging budget, injected failures, a rank that never answers.

Each rank holds tiny tensors of four dtypes per layer (bf16 weights, fp8 weights, fp32
scales, fp16 biases); the bytes of expert ``e`` in layer ``l`` are a fixed pseudo-random
function of ``(l, e)``, so "every slot holds its expert's original weights" is a byte-exact
comparison. One process group per scenario (process start-up dominates the run time).
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
from dist_utils import run_ranks

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")
SLOTS_PER_RANK = 3
LAYERS = 3
# (shape of one slot's row, dtype): weights, fp8 weights, their scales, a bias
SLOT_TENSORS = [
    ((2, 5), torch.bfloat16),
    ((12,), torch.float8_e4m3fn),
    ((3,), torch.float32),
    ((1,), torch.float16),
]


# ------------------------------------------------------------------ helpers (also used by
# test_balancer.py)
def expert_bytes(layer: int, expert: int, index: int, nbytes: int) -> torch.Tensor:
    """The original bytes of tensor ``index`` of ``expert`` in ``layer``."""
    gen = torch.Generator().manual_seed(layer * 100_003 + expert * 101 + index)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def row_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()


def make_tensors(phy2log: torch.Tensor, rank: int, slots: int) -> list[list[torch.Tensor]]:
    """This rank's expert tensors for the layout ``phy2log`` [L, P]."""
    out = []
    for layer in range(phy2log.shape[0]):
        tensors = [torch.empty((slots,) + shape, dtype=dtype) for shape, dtype in SLOT_TENSORS]
        for s in range(slots):
            expert = int(phy2log[layer, rank * slots + s])
            for i, t in enumerate(tensors):
                row = t[s].reshape(-1).view(torch.uint8)
                row.copy_(expert_bytes(layer, expert, i, row.numel()))
        out.append(tensors)
    return out


def wrong_slots(tensors: list[list[torch.Tensor]], phy2log: torch.Tensor, rank: int) -> list:
    """(layer, slot, tensor) whose bytes are not the original bytes of the slot's expert."""
    bad = []
    for layer, per_layer in enumerate(tensors):
        slots = per_layer[0].shape[0]
        for s in range(slots):
            expert = int(phy2log[layer, rank * slots + s])
            for i, t in enumerate(per_layer):
                row = t[s].reshape(-1).view(torch.uint8)
                if not torch.equal(row, expert_bytes(layer, expert, i, row.numel())):
                    bad.append((layer, rank * slots + s, i))
    return bad


def random_phy2log(gen: torch.Generator, layers: int, experts: int, slots: int) -> torch.Tensor:
    rows = []
    for _ in range(layers):
        extra = torch.randint(0, experts, (slots - experts,), generator=gen)
        row = torch.cat([torch.arange(experts), extra])
        rows.append(row[torch.randperm(slots, generator=gen)])
    return torch.stack(rows)


def topology_for(world_size: int):
    from eplb_plugin.layout import Topology

    slots = SLOTS_PER_RANK * world_size
    nodes = 2 if world_size >= 4 else 1
    return Topology(slots, num_nodes=nodes, num_gpus=world_size)


def peak_allocated(fn) -> tuple[object, int]:
    """Run ``fn`` under the torch profiler; (result, peak CPU bytes allocated during it).

    The profiler records every allocation (+bytes) and free (-bytes) of the CPU allocator;
    the peak of their running sum is the extra memory ``fn`` held at its worst moment.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return result, peak


# ------------------------------------------------------------------ rank bodies
def _random_rebalances(rank: int, world_size: int, rounds: int, communicator: str) -> dict:
    from eplb_plugin.executor import Executor
    from eplb_plugin.transfer import min_staging_bytes, plan_transfer

    topo = topology_for(world_size)
    S, P = topo.slots_per_gpu, topo.num_replicas
    experts = P - world_size // 2 - 1
    gen = torch.Generator().manual_seed(1234)  # same stream on every rank
    current = random_phy2log(gen, LAYERS, experts, P)
    tensors = make_tensors(current, rank, S)
    if communicator == "deepep":
        sys.path.insert(0, FAKES)
        import deep_ep

        from eplb_plugin.comm.deepep import DeepEPCommunicator

        assert deep_ep.FAKE
        comm = DeepEPCommunicator(timeout_s=60, row_bytes=64)
    else:
        from eplb_plugin.comm.torch_dist import TorchCommunicator

        comm = TorchCommunicator(timeout_s=60)
    bps = sum(row_nbytes(shape, dtype) for shape, dtype in SLOT_TENSORS)
    # a tight budget: a layer's worth of received slots plus a little, so chunks get split
    # and exchanges take several rounds
    staging = min_staging_bytes(topo, bps) + 4 * len(SLOT_TENSORS) * 16
    ex = Executor(tensors, topo, comm, staging_bytes=staging)
    sent = received = chunks = 0
    mismatched_bytes = []
    for it in range(rounds):
        new = random_phy2log(gen, LAYERS, experts, P)
        plan = plan_transfer(current, new, topo, ex.bytes_per_slot)
        plan_sent = plan_recv = 0
        for chunk in ex.chunks(plan, it % 3):
            result = ex.run_chunk(plan, chunk)
            assert result.ok, result.error
            assert result.arena_bytes <= staging
            plan_sent += result.bytes_sent
            plan_recv += result.bytes_received
            chunks += 1
        if (plan_sent, plan_recv) != (int(plan.bytes_sent[rank]), int(plan.bytes_received[rank])):
            mismatched_bytes.append(it)
        sent += plan_sent
        received += plan_recv
        current = new
        bad = wrong_slots(tensors, current, rank)
        assert not bad, f"rebalance {it}: wrong bytes in (layer, slot, tensor) {bad[:5]}"
    return {
        "sent": sent,
        "received": received,
        "chunks": chunks,
        "mismatched_bytes": mismatched_bytes,
    }


def _peak_memory(rank: int, world_size: int) -> dict:
    """One rebalance of slots of ~8 KiB under the smallest budget, profiled chunk by chunk."""
    from eplb_plugin.comm.torch_dist import TorchCommunicator
    from eplb_plugin.executor import Executor
    from eplb_plugin.transfer import plan_transfer

    global SLOT_TENSORS
    SLOT_TENSORS = [
        ((32, 64), torch.bfloat16),
        ((4096,), torch.float8_e4m3fn),
        ((32,), torch.float32),
        ((64,), torch.float16),
    ]
    topo = topology_for(world_size)
    S, P = topo.slots_per_gpu, topo.num_replicas
    gen = torch.Generator().manual_seed(99)
    old = random_phy2log(gen, LAYERS, P - 2, P)
    new = random_phy2log(gen, LAYERS, P - 2, P)
    tensors = make_tensors(old, rank, S)
    probe = Executor(tensors, topo, TorchCommunicator(timeout_s=60), staging_bytes=1 << 30)
    staging = (S + 1) * probe.bytes_per_slot + probe.reserve_bytes  # smallest budget + 1 slot
    ex = Executor(tensors, topo, probe.comm, staging_bytes=staging)
    plan = plan_transfer(old, new, topo, ex.bytes_per_slot)
    peaks, arenas = [], []
    for chunk in ex.chunks(plan, 0):
        if rank == 0:  # the profiler costs seconds per process: measure one rank
            result, peak = peak_allocated(lambda c=chunk: ex.run_chunk(plan, c))
            peaks.append(peak)
        else:
            result = ex.run_chunk(plan, chunk)
        assert result.ok, result.error
        arenas.append(result.arena_bytes)
    return {
        "peaks": peaks,
        "arenas": arenas,
        "staging": staging,
        "bytes_per_slot": ex.bytes_per_slot,
        "correct": not wrong_slots(tensors, new, rank),
    }


def _rolled_layouts(world_size: int):
    """old: expert = slot; new: rolled by one rank, so every rank sends in every layer."""
    topo = topology_for(world_size)
    P = topo.num_replicas
    old = torch.arange(P).repeat(LAYERS, 1)
    new = torch.roll(old, SLOTS_PER_RANK, dims=1)
    return topo, old, new


def _faulty_move(rank: int, world_size: int, point: str, message: str):
    """An executor whose rank 1 raises ``message`` at fault ``point`` of layer 1, with the
    plan of the rolled move: (executor, plan, tensors, old phy2log, new phy2log)."""
    from eplb_plugin.comm.torch_dist import TorchCommunicator
    from eplb_plugin.executor import Executor
    from eplb_plugin.transfer import plan_transfer

    topo, old, new = _rolled_layouts(world_size)
    tensors = make_tensors(old, rank, topo.slots_per_gpu)

    def fault(at: str, index: int) -> None:
        if rank == 1 and at == point and index == 1:
            raise RuntimeError(message)

    ex = Executor(tensors, topo, TorchCommunicator(timeout_s=60), staging_bytes=1 << 20,
                  fault=fault)  # fmt: skip
    return ex, plan_transfer(old, new, topo, ex.bytes_per_slot), tensors, old, new


def _fault_mid_chunk(rank: int, world_size: int) -> dict:
    ex, plan, tensors, old, new = _faulty_move(rank, world_size, "pack", "injected failure")
    (chunk,) = ex.chunks(plan, 0)
    assert chunk == [0, 1, 2]
    failed = ex.run_chunk(plan, chunk)
    intact = not wrong_slots(tensors, old, rank)
    ex.fault = None  # the group is healthy: the same move now succeeds
    retried = ex.run_chunk(plan, chunk)
    return {
        "ok": failed.ok,
        "broken": failed.comm_broken,
        "error": failed.error,
        "intact": intact,
        "retry_ok": retried.ok,
        "retry_correct": not wrong_slots(tensors, new, rank),
    }


def _fail_fast(rank: int, world_size: int, point: str) -> dict:
    """Rank 1 raises once at ``point``; the others must learn it at the next vote, not after
    the collective timeout (30 s here)."""
    from eplb_plugin.comm.torch_dist import TorchCommunicator
    from eplb_plugin.executor import Executor
    from eplb_plugin.transfer import plan_transfer

    topo, old, new = _rolled_layouts(world_size)
    tensors = make_tensors(old, rank, topo.slots_per_gpu)
    raised = []

    def fault(at: str, index: int) -> None:
        if rank == 1 and at == point and not raised:
            raised.append(index)
            raise RuntimeError(f"injected {point} failure")

    comm = TorchCommunicator(timeout_s=30)
    ex = Executor(tensors, topo, comm, staging_bytes=1 << 20, fault=fault)
    plan = plan_transfer(old, new, topo, ex.bytes_per_slot)
    failed = ex.run_chunk(plan, [0, 1, 2])
    intact = not wrong_slots(tensors, old, rank)
    retried = ex.run_chunk(plan, [0, 1, 2])
    return {
        "ok": failed.ok, "broken": failed.comm_broken or comm.broken, "error": failed.error,
        "seconds": failed.seconds, "intact": intact, "retry_ok": retried.ok,
        "retry_correct": not wrong_slots(tensors, new, rank),
    }  # fmt: skip


def _fault_in_commit(rank: int, world_size: int) -> dict:
    ex, plan, *_ = _faulty_move(rank, world_size, "commit", "injected commit failure")
    result = ex.run_chunk(plan, [0, 1, 2])
    return {"ok": result.ok, "inconsistent": result.inconsistent, "error": result.error}


def _nccl_group_gets_gloo_control(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from eplb_plugin.comm.torch_dist import TorchCommunicator

    real = dist.get_backend
    # the world group stands in for an NCCL group (no GPU here); any new group is real gloo
    dist.get_backend = lambda group=None: (
        "nccl" if group in (None, dist.group.WORLD) else real(group)
    )
    try:
        comm = TorchCommunicator(timeout_s=30)
        voted = comm.agree(rank == 0)
        backend = real(comm.control_group)
    finally:
        dist.get_backend = real
    return {"own": comm.control_group is not dist.group.WORLD, "backend": str(backend),
            "voted": voted, "device": str(comm.device)}  # fmt: skip


def _never_answers(rank: int, world_size: int) -> dict:
    from eplb_plugin.comm.torch_dist import TorchCommunicator
    from eplb_plugin.executor import Executor
    from eplb_plugin.transfer import plan_transfer

    topo, old, new = _rolled_layouts(world_size)
    tensors = make_tensors(old, rank, topo.slots_per_gpu)

    def fault(point: str, index: int) -> None:
        if rank == 1 and point == "exchange":
            time.sleep(3.0)  # three times the timeout: the others must give up, not hang

    comm = TorchCommunicator(timeout_s=1.0)
    ex = Executor(tensors, topo, comm, staging_bytes=1 << 20, fault=fault)
    plan = plan_transfer(old, new, topo, ex.bytes_per_slot)
    result = ex.run_chunk(plan, [0, 1, 2])
    return {
        "ok": result.ok,
        "broken": result.comm_broken and comm.broken,
        "error": result.error,
        "intact": not wrong_slots(tensors, old, rank),
    }


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_100_random_rebalances_keep_every_slot_exact(world_size):
    results = run_ranks(
        _random_rebalances, world_size, 100, "torch", timeout=240, env={"EPLB_KERNELS": "torch"}
    )
    for rank, r in enumerate(results):
        assert r["mismatched_bytes"] == [], f"rank {rank}: bytes differ from the plan"
    assert sum(r["sent"] for r in results) == sum(r["received"] for r in results) > 0
    assert len({r["chunks"] for r in results}) == 1  # every rank ran the same chunks


def test_peak_extra_memory_stays_within_the_staging_budget():
    results = run_ranks(_peak_memory, 4, timeout=120, env={"EPLB_KERNELS": "torch"})
    for r in results:
        assert r["correct"]
        assert len(r["arenas"]) > 1  # the budget forced several chunks
        assert max(r["arenas"]) <= r["staging"]
    # on rank 0, measured: the arena, and nothing else of slot size (index tensors only)
    r = results[0]
    for peak, arena in zip(r["peaks"], r["arenas"]):
        assert arena <= peak <= r["staging"] + 1024 < r["staging"] + r["bytes_per_slot"]


def test_rebalances_through_deepep_fake():
    results = run_ranks(_random_rebalances, 2, 10, "deepep", timeout=120)
    assert all(r["mismatched_bytes"] == [] for r in results)
    assert sum(r["sent"] for r in results) > 0


def test_failure_mid_chunk_keeps_every_rank_on_old_weights():
    results = run_ranks(_fault_mid_chunk, 4, timeout=120)
    for rank, r in enumerate(results):
        assert not r["ok"] and not r["broken"], (rank, r)
        assert r["intact"], f"rank {rank} weights changed by a failed chunk"
        assert r["retry_ok"] and r["retry_correct"], (rank, r)
    assert "rank 1" in results[1]["error"] and "layer 1" in results[1]["error"]
    assert "injected failure" in results[1]["error"]
    assert all("another rank failed" in r["error"] for i, r in enumerate(results) if i != 1)


@pytest.mark.parametrize("point", ["stage", "exchange"])
def test_a_local_failure_is_told_to_the_peers_at_once(point):
    # before: an exchange that raised on one rank left its peers inside the all_to_all until
    # the 30 s timeout, which then broke the group and disabled rebalancing for good
    results = run_ranks(_fail_fast, 3, point, timeout=120, env={"EPLB_KERNELS": "torch"})
    for rank, r in enumerate(results):
        assert not r["ok"] and not r["broken"], (rank, r)
        assert r["intact"], f"rank {rank} weights changed by a failed chunk"
        assert r["retry_ok"] and r["retry_correct"], (rank, r)
        # far below the 30 s collective timeout the peers waited before
        assert r["seconds"] < 15, (rank, r["seconds"])
    assert f"injected {point} failure" in results[1]["error"]
    assert all("another rank failed" in results[i]["error"] for i in (0, 2))


def test_failure_while_committing_is_reported_as_inconsistent_on_every_rank():
    # after the vote the commit overwrites slots in place: no rank may go on believing its
    # own layout (old or new) matches what its peers serve
    results = run_ranks(_fault_in_commit, 3, timeout=120)
    for rank, r in enumerate(results):
        assert not r["ok"] and r["inconsistent"], (rank, r)
        assert "serving must stop" in r["error"] and "keeping the old" not in r["error"]
    assert "rank 1" in results[1]["error"] and "committing layer 1" in results[1]["error"]
    assert "injected commit failure" in results[1]["error"]
    assert all("another rank failed while committing" in results[i]["error"] for i in (0, 2))


def test_an_nccl_group_gets_a_gloo_control_group_so_timeouts_apply():
    for r in run_ranks(_nccl_group_gets_gloo_control, 2, timeout=90):
        assert r == {"own": True, "backend": "gloo", "voted": False, "device": "cpu"}


def test_rank_that_never_answers_times_out_instead_of_hanging():
    results = run_ranks(_never_answers, 3, timeout=90, pg_timeout=30)
    for rank, r in enumerate(results):
        assert not r["ok"] and r["broken"], (rank, r)
        assert r["intact"], f"rank {rank} weights changed by a timed-out chunk"
    assert "timed out" in results[0]["error"] and "timed out" in results[2]["error"]
