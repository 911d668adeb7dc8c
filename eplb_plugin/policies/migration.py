"""Migration-aware planning: keep experts where they are unless moving them pays.

Two tools, both per layer and vectorized over layers:

- :func:`align_to_previous` relabels a new plan's GPUs (whole nodes first when placement is
  hierarchical) and orders each GPU's slots so that as many slots as possible keep the
  expert they hold now. GPUs are interchangeable, so this changes no load, only the moves.
- :func:`plan_with_migration` keeps the layout in service and takes the from-scratch plan's
  layers one at a time, most valuable per moved slot first, while each pays for the slots
  it moves (``migration_cost``) and the total stays within ``max_moved``. The unit of a
  decision is a whole layer: a layer's re-plan is consistent (every expert keeps a slot),
  a mix of two plans within a layer would not be.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..layout import ExpertLayout, Topology

if TYPE_CHECKING:
    from .default import DefaultPolicyConfig


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
    from ..dispatch import gpu_loads_of, slot_loads

    scores = []
    for load in scenarios:
        gpu = gpu_loads_of(layout, slot_loads(layout, load, dispatch))  # [L, G]
        peak = gpu.amax(-1)
        ratio = torch.where(peak > 0, gpu.mean(-1) / peak.clamp(min=1e-300), 1.0)
        scores.append(ratio.numpy())
    return np.mean(scores, axis=0)


def choose_layers(
    benefit: np.ndarray, moved: np.ndarray, num_slots: int, cost: float, budget: float
) -> np.ndarray:
    """Which layers take their new placement.

    A layer qualifies when its ``benefit`` (balancedness points) exceeds ``cost`` times the
    fraction of its slots it moves; qualifying layers are taken by net benefit per moved
    slot, best first, while the slots moved stay within ``budget`` (a fraction of all slots).

    Args:
        benefit: [L] float64; moved: [L] int64 slots the new placement moves per layer.
    Returns:
        [L] bool.
    """
    net = benefit - cost * moved / num_slots
    order = np.argsort(-net / np.maximum(moved, 1), kind="stable")
    take = np.zeros(benefit.shape, dtype=bool)
    room = budget * num_slots * benefit.shape[0]
    for layer in order:
        if net[layer] <= 0:
            break
        if moved[layer] <= room:
            take[layer] = True
            room -= moved[layer]
    return take


def plan_with_migration(
    load: np.ndarray,
    topology: Topology,
    previous: ExpertLayout,
    config: DefaultPolicyConfig,
    steps: torch.Tensor | None = None,
) -> ExpertLayout:
    """Keep the layout in service except in the layers where re-planning pays.

    Every layer is re-planned from scratch and aligned to ``previous``; both versions are
    scored on the window's steps (or the forecast) under ``config.dispatch``, the previous
    one with shares refreshed for the new load (shares move no weights). Layers then take
    the new placement by :func:`choose_layers` with ``config.migration_cost`` and
    ``config.max_moved``.

    Args:
        load: [L, E] float64 forecast.
        steps: [S, L, E] float32 window steps to score on, or None.
    """
    from .default import finish_layout, place_layers, use_hierarchical

    hierarchical = use_hierarchical(topology, config)
    old = previous.phy2log.numpy()
    new = align_to_previous(place_layers(load, topology, config), old, topology, hierarchical)
    moved = (new != old).sum(-1)
    scenarios = steps if steps is not None else torch.from_numpy(load).float().unsqueeze(0)
    fresh = finish_layout(new, load, topology, config)
    kept = finish_layout(old, load, topology, config)
    benefit = 100.0 * (
        layer_balancedness(fresh, scenarios, config.dispatch)
        - layer_balancedness(kept, scenarios, config.dispatch)
    )
    take = choose_layers(
        benefit, moved, topology.num_replicas, config.migration_cost, config.max_moved
    )
    if take.all():
        return fresh
    if not take.any():
        return kept
    return finish_layout(np.where(take[:, None], new, old), load, topology, config)
