"""Migration-aware planning: keep experts where they are unless moving them pays.

Tools of the default policy's migration-aware planning, per layer and vectorized over
layers:

- :func:`align_to_previous` relabels a new plan's GPUs (whole nodes first when placement is
  hierarchical) and orders each GPU's slots so that as many slots as possible keep the
  expert they hold now. GPUs are interchangeable, so this changes no load, only the moves.
- :func:`repair_counts`, :func:`layer_balancedness` and :func:`choose_plans`: the parts of
  the default policy's migration-aware planning
  (:func:`eplb_plugin.policies.default.plan_with_migration`), which keeps the layout in
  service and, layer by layer, takes a repair (replica counts updated one slot at a time)
  or a from-scratch re-plan, most valuable per moved slot first, while each pays for the
  slots it moves (``migration_cost``) and the total stays within ``max_moved``. A
  candidate is taken for a whole layer: each is consistent (every expert keeps a slot), a
  mix of two within a layer would not be.
"""

from __future__ import annotations

import numpy as np
import torch

from ..dispatch import gpu_loads_of, slot_loads
from ..layout import ExpertLayout, Topology


def _greedy_match(overlap: np.ndarray) -> np.ndarray:
    """Match rows to columns of each [n, n] block greedily by descending overlap.

    Args:
        overlap: [L, n, n] float64, overlap[l, i, j] = value of giving new item i old slot j.
    Returns:
        [L, n] int64 old position of each new item (a permutation per layer).
    """
    num_layers, n, _ = overlap.shape
    work = overlap.astype(np.float64).copy()
    match = np.full((num_layers, n), -1, dtype=np.int64)
    row = np.arange(num_layers)
    for _ in range(n):
        best = work.reshape(num_layers, -1).argmax(-1)
        i, j = np.divmod(best, n)
        match[row, i] = j
        work[row, i, :] = -np.inf
        work[row, :, j] = -np.inf
    return match


