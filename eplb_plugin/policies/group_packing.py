"""Expert groups -> nodes for hierarchical placement, vectorized over rows (layers), in numpy.

With DeepSeek's group-limited routing a token's experts lie in a few expert groups. When the
groups divide evenly over the nodes, hierarchical placement keeps each group within one
node (so a token's traffic reaches few nodes) and then places each node's experts on its
GPUs (:mod:`.placement`). Which groups share a node decides the most loaded node, a floor
no placement within the nodes can go below: :func:`pack_groups` minimizes it, exhaustively
over all equal partitions when they are few (8 groups on 4 nodes: 105), and
:func:`partitions_peak_bound` is the best any equal split allows (what tests and benchmarks
measure the packing against). The partition tables are cached: every plan of a deployment
asks for the same ones.
"""

from __future__ import annotations

import functools
import math

import numpy as np


@functools.lru_cache(maxsize=8)
def _equal_partitions(num_items: int, num_packs: int) -> np.ndarray:
    """All ways to split items into unlabeled packs of equal size: [ways, items] pack index.

    Cached (every plan of a deployment asks for the same), hence read-only.
    """
    per = num_items // num_packs
    out: list[list[int]] = []

    def walk(assign: list[int], sizes: list[int], item: int) -> None:
        if item == num_items:
            out.append(list(assign))
            return
        opened = max(assign[:item], default=-1) + 1
        for pack in range(min(opened + 1, num_packs)):
            if sizes[pack] < per:
                assign[item] = pack
                sizes[pack] += 1
                walk(assign, sizes, item + 1)
                sizes[pack] -= 1

    walk([0] * num_items, [0] * num_packs, 0)
    ways = np.array(out, dtype=np.int64)
    ways.flags.writeable = False
    return ways


@functools.lru_cache(maxsize=8)
def _partition_members(num_items: int, num_packs: int) -> np.ndarray:
    """[ways, items, packs] float64 (read-only, cached): 1 where a way puts an item in a pack."""
    ways = _equal_partitions(num_items, num_packs)
    onehot = (ways[:, :, None] == np.arange(num_packs)).astype(np.float64)
    onehot.flags.writeable = False
    return onehot


def num_equal_partitions(num_items: int, num_packs: int) -> int:
    per = num_items // num_packs
    ways = math.factorial(num_items) // math.factorial(per) ** num_packs
    return ways // math.factorial(num_packs)


def pack_groups(group_load: np.ndarray, num_nodes: int, max_exhaustive: int = 20000) -> np.ndarray:
    """Groups -> nodes, equal group count per node, minimizing the most loaded node.

    Exhaustive over all partitions when there are at most ``max_exhaustive`` of them (8
    groups on 4 nodes: 105), otherwise greedy heaviest-first packing refined by pairwise
    swaps between the heaviest and the other nodes.

    Args:
        group_load: [rows, num_groups] float64.
    Returns:
        [rows, num_groups] int64 node of each group.
    """
    rows, num_groups = group_load.shape
    if num_nodes == 1:
        return np.zeros((rows, num_groups), dtype=np.int64)
    if num_equal_partitions(num_groups, num_nodes) <= max_exhaustive:
        ways = _equal_partitions(num_groups, num_nodes)  # [W, groups]
        node_load = _partition_loads(group_load, num_nodes)  # [rows, W, nodes]
        peak = functools.reduce(np.maximum, np.moveaxis(node_load, -1, 0))
        # lowest peak, then the most even spread below it, then the first way
        spread = (node_load**2).sum(-1)
        lowest = peak == peak.min(-1, keepdims=True)
        best = np.where(lowest, spread, np.inf).argmin(-1)
        return ways[best]
    per = num_groups // num_nodes
    node = np.zeros((rows, num_groups), dtype=np.int64)
    items = np.argsort(-group_load, axis=-1, kind="stable")
    load = np.zeros((rows, num_nodes))
    fill = np.zeros((rows, num_nodes), dtype=np.int64)
    row = np.arange(rows)
    for i in range(num_groups):
        g = items[:, i]
        n = np.where(fill < per, load, np.inf).argmin(-1)
        node[row, g] = n
        load[row, n] += group_load[row, g]
        fill[row, n] += 1
    for _ in range(num_groups * num_nodes):
        peak = load.argmax(-1)
        src = node == peak[:, None]  # [rows, groups]
        delta = group_load[:, :, None] - group_load[:, None, :]  # a on peak, b elsewhere
        other = load[row[:, None], node]  # [rows, groups] load of b's node
        after = np.maximum(load[row, peak][:, None, None] - delta, other[:, None, :] + delta)
        ok = src[:, :, None] & ~src[:, None, :] & (delta > 0)
        gain = np.where(ok, load[row, peak][:, None, None] - after, 0.0).reshape(rows, -1)
        best = gain.argmax(-1)
        improved = gain[row, best] > 1e-9
        if not improved.any():
            break
        a, b = np.unravel_index(best, (num_groups, num_groups))
        r, a, b = row[improved], a[improved], b[improved]
        na, nb = node[r, a].copy(), node[r, b].copy()
        load[r, na] += group_load[r, b] - group_load[r, a]
        load[r, nb] += group_load[r, a] - group_load[r, b]
        node[r, a], node[r, b] = nb, na
    return node


def _partition_loads(group_load: np.ndarray, num_nodes: int) -> np.ndarray:
    """[rows, ways, nodes] float64 load of each node under each equal partition.

    With at most two groups per node a node's load is one group's or the sum of two,
    whatever the order of summation: then a gather and an add, exactly what the einsum
    gives at a tenth of its cost.
    """
    rows, num_groups = group_load.shape
    per = num_groups // num_nodes
    if per <= 2:
        members = _partition_groups(num_groups, num_nodes)  # [W, nodes, per]
        node_load = group_load[:, members[..., 0]]
        return node_load + group_load[:, members[..., 1]] if per == 2 else node_load
    return np.einsum("rg,wgn->rwn", group_load, _partition_members(num_groups, num_nodes))


@functools.lru_cache(maxsize=8)
def _partition_groups(num_items: int, num_packs: int) -> np.ndarray:
    """[ways, packs, items per pack] int64 (read-only, cached): each pack's items, ascending."""
    ways = _equal_partitions(num_items, num_packs)
    by_pack = np.argsort(ways * num_items + np.arange(num_items), axis=-1, kind="stable")
    members = by_pack.reshape(len(ways), num_packs, num_items // num_packs)
    members.flags.writeable = False
    return members


def partitions_peak_bound(group_load: np.ndarray, num_nodes: int) -> np.ndarray:
    """[rows] the lowest most-loaded-node load any equal group-to-node split allows."""
    onehot = _partition_members(group_load.shape[1], num_nodes)
    return np.einsum("rg,wgn->rwn", group_load, onehot).max(-1).min(-1)


__all__ = ["num_equal_partitions", "pack_groups", "partitions_peak_bound"]
