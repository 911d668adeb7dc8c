"""The default policy: placement for the dispatch mode in use, robust to shifting loads.

What it optimizes, step by step (rows are layers, or layers x nodes when hierarchical):

1. **Forecast.** The load the plan is made for is the window's per-step counts weighted
   towards the newest steps (``recency``: half-life in steps), plus a ``prior`` pseudo-load
   on every expert (a fraction of the layer's mean expert load). Loads drift between the
   window and the steps that use the plan; both terms hedge against that drift instead of
   fitting the window exactly.
2. **Replica counts**: each redundant slot to the expert with the highest forecast load per
   replica (DeepSeek's rule).
3. **Replicated experts first**, heaviest replica first, each replica on a different GPU.
   For ``local``/``global`` dispatch the replicas are also chained so that they connect the
   GPUs into one graph (each further replica goes to a GPU its expert does not reach yet):
   water-filling can then move load between any two GPUs, which is what evens out the
   steps' fluctuations. With DeepSeek's placement the replicas of the hot experts often
   cluster, and several GPUs hold no replicated expert at all.
4. **Single experts** dealt heaviest first to the lightest GPUs (batched LPT), then
   **refinement**: swaps between the most loaded GPU and the lightest ones while that
   lowers the peak (only singles move in ``local``/``global`` mode, keeping the graph).
5. **Shares**: ``replica_share`` is water-filled on the forecast (``shares="balanced"``), so
   even static dispatch splits an expert's tokens where they even out the forecast; or
   uniform (``shares="uniform"``), DeepSeek's equal split.

Hierarchical placement (groups of experts kept within a node) first assigns groups to nodes,
exhaustively when the partitions are few (8 groups on 4 nodes: 105) so that no assignment
has a lighter most-loaded node, then runs 2-5 per node. ``phase="prefill"`` asks for it,
``phase="decode"`` for global placement; by default DeepSeek's rule picks (hierarchical
when the groups divide evenly over the nodes).

With ``previous=`` the plan is migration-aware (:func:`plan_with_migration`, its tools in
:mod:`.migration`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..dispatch import DISPATCH_MODES
from ..layout import ExpertLayout, Topology
from .group_packing import pack_groups
from .migration import align_to_previous, choose_plans, layer_balancedness, repair_counts
from .placement import (
    _items,
    argsort_stable,
    bldm_pack,
    place_replicated,
    place_singles,
    replica_counts,
    take_rows,
)
from .refine import pair_splits, refine_swaps, repartition_pairs

PHASES = ("prefill", "decode")
SHARES = ("balanced", "uniform")
# water-fill sweeps for the planned shares: off the hot path, so converge further
PLAN_WATERFILL_ITERS = 32
# largest pair split search (per pair of GPUs) worth its cost: up to 5 slots per GPU
MAX_SPLITS = 256


@dataclass(frozen=True)
class DefaultPolicyConfig:
    """Options of the default policy (``plan(..., policy="default", **options)``).

    Attributes:
        dispatch: the dispatch mode the layout will serve: ``static``, ``local``, ``node``,
            ``global``.
        phase: ``prefill`` (hierarchical placement), ``decode`` (global placement) or None
            (DeepSeek's rule: hierarchical when groups divide evenly over nodes).
        recency: half-life, in steps, of the weights given to the window's steps (newest
            weighs 1); 0 weighs all steps alike. Used when per-step loads are passed.
        prior: pseudo-load added to every expert, as a fraction of the layer's mean expert
            load; 0 plans on the forecast as is. None (default): 0 for ``static`` dispatch,
            0.5 for ``local``/``global``. Under a static split a replica spent on an expert
            that stays cold is lost; under water-filling it still carries load wherever it
            is needed, so hedging is cheap there.
        spread: with per-step loads, adds ``spread`` standard deviations of each expert's
            per-step load (across the window's steps, on the window's scale) to the
            forecast: experts whose load jumps between steps, by noise or by drift, get more
            room. None (default): 0.5 for ``static`` dispatch, 0 for ``local``/``node``/``global``.
        shares: ``balanced`` (water-filled on the forecast) or ``uniform``.
        refine_rounds: most swaps per row in the refinement; 0 disables it.
        migration_cost: with ``previous=``, the balancedness (in points, i.e. hundredths)
            a moved slot must win back before it moves; 0 plans from scratch.
        max_moved: with ``previous=``, the largest fraction of slots one rebalance may
            move (1.0 = no cap).
        threads: torch intra-op threads while planning (0 = leave torch's setting alone).
            The plan is numpy and small torch ops: more threads only add synchronisation,
            and inside a serving process they compete with the serving loop for cores.
    """

    dispatch: str = "static"
    phase: str | None = None
    recency: float = 2.0
    prior: float | None = None
    spread: float | None = None
    shares: str = "uniform"
    refine_rounds: int = 8
    migration_cost: float = 0.0
    max_moved: float = 1.0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}")
        if self.phase is not None and self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES} or None, got {self.phase!r}")
        if self.shares not in SHARES:
            raise ValueError(f"shares must be one of {SHARES}, got {self.shares!r}")
        if self.prior is None:
            object.__setattr__(self, "prior", 0.0 if self.dispatch == "static" else 0.5)
        if self.spread is None:
            object.__setattr__(self, "spread", 0.5 if self.dispatch == "static" else 0.0)
        for name in ("recency", "prior", "spread", "migration_cost"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < math.inf
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.max_moved, (int, float)) or not 0.0 <= self.max_moved <= 1.0:
            raise ValueError(f"max_moved must lie in [0, 1], got {self.max_moved!r}")
        for name in ("refine_rounds", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    @property
    def connect(self) -> bool:
        return self.dispatch != "static"


def forecast(
    weight: torch.Tensor, steps: torch.Tensor | None, config: DefaultPolicyConfig
) -> np.ndarray:
    """The load to plan for.

    The window's steps weighted towards the newest (``recency``), plus ``spread`` standard
    deviations of each expert's per-step load, plus the ``prior`` pseudo-load.

    Args:
        weight: [L, E] float32 window load (the sum of ``steps`` when given).
        steps: [S, L, E] float32 per-step loads, oldest first, or None.
    Returns:
        [L, E] float64, on the scale of ``weight``.
    """
    if steps is not None and config.recency > 0 and steps.shape[0] > 1:
        per_step = steps.double().numpy()
        age = np.arange(per_step.shape[0] - 1, -1, -1, dtype=np.float64)
        w = 0.5 ** (age / config.recency)
        load = np.einsum("s,sle->le", w * (len(w) / w.sum()), per_step)
    else:
        load = weight.double().numpy().copy()
    if steps is not None and config.spread > 0 and steps.shape[0] > 1:
        per_step = steps.double().numpy()
        load += config.spread * per_step.std(0) * per_step.shape[0]
    if config.prior > 0:
        load += config.prior * load.mean(-1, keepdims=True)
    return load


def place_rows(
    load: np.ndarray,
    num_slots: int,
    num_gpus: int,
    config: DefaultPolicyConfig,
    floor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-4 on independent rows.

    Args:
        load: [rows, E] float64 forecast.
        num_slots: slots per row; ``num_gpus`` GPUs per row.
        floor: [rows] GPU load below which a row's peak does not matter (see
            :func:`refine_swaps`), or None.
    Returns:
        (place [rows, G, S] int64 expert per slot, logcnt [rows, E] int64).
    """
    slots_per_gpu = num_slots // num_gpus
    logcnt = replica_counts(load, num_slots)
    per_replica = load / logcnt
    if config.connect:
        place, fill, gpu_load = place_replicated(load, logcnt, num_gpus, slots_per_gpu, True)
        place_singles(load, logcnt == 1, place, fill, gpu_load)
    else:
        # static split: only the slot loads matter, every replica is an item of its own
        items = _items(per_replica, np.ones(logcnt.shape, dtype=bool), logcnt)
        gpu = bldm_pack(take_rows(per_replica, items), num_gpus)
        order = argsort_stable(gpu.astype(np.int32))
        place = take_rows(items, order).reshape(-1, num_gpus, slots_per_gpu)
    flat_place = place.reshape(load.shape[0], -1)
    slot_load = take_rows(per_replica, flat_place).reshape(place.shape)
    if not config.refine_rounds or num_gpus == 1:
        return place, logcnt
    replicated = (take_rows(logcnt, flat_place) > 1).reshape(place.shape)
    if pair_splits(slots_per_gpu) <= MAX_SPLITS:
        # few slots per GPU: re-split GPU pairs exhaustively (subsumes single swaps); only
        # singles move when the replicas' graph must stay as built
        movable = ~replicated if config.connect else None
        repartition_pairs(place, slot_load, config.refine_rounds, movable=movable)
        return place, logcnt
    movable = ~replicated if config.connect else np.ones(place.shape, dtype=bool)
    refine_swaps(place, slot_load, movable, replicated, config.refine_rounds, floor=floor)
    return place, logcnt


def use_hierarchical(topology: Topology, config: DefaultPolicyConfig) -> bool:
    if topology.num_nodes == 1:
        return False
    if config.phase == "decode":
        return False
    if config.phase == "prefill" and not topology.hierarchical:
        raise ValueError(
            f"phase='prefill' needs hierarchical placement, but num_groups="
            f"{topology.num_groups} does not divide over num_nodes={topology.num_nodes}"
        )
    return topology.hierarchical


def place_layers(load: np.ndarray, topology: Topology, config: DefaultPolicyConfig) -> np.ndarray:
    """[L, E] float64 forecast -> [L, P] int64 phy2log."""
    num_layers, num_experts = load.shape
    t = topology
    if not use_hierarchical(t, config):
        place, _ = place_rows(load, t.num_replicas, t.num_gpus, config)
        return place.reshape(num_layers, -1)
    group_size = num_experts // t.num_groups
    group_load = load.reshape(num_layers, t.num_groups, group_size).sum(-1)
    node_of_group = pack_groups(group_load, t.num_nodes)  # [L, groups]
    # groups sorted by node; node n owns the n-th run of groups_per_node groups
    groups = np.argsort(node_of_group * t.num_groups + np.arange(t.num_groups), -1, kind="stable")
    experts = (groups[:, :, None] * group_size + np.arange(group_size)).reshape(
        num_layers, t.num_nodes, -1
    )  # [L, nodes, E / nodes] logical ids owned by each node
    node_load = take_rows(load, experts.reshape(num_layers, -1))
    node_load = node_load.reshape(num_layers * t.num_nodes, -1)
    # A layer's peak GPU is at least its heaviest node's load per GPU: refining a lighter
    # node below that changes nothing measurable, so those rows stop there.
    least_peak = node_load.sum(-1).reshape(num_layers, t.num_nodes).max(-1) / t.gpus_per_node
    floor = np.repeat(least_peak, t.num_nodes)
    place, _ = place_rows(node_load, t.slots_per_node, t.gpus_per_node, config, floor)
    local = place.reshape(num_layers * t.num_nodes, -1)  # [L * nodes, slots per node]
    return take_rows(experts.reshape(num_layers * t.num_nodes, -1), local).reshape(num_layers, -1)


def planned_shares(layout: ExpertLayout, load: np.ndarray) -> torch.Tensor:
    """[L, P] float32 replica shares water-filled on the forecast ``load`` [L, E]."""
    from eplb_plugin.kernels.waterfill import waterfill_shares

    return waterfill_shares(
        torch.from_numpy(load).float(), layout.phy2log, layout.log2phy, layout.logcnt,
        layout.topology.slots_per_gpu, layout.replica_share, PLAN_WATERFILL_ITERS,
    )  # fmt: skip


_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads (0: unchanged), then restore.

    torch's setting is process-wide: concurrent plans are serialised on a lock so that one
    does not restore the other's value while it still plans.
    """
    if count <= 0:
        yield
        return
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        if before != count:
            torch.set_num_threads(count)
        try:
            yield
        finally:
            if before != count:
                torch.set_num_threads(before)


def default_policy(
    weight: torch.Tensor,
    topology: Topology,
    previous: ExpertLayout | None = None,
    *,
    steps: torch.Tensor | None = None,
    **options: object,
) -> ExpertLayout:
    """Plan a layout for ``DefaultPolicyConfig(**options)``.

    Args:
        weight: [L, E] float32 load (validated by ``plan``).
        topology: slots, groups, nodes, GPUs.
        previous: the layout in service, for migration-aware planning.
        steps: [S, L, E] float32 per-step loads of the window (oldest first), if known.
    """
    config = DefaultPolicyConfig(**options)  # type: ignore[arg-type]
    with torch_threads(config.threads):
        return _plan(weight, topology, previous, steps, config)


def _plan(
    weight: torch.Tensor,
    topology: Topology,
    previous: ExpertLayout | None,
    steps: torch.Tensor | None,
    config: DefaultPolicyConfig,
) -> ExpertLayout:
    load = forecast(weight, steps, config)
    if previous is not None and (config.migration_cost > 0 or config.max_moved < 1):
        return plan_with_migration(load, topology, previous, config, steps)
    phy2log = place_layers(load, topology, config)
    return finish_layout(phy2log, load, topology, config, previous)


def slot_rank(phy2log: np.ndarray) -> np.ndarray:
    """[L, P] int64 replica index of each slot within its expert, in slot order."""
    rows, slots = phy2log.shape
    # expert ids < slots <= 8192 fit int16, which numpy's stable sort radix-sorts
    keys = phy2log.astype(np.int16) if slots <= np.iinfo(np.int16).max else phy2log
    at = np.argsort(keys, axis=-1, kind="stable")
    at += (np.arange(rows, dtype=np.int64) * slots)[:, None]  # flat index of the sorted order
    at = at.reshape(-1)
    ordered = phy2log.reshape(-1)[at].reshape(rows, slots)
    index = np.broadcast_to(np.arange(slots), (rows, slots))
    start = np.ones((rows, slots), dtype=bool)
    start[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.maximum.accumulate(index * start, axis=-1)  # (np.where broadcasts slowly)
    rank = np.empty(rows * slots, dtype=np.int64)
    rank[at] = (index - first).reshape(-1)
    return rank.reshape(rows, slots)


def finish_layout(
    phy2log: np.ndarray,
    load: np.ndarray,
    topology: Topology,
    config: DefaultPolicyConfig,
    previous: ExpertLayout | None = None,
) -> ExpertLayout:
    """Build the validated layout (slots aligned to ``previous`` if given) with its shares."""
    if previous is not None:
        hierarchical = use_hierarchical(topology, config)
        phy2log = align_to_previous(phy2log, previous.phy2log.numpy(), topology, hierarchical)
    layout = ExpertLayout.from_plan(phy2log, slot_rank(phy2log), topology, load.shape[1])
    if config.shares == "balanced":
        layout = layout.with_share(planned_shares(layout, load))
    return layout


def plan_with_migration(
    load: np.ndarray,
    topology: Topology,
    previous: ExpertLayout,
    config: DefaultPolicyConfig,
    steps: torch.Tensor | None = None,
) -> ExpertLayout:
    """Keep the layout in service except in the layers where changing it pays.

    Two candidates per layer: a *repair* (the placement in service with replica counts
    updated slot by slot, :func:`~.migration.repair_counts`) and a *re-plan* from scratch aligned to
    ``previous``. All are scored on the window's steps (or the forecast) under
    ``config.dispatch`` (the kept placement with shares refreshed for the new load; shares
    move no weights), and :func:`~.migration.choose_plans` picks per layer with
    ``config.migration_cost`` and ``config.max_moved``.

    Args:
        load: [L, E] float64 forecast.
        steps: [S, L, E] float32 window steps to score on, or None.
    """
    hierarchical = use_hierarchical(topology, config)
    old = previous.phy2log.numpy()
    candidates = [
        repair_counts(old, load, topology, hierarchical),
        align_to_previous(place_layers(load, topology, config), old, topology, hierarchical),
    ]
    scenarios = steps if steps is not None else torch.from_numpy(load).float().unsqueeze(0)
    kept = layer_balancedness(finish_layout(old, load, topology, config), scenarios,
                              config.dispatch)  # fmt: skip
    benefit = np.stack([
        100.0 * (layer_balancedness(finish_layout(c, load, topology, config), scenarios,
                                    config.dispatch) - kept)
        for c in candidates
    ])  # fmt: skip
    moved = np.stack([(c != old).sum(-1) for c in candidates])
    choice = choose_plans(
        benefit, moved, topology.num_replicas, config.migration_cost, config.max_moved
    )
    out = old.copy()
    for c, candidate in enumerate(candidates):
        out[choice == c] = candidate[choice == c]
    return finish_layout(out, load, topology, config)
