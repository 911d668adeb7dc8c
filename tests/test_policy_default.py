"""The default policy and its building blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb_plugin import ExpertLayout, Topology, plan, rebalance_experts, slot_loads
from eplb_plugin.dispatch import gpu_loads_of
from eplb_plugin.layout import uniform_share
from eplb_plugin.policies import get_policy
from eplb_plugin.policies.default import DefaultPolicyConfig, default_policy, forecast
from eplb_plugin.policies.group_packing import (
    _equal_partitions,
    pack_groups,
    partitions_peak_bound,
)
from eplb_plugin.policies.migration import align_to_previous, choose_plans, repair_counts
from eplb_plugin.policies.placement import bldm_pack, replica_counts
from eplb_plugin.policies.refine import refine_swaps, repartition_pairs


def _load(layers: int, experts: int, seed: int, sigma: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.exp(torch.randn(layers, experts, generator=gen) * sigma)
    probs = popularity / popularity.sum(-1, keepdim=True)
    rows = [torch.multinomial(p, 20000, True, generator=gen) for p in probs]
    return torch.stack([torch.bincount(r, minlength=experts) for r in rows]).float()


def _uniform(layout: ExpertLayout) -> ExpertLayout:
    return layout.with_share(uniform_share(layout.phy2log, layout.logcnt))


def _components(layout: ExpertLayout, layer: int) -> int:
    """Connected components of GPUs linked by the replicas of replicated experts."""
    spg, gpus = layout.topology.slots_per_gpu, layout.topology.num_gpus
    parent = list(range(gpus))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for e in range(layout.num_experts):
        slots = (layout.phy2log[layer] == e).nonzero().flatten().tolist()
        for s in slots[1:]:
            parent[find(s // spg)] = find(slots[0] // spg)
    return len({find(g) for g in range(gpus)})


TOPOLOGIES = [
    Topology(80, 1, 1, 16),
    Topology(96, 4, 2, 16),  # hierarchical
    Topology(72, 3, 2, 8),  # groups do not divide over nodes: global placement
]


def test_registered_as_default_and_deepseek_kept() -> None:
    assert get_policy("default") is default_policy
    assert get_policy("deepseek") is not default_policy


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("dispatch", ["static", "local", "global"])
def test_valid_layout_for_every_mode(topology: Topology, dispatch: str) -> None:
    weight = _load(3, 48, seed=1)
    layout = plan(weight, topology, "default", dispatch=dispatch)
    layout.validate()
    assert layout.topology == topology and layout.num_experts == 48
    assert int(layout.logcnt.min()) >= 1
    if dispatch != "static":
        # replicas of one expert share a GPU only when it has more replicas than GPUs
        hierarchical = topology.hierarchical and topology.num_nodes > 1
        gpus = topology.gpus_per_node if hierarchical else topology.num_gpus
        for layer in range(layout.num_layers):
            for row in layout.phy2log[layer].view(topology.num_gpus, -1).tolist():
                for expert in set(row):
                    if row.count(expert) > 1:
                        assert layout.logcnt[layer, expert] > gpus


def test_deterministic() -> None:
    weight = _load(4, 64, seed=2)
    a = plan(weight, Topology(80, 1, 1, 16), "default", dispatch="global")
    b = plan(weight, Topology(80, 1, 1, 16), "default", dispatch="global")
    assert a.equals(b)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("topology", [Topology(320, 1, 1, 64), Topology(288, 8, 4, 32)])
def test_static_uniform_at_least_deepseek(seed: int, topology: Topology) -> None:
    weight = _load(6, 256, seed=seed, sigma=0.5 + 0.25 * seed)
    ours = _uniform(plan(weight, topology, "default")).balancedness(weight)
    deepseek = plan(weight, topology, "deepseek").balancedness(weight)
    assert ours >= deepseek - 1e-9


def test_global_placement_static_uniform_near_perfect() -> None:
    weight = _load(4, 256, seed=5, sigma=0.5)
    layout = plan(weight, Topology(320, 1, 1, 64), "default")
    assert _uniform(layout).balancedness(weight) > 0.995


def test_hierarchical_keeps_groups_on_nodes_and_reaches_the_partition_bound() -> None:
    topology = Topology(288, 8, 4, 32)
    weight = _load(4, 256, seed=3, sigma=1.0)
    layout = plan(weight, topology, "default")
    node = layout.phy2log.new_tensor(range(topology.num_replicas)) // topology.slots_per_node
    for layer in range(layout.num_layers):
        nodes_of_group = {}
        for slot, expert in enumerate(layout.phy2log[layer].tolist()):
            nodes_of_group.setdefault(expert // 32, set()).add(int(node[slot]))
        assert all(len(v) == 1 for v in nodes_of_group.values())
    groups = weight.double().numpy().reshape(4, 8, 32).sum(-1)
    bound = weight.double().sum(1).numpy() / 4 / partitions_peak_bound(groups, 4)
    ratio = layout.gpu_loads(weight)
    achieved = (ratio.mean(-1) / ratio.amax(-1)).numpy()
    assert (achieved <= bound + 1e-9).all()
    assert (achieved >= bound - 0.005).all()


@pytest.mark.parametrize("dispatch", ["local", "global"])
def test_water_filling_modes_connect_the_gpus(dispatch: str) -> None:
    topology = Topology(80, 1, 1, 16)  # 16 redundant slots: enough edges for a spanning tree
    weight = _load(4, 64, seed=4)
    layout = plan(weight, topology, "default", dispatch=dispatch)
    assert all(_components(layout, layer) == 1 for layer in range(layout.num_layers))
    deepseek = plan(weight, topology, "deepseek")
    ours = gpu_loads_of(layout, slot_loads(layout, weight, "global"))
    theirs = gpu_loads_of(deepseek, slot_loads(deepseek, weight, "global"))
    assert (ours.mean(-1) / ours.amax(-1)).mean() >= (theirs.mean(-1) / theirs.amax(-1)).mean()
    # planned on the exact load (no prior), water-filling evens it almost perfectly
    exact = plan(weight, topology, "default", dispatch=dispatch, prior=0.0)
    gpu = gpu_loads_of(exact, slot_loads(exact, weight, "global"))
    assert (gpu.mean(-1) / gpu.amax(-1)).min() > 0.99


def test_phase_presets() -> None:
    topology = Topology(96, 4, 2, 16)
    weight = _load(2, 48, seed=6)
    prefill = plan(weight, topology, "default", phase="prefill")
    decode = plan(weight, topology, "default", phase="decode")

    def spans_nodes(layout: ExpertLayout) -> bool:
        node = torch.arange(96) // topology.slots_per_node
        group_nodes = [set() for _ in range(4)]
        for slot, expert in enumerate(layout.phy2log[0].tolist()):
            group_nodes[expert // 12].add(int(node[slot]))
        return any(len(s) > 1 for s in group_nodes)

    assert not spans_nodes(prefill)
    assert spans_nodes(decode)
    with pytest.raises(ValueError, match="prefill"):
        plan(weight, Topology(72, 3, 2, 8), "default", phase="prefill")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dispatch": "fast"}, "dispatch"),
        ({"phase": "train"}, "phase"),
        ({"recency": -1.0}, "recency"),
        ({"prior": "x"}, "prior"),
        ({"shares": "odd"}, "shares"),
        ({"refine_rounds": -2}, "refine_rounds"),
        ({"max_moved": 1.5}, "max_moved"),
        ({"migration_cost": -1}, "migration_cost"),
        ({"migration_cost": float("inf")}, "migration_cost must be a finite"),
        ({"recency": float("nan")}, "recency"),
        ({"threads": -1}, "threads"),
        ({"spread": -0.5}, "spread"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        plan(_load(1, 16, seed=0), Topology(20, 1, 1, 4), "default", **options)


def test_planning_bounds_torch_threads_and_restores_them() -> None:
    seen = []
    before = torch.get_num_threads()
    original = torch.set_num_threads

    def spy(count: int) -> None:
        seen.append(count)
        original(count)

    torch.set_num_threads = spy
    try:
        torch.set_num_threads(2)
        seen.clear()
        plan(_load(1, 16, seed=0), Topology(20, 1, 1, 4), "default", threads=1)
        assert seen == [1, 2] and torch.get_num_threads() == 2
        seen.clear()
        plan(_load(1, 16, seed=0), Topology(20, 1, 1, 4), "default", threads=0)
        assert seen == []
    finally:
        torch.set_num_threads = original
        original(before)


def test_prior_depends_on_dispatch() -> None:
    assert DefaultPolicyConfig(dispatch="static").prior == 0.0
    assert DefaultPolicyConfig(dispatch="global").prior == 0.5
    assert DefaultPolicyConfig(dispatch="global", prior=0.0).prior == 0.0
    assert DefaultPolicyConfig(dispatch="static").spread == 0.5
    assert DefaultPolicyConfig(dispatch="local").spread == 0.0


def test_forecast_spread_adds_the_per_step_deviation() -> None:
    steps = torch.zeros(2, 1, 2)
    steps[:, 0, 0] = torch.tensor([4.0, 4.0])  # steady expert
    steps[:, 0, 1] = torch.tensor([0.0, 8.0])  # same total, jumps between steps
    config = DefaultPolicyConfig(recency=0.0, prior=0.0, spread=0.5)
    load = forecast(steps.sum(0), steps, config)
    # population std of [0, 8] is 4, on the window's scale (2 steps): + 0.5 * 4 * 2
    assert load.tolist() == [[8.0, 12.0]]
    without = forecast(steps.sum(0), None, config)  # no per-step loads: nothing to add
    assert without.tolist() == [[8.0, 8.0]]


def test_forecast_weighs_recent_steps_and_adds_prior() -> None:
    steps = torch.zeros(3, 1, 2)
    steps[0, 0, 0] = 10.0  # old step: expert 0
    steps[1, 0] = 5.0
    steps[2, 0, 1] = 10.0  # newest step: expert 1
    config = DefaultPolicyConfig(recency=1.0, prior=0.0, spread=0.0)
    load = forecast(steps.sum(0), steps, config)
    assert load[0, 1] > load[0, 0] > 0
    assert load.sum() == pytest.approx(30.0)  # steps of equal size: scaled like their sum
    flat = forecast(steps.sum(0), steps, DefaultPolicyConfig(recency=0.0, prior=0.5, spread=0))
    assert flat.tolist() == [[22.5, 22.5]]


def test_balanced_shares_even_the_forecast() -> None:
    weight = _load(3, 64, seed=7)
    topology = Topology(80, 1, 1, 16)
    uniform = plan(weight, topology, "default", shares="uniform")
    balanced = plan(weight, topology, "default", shares="balanced")
    assert torch.equal(uniform.phy2log, balanced.phy2log)
    assert balanced.balancedness(weight) >= uniform.balancedness(weight)


def test_rebalance_experts_drop_in() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(_load(2, 16, seed=1), 24, 4, 2, 4)
    assert phy2log.shape == (2, 24) and logcnt.sum(1).tolist() == [24, 24]
    assert log2phy.shape[:2] == (2, 16)


# ---------------------------------------------------------------------- building blocks
def test_replica_counts_is_deepseeks_greedy() -> None:
    weight = np.array([[10.0, 1.0, 4.0, 3.0]])
    assert replica_counts(weight, 7).tolist() == [[3, 1, 2, 1]]


def _greedy_counts(weight: np.ndarray, num_slots: int) -> np.ndarray:
    logcnt = np.ones(weight.shape, dtype=np.int64)
    for _ in range(num_slots - weight.shape[1]):
        logcnt[np.arange(weight.shape[0]), (weight / logcnt).argmax(-1)] += 1
    return logcnt


@pytest.mark.parametrize("kind", ["lognormal", "ties", "zeros", "wide"])
def test_replica_counts_bisection_equals_the_greedy_loop(kind: str) -> None:
    # many redundant slots take the bisection path; ties and zero loads must still be
    # broken as the greedy breaks them (lowest expert first)
    rng = np.random.default_rng({"lognormal": 0, "ties": 1, "zeros": 2, "wide": 3}[kind])
    for _ in range(20):
        rows, experts = int(rng.integers(1, 5)), int(rng.integers(2, 60))
        slots = experts + int(rng.integers(9, 3 * experts + 10))
        shape = (rows, experts)
        if kind == "lognormal":
            weight = rng.lognormal(0, 1, shape)
        elif kind == "ties":
            weight = rng.integers(0, 4, shape).astype(float)
        elif kind == "zeros":
            weight = np.zeros(shape)
        else:
            weight = np.round(rng.lognormal(0, 2, shape) * 3)
        assert np.array_equal(replica_counts(weight, slots), _greedy_counts(weight, slots))


def test_bldm_gives_every_gpu_the_same_count_and_beats_sorted_dealing() -> None:
    rng = np.random.default_rng(0)
    items = rng.lognormal(0, 1, size=(20, 64))
    gpu = bldm_pack(items, 8)
    assert (np.stack([np.bincount(g, minlength=8) for g in gpu]) == 8).all()
    loads = np.stack([np.bincount(g, w, minlength=8) for g, w in zip(gpu, items)])
    # naive: sorted items dealt round-robin
    naive = np.stack([np.bincount(np.argsort(np.argsort(-w)) % 8, w, 8) for w in items])
    assert (loads.max(1) <= naive.max(1) + 1e-9).mean() > 0.9
    assert loads.max(1).mean() < naive.max(1).mean()


def test_refinements_never_raise_the_peak() -> None:
    rng = np.random.default_rng(1)
    place = np.tile(np.arange(40).reshape(1, 8, 5), (6, 1, 1))
    slot_load = rng.lognormal(0, 1, size=(6, 8, 5))
    before = slot_load.sum(-1).max(-1)
    a_place, a_load = place.copy(), slot_load.copy()
    movable = np.ones(place.shape, dtype=bool)
    refine_swaps(a_place, a_load, movable, np.zeros(place.shape, dtype=bool), 16)
    assert (a_load.sum(-1).max(-1) <= before + 1e-9).all()
    assert np.allclose(np.sort(a_load.ravel()), np.sort(slot_load.ravel()))
    b_place, b_load = place.copy(), slot_load.copy()
    repartition_pairs(b_place, b_load, 8)
    assert (b_load.sum(-1).max(-1) <= before + 1e-9).all()
    # experts travel with their loads
    lookup = dict(zip(place[0].ravel().tolist(), slot_load[0].ravel().tolist()))
    assert all(lookup[e] == v for e, v in zip(b_place[0].ravel(), b_load[0].ravel()))


def test_immovable_slots_stay() -> None:
    rng = np.random.default_rng(2)
    place = np.tile(np.arange(20).reshape(1, 4, 5), (3, 1, 1))
    slot_load = rng.lognormal(0, 1, size=(3, 4, 5))
    movable = rng.random((3, 4, 5)) < 0.5
    new_place = place.copy()
    refine_swaps(new_place, slot_load.copy(), movable.copy(), np.zeros_like(movable), 16)
    assert np.array_equal(new_place[~movable], place[~movable])


def test_pack_groups_is_optimal_when_exhaustive() -> None:
    rng = np.random.default_rng(3)
    group_load = rng.lognormal(0, 1, size=(10, 8))
    node = pack_groups(group_load, 4)
    peak = np.stack([np.bincount(n, w, 4) for n, w in zip(node, group_load)]).max(1)
    assert np.allclose(peak, partitions_peak_bound(group_load, 4))
    assert len(_equal_partitions(8, 4)) == 105
    # the greedy + swap path (too many partitions to enumerate) stays feasible and close
    big = rng.lognormal(0, 1, size=(5, 16))
    node = pack_groups(big, 4, max_exhaustive=10)
    counts = np.stack([np.bincount(n, minlength=4) for n in node])
    assert (counts == 4).all()


# ---------------------------------------------------------------------- migration
def test_align_recovers_a_relabelled_layout() -> None:
    layout = plan(_load(3, 64, seed=8), Topology(80, 1, 1, 16), "default", dispatch="global")
    old = layout.phy2log.numpy()
    gpus = old.reshape(3, 16, 5)[:, np.random.default_rng(0).permutation(16)]
    shuffled = gpus[:, :, ::-1].reshape(3, 80)
    aligned = align_to_previous(shuffled, old, layout.topology)
    assert np.array_equal(aligned, old)


def test_choose_plans_respects_cost_and_budget() -> None:
    # candidate 0: cheap repairs, candidate 1: full re-plans; 4 layers of 100 slots
    benefit = np.array([[1.0, 0.5, 2.0, -1.0], [5.0, 1.0, 3.0, -1.0]])
    moved = np.array([[2, 2, 2, 2], [40, 10, 40, 5]])
    choice = choose_plans(benefit, moved, 100, cost=0.0, budget=0.2)  # room: 80 slots
    assert choice.tolist() == [1, -1, 1, -1]  # largest gains first, while they fit
    assert choose_plans(benefit, moved, 100, cost=0.0, budget=1.0).tolist() == [1, 1, 1, -1]
    assert (choose_plans(benefit, moved, 100, cost=600.0, budget=1.0) == -1).all()
    assert (choose_plans(benefit, moved, 100, cost=0.0, budget=0.0) == -1).all()


def test_repair_counts_moves_replicas_to_the_new_hot_expert() -> None:
    old = np.array([[0, 1, 2, 0, 3, 1, 2, 3]])  # 2 replicas each, 4 GPUs of 2 slots
    load = np.array([[100.0, 1.0, 1.0, 1.0]])
    topology = Topology(8, 1, 1, 4)
    new = repair_counts(old, load, topology, hierarchical=False)
    assert (new == 0).sum() == 4  # one per GPU: the most a GPU-distinct placement gives
    assert all(len(set(row)) == 2 for row in new.reshape(4, 2).tolist())
    assert np.bincount(new[0], minlength=4).min() >= 1  # every expert keeps a slot


def test_migration_aware_plan_moves_within_budget() -> None:
    topology = Topology(80, 1, 1, 16)
    first = plan(_load(8, 64, seed=9), topology, "default", dispatch="global")
    later = _load(8, 64, seed=10)  # a different load: from scratch moves most slots
    scratch = plan(later, topology, "default", previous=first, dispatch="global")
    assert scratch.diff(first).float().mean() > 0.3
    capped = plan(later, topology, "default", previous=first, dispatch="global", max_moved=0.2)
    assert capped.diff(first).float().mean() <= 0.2
    frozen = plan(later, topology, "default", previous=first, dispatch="global", max_moved=0.0)
    assert torch.equal(frozen.phy2log, first.phy2log)
    assert _uniform(capped).balancedness(later) >= _uniform(frozen).balancedness(later)
