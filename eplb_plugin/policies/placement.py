"""Replica counts and the first placement of replicas on GPUs, vectorized over rows, in numpy.

Rows are layers, or layers x nodes when placement is hierarchical. Each function handles all
rows at once; Python loops run over items or rounds, never over rows. numpy rather than
torch: the arrays are small and numpy's per-op overhead is about a tenth of torch's, which
is what keeps a DeepSeek-V3-sized plan within milliseconds.

This module builds a complete placement greedily: how many replicas each expert gets
(:func:`replica_counts`), then which GPU each replica goes to (:func:`place_replicated` and
:func:`place_singles` when replicas must link the GPUs for water-filling dispatch,
:func:`bldm_pack` when only the slot loads matter). A greedy placement leaves GPUs uneven
by up to about one item's load; :mod:`.refine` evens them out afterwards, and
:mod:`.group_packing` first assigns expert groups to nodes when placement is hierarchical.
:func:`argsort_stable` and :func:`take_rows` are the fast sort and gather they all share.

Arrays:

- ``weight`` [rows, E] float64 load per logical expert of the row;
- ``logcnt`` [rows, E] int64 replicas per expert;
- ``place`` [rows, G, S] int64 expert held by each slot (``-1`` = not filled yet);
- ``slot_load`` [rows, G, S] float64 load of each slot (its expert's load / replicas).
"""

from __future__ import annotations

import numpy as np

# halvings of replica_counts' level range (a factor (extra + E) / extra wide): to 1/4096 of
# it, where a step costs about what a pass of the greedy loop finishing the count costs
# (measured: 10-12 halvings take half the time of 28 at 320 and 1024 slots)
BISECTION_STEPS = 12
_SIGN_OFF = np.int64(0x7FFFFFFFFFFFFFFF)
# widths up to which numpy's own stable argsort (an insertion sort) is the faster
SMALL_SORT = 16


def argsort_stable(values: np.ndarray, descending: bool = False) -> np.ndarray:
    """``np.argsort(values, axis=-1, kind="stable")`` (of ``-values`` if ``descending``).

    numpy's stable argsort costs several times a plain sort at these sizes. Here each value
    becomes one int64 key, its float64 bits made monotone with the low bits replaced by its
    index, and the keys are sorted in place. Values that differ only in the dropped bits
    (within about 2**-40 of each other) could come out of order: the result is checked to
    be the stable order (the full keys non-decreasing; equal full keys are equal values,
    which the index bits keep in index order) and numpy's own sort runs when it is not.

    Args:
        values: [..., n] float, or int of at most 32 bits (float64 holds those exactly).
    Returns:
        [..., n] int64 indices.
    """
    n = values.shape[-1]
    exact = values.dtype.kind == "f" or (values.dtype.kind in "iu" and values.itemsize <= 4)
    if n <= SMALL_SORT or n > 1 << 20 or not exact or not values.size:
        return np.argsort(-values if descending else values, axis=-1, kind="stable")
    v = np.add(values, 0.0, dtype=np.float64)  # (-0.0 + 0.0 is +0.0: one key for zero)
    bits = v.view(np.int64)
    full = bits ^ ((bits >> 63) & _SIGN_OFF)  # monotone in the value (NaN-free)
    if descending:
        np.invert(full, out=full)
    mask = np.int64((1 << (n - 1).bit_length()) - 1)
    key = full & ~mask
    key |= np.arange(n, dtype=np.int64)
    key.sort(axis=-1)
    key &= mask
    order = key.reshape(-1, n)
    got = full.reshape(-1)[order + (np.arange(order.shape[0], dtype=np.int64) * n)[:, None]]
    if not (got[:, 1:] >= got[:, :-1]).all() or np.isnan(v).any():
        return np.argsort(-values if descending else values, axis=-1, kind="stable")
    return key


