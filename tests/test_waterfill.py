"""waterfill_shares: valid shares, near-optimal GPU balance, static shapes, determinism."""

from __future__ import annotations

import collections

import pytest
import torch

from eplb_plugin import ExpertLayout, Topology, plan
from eplb_plugin.kernels.waterfill import MOMENTUM, waterfill_shares

# plain damped sweeps and heavy-ball momentum
MOMENTA = (0.0, 0.3)


def _call(
    layout: ExpertLayout, counts: torch.Tensor, iters: int = 8, momentum: float = MOMENTUM
) -> torch.Tensor:
    return waterfill_shares(
        counts.float(), layout.phy2log, layout.log2phy, layout.logcnt,
        layout.topology.slots_per_gpu, layout.replica_share, iters, momentum=momentum,
    )  # fmt: skip


def _gpu_loads(layout: ExpertLayout, counts: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    slots = counts.double().gather(1, layout.phy2log) * share.double()
    return slots.view(layout.num_layers, layout.topology.num_gpus, -1).sum(-1)


def _feasible(level: float, fixed: list[float], edges: list[list[int]], loads: list[float]) -> bool:
    """Max-flow test: can the replicated loads be split so that no GPU exceeds ``level``?"""
    num_gpus, num_exp = len(fixed), len(loads)
    if any(f > level + 1e-9 for f in fixed):
        return False
    source, sink = num_exp + num_gpus, num_exp + num_gpus + 1
    cap: dict[tuple[int, int], float] = collections.defaultdict(float)
    adj: dict[int, set[int]] = collections.defaultdict(set)

    def add(u: int, v: int, c: float) -> None:
        cap[u, v] += c
        adj[u].add(v)
        adj[v].add(u)

    for e, (load, gpus) in enumerate(zip(loads, edges)):
        add(source, e, load)
        for g in gpus:
            add(e, num_exp + g, float("inf"))
    for g in range(num_gpus):
        add(num_exp + g, sink, level - fixed[g])
    flow = 0.0
    while True:
        parent = {source: source}
        queue = collections.deque([source])
        while queue and sink not in parent:
            u = queue.popleft()
            for v in adj[u]:
                if v not in parent and cap[u, v] > 1e-12:
                    parent[v] = u
                    queue.append(v)
        if sink not in parent:
            return flow >= sum(loads) * (1 - 1e-9)
        path, v = [], sink
        while v != source:
            path.append((parent[v], v))
            v = parent[v]
        push = min(cap[e] for e in path)
        for u, v in path:
            cap[u, v] -= push
            cap[v, u] += push
        flow += push


def _optimal_peak(phy2log: list[int], counts: list[float], slots_per_gpu: int) -> float:
    """Smallest achievable largest GPU load of one layer, by bisection on max-flow."""
    num_gpus = len(phy2log) // slots_per_gpu
    fixed, edges, loads = [0.0] * num_gpus, [], []
    for e, c in enumerate(counts):
        gpus = sorted({p // slots_per_gpu for p, x in enumerate(phy2log) if x == e})
        if len(gpus) == 1:
            fixed[gpus[0]] += c
        else:
            edges.append(gpus)
            loads.append(c)
    lo, hi = max(max(fixed), sum(counts) / num_gpus), max(fixed) + sum(loads)
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _feasible(mid, fixed, edges, loads) else (mid, hi)
    return hi


def _random_case(seed: int, num_layers: int = 3, num_experts: int = 16, num_slots: int = 24,
                 num_gpus: int = 6) -> tuple[ExpertLayout, torch.Tensor]:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    planned = torch.rand(num_layers, num_experts, generator=gen) ** 2 * 100
    layout = plan(planned, Topology(num_slots, 1, 1, num_gpus), policy="deepseek")
    # the step's counts differ from the load the layout was planned on
    counts = (planned * (0.4 + 1.2 * torch.rand(planned.shape, generator=gen))).round()
    return layout, counts


def test_replicated_expert_evens_two_gpus() -> None:
    # GPU 0: experts 0 (10) and 2 (shared); GPU 1: experts 1 (2) and 2 (shared)
    layout = ExpertLayout.from_phy2log(torch.tensor([[0, 2, 1, 2]]), Topology(4, 1, 1, 2))
    share = _call(layout, torch.tensor([[10.0, 2.0, 12.0]]))
    loads = _gpu_loads(layout, torch.tensor([[10.0, 2.0, 12.0]]), share)
    assert loads[0].tolist() == pytest.approx([12.0, 12.0], abs=1e-3)
    assert share[0, 1].item() == pytest.approx(2 / 12, abs=1e-4)
    # alone on its GPUs it lands in one sweep, and momentum does not kick it off again
    for momentum in MOMENTA:
        first = _call(layout, torch.tensor([[10.0, 2.0, 12.0]]), 1, momentum)
        later = _call(layout, torch.tensor([[10.0, 2.0, 12.0]]), 8, momentum)
        torch.testing.assert_close(later, first, atol=1e-6, rtol=0)


@pytest.mark.parametrize("momentum", MOMENTA)
def test_shares_are_valid_and_singles_keep_one(momentum: float) -> None:
    for seed in range(5):
        layout, counts = _random_case(seed)
        share = _call(layout, counts, momentum=momentum)
        assert share.dtype == torch.float32 and share.shape == layout.phy2log.shape
        assert (share >= 0).all()
        layout.with_share(share)  # validates: per expert the shares sum to 1
        single = layout.logcnt.gather(1, layout.phy2log) == 1
        assert torch.equal(share[single], torch.ones_like(share[single]))


@pytest.mark.parametrize("momentum", MOMENTA)
def test_idle_experts_keep_base_share(momentum: float) -> None:
    layout, counts = _random_case(7)
    base = layout.replica_share.clone()
    replicated = layout.logcnt.argmax(1)  # one replicated expert per layer
    counts[torch.arange(layout.num_layers), replicated] = 0
    base_custom = base.clone()
    share = _call(layout.with_share(base_custom), counts, momentum=momentum)
    for layer in range(layout.num_layers):
        slots = layout.phy2log[layer] == replicated[layer]
        assert torch.allclose(share[layer, slots], base[layer, slots], atol=1e-6)


@pytest.mark.parametrize("momentum", MOMENTA)
def test_near_optimal_peak_and_never_worse_than_base(momentum: float) -> None:
    excess = []
    for seed in range(8):
        layout, counts = _random_case(seed)
        share = _call(layout, counts, iters=16, momentum=momentum)
        peak = _gpu_loads(layout, counts, share).amax(-1)
        base_peak = _gpu_loads(layout, counts, layout.replica_share).amax(-1)
        for layer in range(layout.num_layers):
            best = _optimal_peak(layout.phy2log[layer].tolist(), counts[layer].tolist(), 4)
            assert peak[layer] >= best * (1 - 1e-4)  # the optimum really is a lower bound
            assert peak[layer] <= base_peak[layer] * (1 + 1e-4)
            excess.append(peak[layer].item() / best - 1)
    assert max(excess) < 0.05
    assert sum(excess) / len(excess) < 0.01


@pytest.mark.parametrize("momentum", MOMENTA)
def test_replicas_on_one_gpu_split_evenly(momentum: float) -> None:
    # expert 0 twice on GPU 0 and once on GPU 1
    layout = ExpertLayout.from_phy2log(torch.tensor([[0, 0, 1, 0]]), Topology(4, 1, 1, 2))
    counts = torch.tensor([[30.0, 6.0]])
    share = _call(layout, counts, iters=16, momentum=momentum)
    assert share[0, 0].item() == pytest.approx(share[0, 1].item(), abs=1e-6)
    assert _gpu_loads(layout, counts, share)[0].tolist() == pytest.approx([18.0, 18.0], rel=1e-3)


def test_layers_independent_and_deterministic() -> None:
    layout, counts = _random_case(3, num_layers=4)
    share = _call(layout, counts)
    assert torch.equal(share, _call(layout, counts))
    for layer in range(layout.num_layers):
        assert torch.allclose(_call(layout.layer(layer), counts[layer : layer + 1]), share[layer])


def test_momentum_reaches_the_optimum_sooner() -> None:
    """Heavy-ball steps cross the crowded GPUs' many small damped steps faster: after 4 and
    8 sweeps the peaks are closer to the optimum than the plain sweeps', and at 32 sweeps
    both have settled on it (no oscillation left)."""
    plain, heavy = [], []
    for seed in range(8):
        layout, counts = _random_case(seed)
        best = torch.tensor(
            [_optimal_peak(layout.phy2log[x].tolist(), counts[x].tolist(), 4)
             for x in range(layout.num_layers)], dtype=torch.float64,
        )  # fmt: skip
        for momentum, out in ((0.0, plain), (0.3, heavy)):
            for iters in (4, 8, 32):
                peak = _gpu_loads(layout, counts, _call(layout, counts, iters, momentum)).amax(-1)
                out.append((iters, (peak / best - 1).mean().item()))
    mean = {(m, k): sum(e for i, e in out if i == k) / 8 for m, out in ((0, plain), (1, heavy))
            for k in (4, 8, 32)}  # fmt: skip
    assert mean[1, 4] < mean[0, 4] and mean[1, 8] < 0.5 * mean[0, 8]
    assert mean[0, 32] < 2e-3 and mean[1, 32] < 2e-3


def test_momentum_out_of_range_raises() -> None:
    layout, counts = _random_case(0)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="momentum"):
            _call(layout, counts, momentum=bad)


def test_zero_iters_returns_base() -> None:
    layout, counts = _random_case(2)
    assert torch.equal(_call(layout, counts, iters=0), layout.replica_share)


def test_static_shapes_without_host_sync() -> None:
    # meta tensors have no data: any .item(), nonzero or data-dependent shape would raise
    layout, counts = _random_case(1)
    meta = [t.to("meta") for t in (counts, layout.phy2log, layout.log2phy, layout.logcnt)]
    share = waterfill_shares(*meta, 4, layout.replica_share.to("meta"), 8)
    assert share.shape == layout.phy2log.shape and share.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    layout, counts = _random_case(4)
    cuda = [t.cuda() for t in (counts, layout.phy2log, layout.log2phy, layout.logcnt)]
    share = waterfill_shares(*cuda, 4, layout.replica_share.cuda(), 8)
    assert share.device.type == "cuda"
    assert torch.allclose(share.cpu(), _call(layout, counts), atol=1e-5)