def _counts(place: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, B, k] expert ids -> [L, B, E] float32 multiplicities."""
    num_layers, blocks, _ = place.shape
    out = np.zeros((num_layers, blocks, num_experts), dtype=np.float32)
    layer = np.arange(num_layers)[:, None, None]
    block = np.arange(blocks)[None, :, None]
    np.add.at(out, (layer, block, place), 1.0)
    return out


def _permute_blocks(new: np.ndarray, old: np.ndarray, blocks: int, num_experts: int) -> np.ndarray:
    """Reorder the ``blocks`` equal blocks of each row of ``new`` [L, P] to overlap ``old``."""
    num_layers, num_slots = new.shape
    a = new.reshape(num_layers, blocks, -1)
    b = old.reshape(num_layers, blocks, -1)
    overlap = np.einsum("lie,lje->lij", _counts(a, num_experts), _counts(b, num_experts))
    match = _greedy_match(overlap)  # new block i -> old position match[i]
    out = np.empty_like(a)
    out[np.arange(num_layers)[:, None], match] = a
    return out.reshape(num_layers, num_slots)


def _order_slots(new: np.ndarray, old: np.ndarray, slots_per_gpu: int) -> np.ndarray:
    """Within each GPU, put experts the old GPU also holds at their old slot positions."""
    num_layers, num_slots = new.shape
    a = new.reshape(num_layers, -1, slots_per_gpu)
    b = old.reshape(num_layers, -1, slots_per_gpu)
    out = np.full_like(a, -1)
    left = np.ones(a.shape, dtype=bool)  # new experts not placed yet
    for j in range(slots_per_gpu):
        hit = left & (a == b[:, :, j : j + 1])
        found = hit.any(-1)
        out[:, :, j] = np.where(found, b[:, :, j], -1)
        first = hit.argmax(-1)[..., None]
        kept = np.take_along_axis(left, first, -1)
        np.put_along_axis(left, first, kept & ~found[..., None], -1)
    # the other new experts fill the free positions, both in slot order
    free = out == -1
    src = np.argsort(~left, axis=-1, kind="stable")
    dst = np.argsort(~free, axis=-1, kind="stable")
    pending = np.arange(slots_per_gpu) < left.sum(-1, keepdims=True)
    value = np.where(pending, np.take_along_axis(a, src, -1), np.take_along_axis(out, dst, -1))
    np.put_along_axis(out, dst, value, -1)
    return out.reshape(num_layers, num_slots)


def align_to_previous(
    phy2log: np.ndarray, previous: np.ndarray, topology: Topology, hierarchical: bool = False
) -> np.ndarray:
    """Relabel GPUs (and nodes) of ``phy2log`` [L, P] to keep as many slots as ``previous``.

    With ``hierarchical`` whole nodes are matched first and GPUs only within a node, so
    that groups stay on one node; otherwise any GPU may take any GPU's place.
    """
    num_experts = int(max(phy2log.max(), previous.max())) + 1
    t = topology
    new = phy2log.copy()
    if hierarchical and t.num_nodes > 1:
        new = _permute_blocks(new, previous, t.num_nodes, num_experts)
        num_layers = new.shape[0]
        rows_new = new.reshape(num_layers * t.num_nodes, t.slots_per_node)
        rows_old = previous.reshape(num_layers * t.num_nodes, t.slots_per_node)
        new = _permute_blocks(rows_new, rows_old, t.gpus_per_node, num_experts)
        new = new.reshape(num_layers, -1)
    else:
        new = _permute_blocks(new, previous, t.num_gpus, num_experts)
    return _order_slots(new, previous, t.slots_per_gpu)


def layer_balancedness(layout: ExpertLayout, scenarios: torch.Tensor, dispatch: str) -> np.ndarray:
    """[L] mean over scenarios of each layer's balancedness under ``dispatch``.

    Args:
        scenarios: [K, L, E] float loads (e.g. the window's steps).
    """
    scores = []
    for load in scenarios:
        gpu = gpu_loads_of(layout, slot_loads(layout, load, dispatch))  # [L, G]
        peak = gpu.amax(-1)
        ratio = torch.where(peak > 0, gpu.mean(-1) / peak.clamp(min=1e-300), 1.0)
        scores.append(ratio.numpy())
    return np.mean(scores, axis=0)


def choose_plans(
    benefit: np.ndarray, moved: np.ndarray, num_slots: int, cost: float, budget: float
) -> np.ndarray:
    """Per layer, which candidate placement to take (or none: keep the one in service).

    A candidate's net benefit is its ``benefit`` (balancedness points over keeping the layer)
    minus ``cost`` times the fraction of the layer's slots it moves. Greedily, the change
    (keep -> candidate, or one candidate -> a better one) that adds the most net benefit is
    made while it adds some and the slots moved in all stay within ``budget`` (a fraction of
    all slots). Largest gain first rather than gain per moved slot: per slot, cheap repairs
    would always win and use up the budget that a few full re-plans put to better use
    (measured on the replay: docs/benchmarks/policy.md).

    Args:
        benefit: [C, L] float64; moved: [C, L] int64 slots each candidate moves per layer.
    Returns:
        [L] int64 candidate per layer, -1 = keep.
    """
    num_candidates, num_layers = benefit.shape
    net = benefit - cost * moved / num_slots
    choice = np.full(num_layers, -1, dtype=np.int64)
    cur_net = np.zeros(num_layers)
    cur_moved = np.zeros(num_layers, dtype=np.int64)
    room = budget * num_slots * num_layers
    while True:
        gain = net - cur_net  # [C, L]
        extra = moved - cur_moved
        ok = (gain > 1e-9) & (extra <= room)
        if not ok.any():
            return choice
        c, layer = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), gain.shape)
        room -= extra[c, layer]
        choice[layer], cur_net[layer], cur_moved[layer] = c, net[c, layer], moved[c, layer]


def repair_counts(
    old: np.ndarray, load: np.ndarray, topology: Topology, hierarchical: bool
) -> np.ndarray:
    """The placement in service with its replica counts moved towards the forecast's.

    DeepSeek's greedy, one slot at a time: while the expert with the highest load per
    replica would lose more load per replica than the cheapest donor (an expert with two or
    more replicas) gains, one of the donor's slots takes the expert instead, on the
    lightest GPU that does not hold it yet (within the expert's node when placement is
    hierarchical). Every change moves one slot.

    Args:
        old: [L, P] int64 phy2log in service; load: [L, E] float64 forecast.
    Returns:
        [L, P] int64 phy2log.
    """
    t = topology
    num_layers, num_slots = old.shape
    place = old.copy()
    counts = np.zeros(load.shape, dtype=np.int64)
    np.add.at(counts, (np.arange(num_layers)[:, None], place), 1)
    row = np.arange(num_layers)
    gpu = np.arange(num_slots) // t.slots_per_gpu
    node = np.arange(num_slots) // t.slots_per_node
    active = np.ones(num_layers, dtype=bool)
    for _ in range(num_slots - load.shape[1]):
        per = load / counts
        expert = per.argmax(-1)  # [L] receiver
        holds = place == expert[:, None]  # [L, P]
        on_gpu = holds.reshape(num_layers, t.num_gpus, -1).any(-1)[:, gpu]  # [L, P]
        donor = np.take_along_axis(counts, place, -1)
        cost = np.where(donor > 1, np.take_along_axis(load, place, -1) / np.maximum(donor - 1, 1),
                        np.inf)  # fmt: skip
        cost = np.where(on_gpu | holds, np.inf, cost)
        if hierarchical:
            home = node[holds.argmax(-1)]  # the receiver's node
            cost = np.where(node[None, :] == home[:, None], cost, np.inf)
        slot_load = np.take_along_axis(load / counts, place, -1)
        gpu_load = slot_load.reshape(num_layers, t.num_gpus, -1).sum(-1)[:, gpu]
        # cheapest donor first, the lighter GPU among equals
        pick = np.lexsort((gpu_load, cost), axis=-1)[:, 0]
        best = cost[row, pick]
        active &= best < per[row, expert] * (1 - 1e-3)
        if not active.any():
            break
        r, p = row[active], pick[active]
        counts[r, place[r, p]] -= 1
        counts[r, expert[active]] += 1
        place[r, p] = expert[active]
    return place