def take_rows(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(values, index, -1)`` for [rows, n] ``values`` and [rows, m]
    ``index``, by flat indexing (take_along_axis costs several times more at these sizes)."""
    rows, width = values.shape
    flat = np.ascontiguousarray(values).reshape(-1)
    return flat[index + (np.arange(rows, dtype=np.int64) * width)[:, None]]


def replica_counts(weight: np.ndarray, num_slots: int) -> np.ndarray:
    """Give each redundant slot to the expert with the highest load per replica (DeepSeek's rule).

    Args:
        weight: [rows, E] float64.
        num_slots: slots per row (>= E).
    Returns:
        [rows, E] int64 replicas per expert, summing to ``num_slots`` per row.
    """
    rows, num_experts = weight.shape
    extra = num_slots - num_experts
    logcnt = np.ones((rows, num_experts), dtype=np.int64)
    if extra > 8 and rows:
        # The greedy's k-th extra replica of expert e is decided by the value w_e / k, and
        # the values are handed out in descending order. Bisect for a level above which at
        # most ``extra`` of them lie, give those at once, and leave the rest (ties at the
        # level) to the greedy loop below: the same result as ``extra`` greedy steps.
        weight = np.asarray(weight, dtype=np.float64)
        # The level lies between total / (extra + E) and total / extra (sum_e floor(w_e / L)
        # is within E below total / L): bisecting that range reaches a level with few
        # values left for the loop. (Any level gives the same counts: the steps only decide
        # how much is left to the loop; tests check the greedy's counts at every count of
        # halvings.)
        total = weight.sum(-1)
        lo = total / (extra + num_experts)
        hi = np.where(total > 0, total / extra, 1.0)
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            fits = np.floor(weight / mid[:, None]).sum(-1) <= extra
            hi = np.where(fits, mid, hi)
            lo = np.where(fits, lo, mid)
        level = hi[:, None]
        more = np.floor(weight / level).astype(np.int64)
        # floor() of a rounded quotient may be off by one: count exactly w / k >= level
        more += weight / (more + 1) >= level
        more -= (more > 0) & (weight / np.maximum(more, 1) < level)
        # a rounded quotient may also have let the bisection overshoot: hand back the
        # smallest values given (the greedy's last picks) until the row fits
        row = np.arange(rows)
        while (over := more.sum(-1) > extra).any():
            last = np.where(more > 0, weight / np.maximum(more, 1), np.inf)[:, ::-1].argmin(-1)
            more[row[over], num_experts - 1 - last[over]] -= 1
        logcnt = more + 1
    row = np.arange(rows)
    for _ in range(num_slots - int(logcnt.sum(-1).min()) if rows else 0):
        short = logcnt.sum(-1) < num_slots
        pick = (weight / logcnt).argmax(-1)
        logcnt[row[short], pick[short]] += 1
    return logcnt


def _items(key: np.ndarray, take: np.ndarray, repeat: np.ndarray) -> np.ndarray:
    """Per row, experts ordered by descending ``key``, those with ``take``, each ``repeat`` times.

    Args:
        key: [rows, E] float64 sort key; take: [rows, E] bool; repeat: [rows, E] int64.
    Returns:
        [rows, M] int64 expert ids, ``-1`` padded (M = the largest row's item count).
    """
    rows = key.shape[0]
    order = argsort_stable(np.where(take, -key, np.inf))
    times = take_rows(np.where(take, repeat, 0), order)
    length = times.sum(-1)
    width = int(length.max()) if rows else 0
    experts = np.repeat(order.ravel(), times.ravel())
    # flat position of each item: its row's start plus its place among the row's items
    shift = np.repeat(
        np.arange(rows, dtype=np.int64) * width - (np.cumsum(length) - length), length
    )
    out = np.full(rows * width, -1, dtype=np.int64)
    out[np.arange(experts.size) + shift] = experts
    return out.reshape(rows, width)


def place_replicated(
    weight: np.ndarray, logcnt: np.ndarray, num_gpus: int, slots_per_gpu: int, connect: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Put the replicas of replicated experts on distinct GPUs, heaviest replica first.

    With ``connect``, each further replica of an expert goes to a GPU outside the GPUs its
    replicas already reach, so that the replicas link the GPUs into one connected graph as
    far as the replica count allows: load can then flow between any two GPUs under
    water-filling dispatch. Otherwise a replica goes to the lightest GPU it is not on yet.
    Ties prefer GPUs holding no replicated expert yet, then the lighter GPU.

    Returns:
        (place [rows, G, S] int64 with -1 for the slots left to singles, fill [rows, G]
        int64 slots taken per GPU, load [rows, G] float64).
    """
    rows, num_experts = weight.shape
    per_replica = weight / logcnt
    items = _items(per_replica, logcnt > 1, logcnt)
    place = np.full((rows, num_gpus, slots_per_gpu), -1, dtype=np.int64)
    fill = np.zeros((rows, num_gpus), dtype=np.int64)
    load = np.zeros((rows, num_gpus))
    component = np.tile(np.arange(num_gpus), (rows, 1))
    current = np.zeros(rows, dtype=np.int64)  # component of the current expert's GPUs
    row = np.arange(rows)
    scale = load.sum(-1) + per_replica.sum(-1) * num_gpus + 1.0  # [rows]
    # A GPU's score is ((load / scale + 2 * linked) + 16 * used) [+ 4 * in the expert's
    # component], inf when full: ``base`` keeps the first term (inf once full) and
    # ``used16`` the second, each changed only where a replica lands (the same arithmetic
    # as recomputing them, at a fraction of the operations). linked: holds a replicated
    # expert; used: holds the current expert.
    base = np.zeros((rows, num_gpus))
    used16 = np.zeros((rows, num_gpus))
    flat = [a.reshape(-1) for a in (place, fill, load, base, used16)]
    flat_place, flat_fill, flat_load, flat_base, flat_used16 = flat
    flat_replica = per_replica.reshape(-1)
    by_step = np.ascontiguousarray(items.T)  # [M, rows]
    active_of = by_step >= 0
    first_of = active_of.copy()  # the expert's first replica
    first_of[1:] &= by_step[1:] != by_step[:-1]
    for m in range(items.shape[1]):
        expert, active, first = by_step[m], active_of[m], first_of[m]
        used16[first] = 0.0
        score = base + used16
        if connect:
            score = score + 4.0 * ((component == current[:, None]) & ~first[:, None])
        gpu = score.argmin(-1)
        if active.all():
            r, g, e = row, gpu, expert
        else:
            r, g, e = row[active], gpu[active], expert[active]
        at = r * num_gpus + g
        taken = flat_fill[at]
        flat_place[at * slots_per_gpu + taken] = e
        flat_fill[at] = taken + 1
        now = flat_load[at] + flat_replica[r * num_experts + e]
        flat_load[at] = now
        flat_base[at] = np.where(taken + 1 < slots_per_gpu, now / scale[r] + 2.0, np.inf)
        flat_used16[at] = 16.0
        if connect:
            # merge the chosen GPU's component into the expert's (first replica: adopt it)
            chosen = component[row, gpu]
            current = np.where(first, chosen, current)
            merge = active & ~first
            component = np.where(
                merge[:, None] & (component == chosen[:, None]), current[:, None], component
            )
    return place, fill, load


def place_singles(
    weight: np.ndarray,
    take: np.ndarray,
    place: np.ndarray,
    fill: np.ndarray,
    load: np.ndarray,
) -> None:
    """Fill the free slots with the experts in ``take`` [rows, E] bool (one replica each), in place.

    Batched LPT: each round deals the heaviest experts left to the GPUs with a free slot,
    heaviest expert to lightest GPU. ``take`` must have exactly as many experts per row as
    there are free slots.
    """
    rows, num_gpus, slots_per_gpu = place.shape
    num_experts = weight.shape[1]
    items = _items(weight, take, np.ones_like(take, dtype=np.int64))
    # flat views for the updates (of contiguous copies if need be, written back at the end)
    arrays = (place, fill, load)
    work = [np.ascontiguousarray(a) for a in arrays]
    flat_place, flat_fill, flat_load = (a.reshape(-1) for a in work)
    flat_weight = np.ascontiguousarray(weight).reshape(-1)
    count = (items >= 0).sum(-1)
    row = np.arange(rows)
    taken = np.zeros(rows, dtype=np.int64)
    rank = np.arange(num_gpus)
    while (taken < count).any():
        room = work[1] < slots_per_gpu
        order = np.argsort(np.where(room, work[2], np.inf), axis=-1, kind="stable")
        deal = np.minimum(room.sum(-1), count - taken)  # [rows]
        ok = rank[None, :] < deal[:, None]  # [rows, G] j-th lightest GPU gets an item
        index = np.minimum(taken[:, None] + rank[None, :], items.shape[1] - 1)
        expert = take_rows(items, index)
        r = np.broadcast_to(row[:, None], ok.shape)[ok]
        g, e = order[ok], expert[ok]
        at = r * num_gpus + g  # flat (row, GPU), distinct within a round
        taken_slots = flat_fill[at]
        flat_place[at * slots_per_gpu + taken_slots] = e
        flat_fill[at] = taken_slots + 1
        flat_load[at] += flat_weight[r * num_experts + e]
        taken += deal
    for array, copy in zip(arrays, work):
        if copy is not array:
            array[...] = copy


def bldm_pack(item_load: np.ndarray, num_gpus: int) -> np.ndarray:
    """Balanced largest differencing: items -> GPUs, the same item count on every GPU.

    The items, sorted by load, are cut into ``S`` tuples of ``G`` consecutive items (one
    item per GPU-to-be). The two tuples with the largest spread (max - min) are merged by
    pairing the lightest partial GPU of one with the heaviest of the other, until one
    tuple is left. Much tighter than LPT when every GPU must take exactly ``S`` items, and
    only ``S - 1`` merges of [rows, G] arrays.

    Args:
        item_load: [rows, G * S] float64.
    Returns:
        [rows, G * S] int64 GPU of each item; every GPU gets ``S`` items.
    """
    rows, num_items = item_load.shape
    slots = num_items // num_gpus
    # (numpy's stable sort: the items mostly come sorted already, which its merge sort
    # passes over in one sweep)
    order = np.argsort(-item_load, axis=-1, kind="stable")
    # flat indices (numpy's take/put_along_axis cost several times more at these sizes)
    offset = (np.arange(rows, dtype=np.int64) * num_items)[:, None]
    order += offset
    sums = item_load.reshape(-1)[order].reshape(rows * slots, num_gpus)  # a row per tuple
    # Each tuple's partial GPUs are nodes of a forest: first the items (sorted position
    # tuple * G + partial), then G new nodes per merge, which the two merged tuples'
    # partials point to. The last merge's nodes are the GPUs.
    per_row = num_items + (slots - 1) * num_gpus
    node_start = np.arange(rows, dtype=np.int64) * per_row
    parent = np.arange(rows * per_row, dtype=np.int64)  # roots point to themselves
    current = (np.arange(num_items) + node_start[:, None]).reshape(rows * slots, num_gpus)
    # spread (max - min) of each tuple, -inf once merged away; a tuple of sorted items
    # spreads from its first to its last
    spread = (sums[:, 0] - sums[:, -1]).reshape(rows, slots)
    flat_spread = spread.reshape(-1)
    tuple_start = np.arange(rows, dtype=np.int64) * slots
    lane = (np.arange(rows, dtype=np.int64) * num_gpus)[:, None]  # flat [rows, G] offsets
    new = node_start[:, None] + num_items + np.arange(num_gpus)
    for _ in range(slots - 1):
        # the two tuples with the largest spread, the first of equals first
        a = tuple_start + spread.argmax(-1)
        flat_spread[a] = -np.inf
        b = tuple_start + spread.argmax(-1)
        sum_a, sum_b = np.take(sums, a, axis=0), np.take(sums, b, axis=0)
        up = np.argsort(sum_a, -1, kind="stable") + lane
        down = np.argsort(-sum_b, -1, kind="stable") + lane
        merged_sums = sum_a.reshape(-1)[up] + sum_b.reshape(-1)[down]
        sums[a] = merged_sums
        by_gpu = np.ascontiguousarray(merged_sums.T)  # (reductions over a short last axis
        flat_spread[a] = by_gpu.max(0) - by_gpu.min(0)  # cost several times more)
        flat_spread[b] = -np.inf
        parent[current[a].reshape(-1)[up]] = new
        parent[current[b].reshape(-1)[down]] = new
        current[a] = new
        new = new + num_gpus
    for _ in range(max(slots - 2, 0).bit_length()):  # chains are at most slots - 1 long
        parent = parent[parent]
    root = parent.reshape(rows, per_row)[:, :num_items] - node_start[:, None]
    gpu = np.empty(rows * num_items, dtype=np.int64)
    gpu[order.reshape(-1)] = (root % num_gpus).reshape(-1)  # (num_items is a multiple of G)
    return gpu.reshape(rows, num_items)


__all__ = [
    "argsort_stable",
    "bldm_pack",
    "place_replicated",
    "place_singles",
    "replica_counts",
    "take_rows",
]
