"""Greedy placement building blocks, vectorized over rows (layers, or layers x nodes), in numpy.

Each function handles all rows at once; Python loops run over items or rounds, never over
rows. numpy rather than torch: the arrays are small and numpy's per-op overhead is about a
tenth of torch's, which is what keeps a DeepSeek-V3-sized plan within milliseconds.

Arrays:

- ``weight`` [rows, E] float64 load per logical expert of the row;
- ``logcnt`` [rows, E] int64 replicas per expert;
- ``place`` [rows, G, S] int64 expert held by each slot (``-1`` = not filled yet);
- ``slot_load`` [rows, G, S] float64 load of each slot (its expert's load / replicas).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

# halvings of replica_counts' level range (a factor (extra + E) / extra wide): to 1/4096 of
# it, where a step costs about what a pass of the greedy loop finishing the count costs
# (measured: 10-12 halvings take half the time of 28 at 320 and 1024 slots)
BISECTION_STEPS = 12
_SIGN_OFF = np.int64(0x7FFFFFFFFFFFFFFF)
# largest (row, GPU, expert) table refine_swaps keeps for the replicated items' check
_MAX_PRESENCE = 1 << 20
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


@functools.lru_cache(maxsize=16)
def _subsets(slots: int, half: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ways to give ``slots`` of 2 * slots items to one side (cached, read-only).

    ``half``: only those with item 0 on that side (when every item may move, the others are
    the same splits mirrored).

    Returns:
        (member [C, 2 * slots] 0/1 float32, pick [C, 2 * slots] int64: each way's items,
        that side's first, in item order).
    """
    combos = [c for c in itertools.combinations(range(2 * slots), slots) if not half or c[0] == 0]
    member = np.zeros((len(combos), 2 * slots), dtype=np.float32)
    member[np.arange(len(combos))[:, None], np.array(combos)] = 1.0
    pick = np.argsort(-member, axis=-1, kind="stable")
    member.flags.writeable = False
    pick.flags.writeable = False
    return member, pick


def sum_last(values: np.ndarray) -> np.ndarray:
    """``values.sum(-1)``, bit for bit, for [..., n] float64.

    numpy adds fewer than 8 values left to right (its pairwise sum starts at 8), but a
    reduction over a short last axis costs several times a few whole-array adds, which is
    what this does then.
    """
    n = values.shape[-1]
    if n >= 8 or n == 0:
        return values.sum(-1)
    total = values[..., 0].copy()
    for i in range(1, n):
        total += values[..., i]
    return total


def pair_splits(slots: int) -> int:
    """Number of splits :func:`repartition_pairs` searches per pair of GPUs (at most)."""
    return math.comb(2 * slots, slots)


def repartition_pairs(
    place: np.ndarray,
    slot_load: np.ndarray,
    rounds: int,
    pairs: int = 8,
    movable: np.ndarray | None = None,
) -> None:
    """Re-split the items of heavy/light GPU pairs as evenly as the pair allows, in place.

    Each round the ``pairs`` heaviest GPUs are paired with the lightest (pairing rotated each
    round) and each pair's 2S items are split into two sets of S by exhaustive search over
    the splits (``pair_splits(S)``), kept if the larger side gets lighter. Stronger than a
    single swap; meant for few slots per GPU (S <= 6). Items that are not ``movable`` stay
    on their GPU.

    Args:
        place, slot_load: [rows, G, S] expert ids and loads (updated in place).
        movable: [rows, G, S] bool (updated in place with the items), None = all.
    """
    rows, num_gpus, slots = place.shape
    k = min(pairs, num_gpus // 2)
    if k == 0:
        return
    member, pick = _subsets(slots, half=movable is None)  # [C, 2S]: heavy GPU's set first
    r = np.arange(rows)[:, None]
    rank = np.arange(k)
    arrays = [place, slot_load] + ([movable] if movable is not None else [])
    # [rows * G, S] views: one flat gather fetches a heavy and a light GPU's slots at once
    gpus_of = [a.reshape(rows * num_gpus, slots) for a in arrays]
    slot_load_now = gpus_of[1].reshape(rows, num_gpus, slots)
    for round_ in range(rounds):
        gpu_load = sum_last(slot_load_now)
        # (numpy's sort: GPU loads near-tie in their last bits, where argsort_stable's keys
        # would fall back to it anyway)
        order = np.argsort(gpu_load, axis=-1, kind="stable")
        heavy = order[:, : -k - 1 : -1]
        light = order[:, (rank + round_) % k]
        pair = np.stack([heavy, light], -1) + r[..., None] * num_gpus  # [rows, k, 2]
        pools = [g[pair].reshape(rows, k, 2 * slots) for g in gpus_of]  # [rows, k, 2S]
        pool = pools[1]
        total = pool.sum(-1, keepdims=True)
        # float32 ranks the splits; |side - total/2| is the larger side's excess
        excess = pool.astype(np.float32) @ member.T  # [rows, k, C]
        excess -= (total / 2).astype(np.float32)
        np.abs(excess, out=excess)
        if movable is not None:
            fixed = ~pools[2]
            stay = np.concatenate([fixed[..., :slots], np.zeros_like(fixed[..., slots:])], -1)
            away = np.concatenate([np.zeros_like(fixed[..., :slots]), fixed[..., slots:]], -1)
            inside = stay.astype(np.float32) @ member.T  # fixed heavy items kept: all
            outside = away.astype(np.float32) @ member.T  # fixed light items taken: none
            bad = (inside < stay.sum(-1, keepdims=True) - 0.5) | (outside > 0.5)
            excess[bad] = np.inf
        best = excess.argmin(-1)
        now = np.maximum(take_rows(gpu_load, heavy), take_rows(gpu_load, light))
        least = take_rows(excess.reshape(rows * k, -1), best.reshape(-1, 1)).reshape(rows, k)
        after = total[..., 0] / 2 + least
        better = after < now * (1 - 1e-6)
        if not better.any():
            break
        index = pick[best]  # [rows, k, 2S]
        keep = ~better[..., None]
        index += np.arange(0, rows * k * 2 * slots, 2 * slots).reshape(rows, k, 1)
        for gpus, pooled in zip(gpus_of, pools):
            new = np.where(keep, pooled, pooled.reshape(-1)[index])
            gpus[pair] = new.reshape(rows, k, 2, slots)
    for array, gpus in zip(arrays, gpus_of):
        if not np.shares_memory(array, gpus):  # reshape copied a non-contiguous array
            array[...] = gpus.reshape(array.shape)


def refine_swaps(
    place: np.ndarray,
    slot_load: np.ndarray,
    movable: np.ndarray,
    replicated: np.ndarray,
    max_rounds: int,
    pairs: int = 16,
    patience: int = 3,
    floor: np.ndarray | None = None,
) -> np.ndarray:
    """Pairwise exchange: swap slots between heavy and light GPUs while that evens them out.

    Each round, per row, the ``pairs`` heaviest GPUs are paired with the ``pairs`` lightest
    (the k-th heaviest with the k-th lightest, the pairing rotated by one each round so that
    every heavy GPU meets several partners). For every pair the swap of two ``movable``
    slots that brings the two loads closest together is made if it lowers the pair's larger
    load. Pairs are disjoint, so a round makes up to ``pairs`` swaps per row. When
    replicated slots may move, a replicated expert never gets two replicas on one GPU. A row
    stops after ``patience`` rounds without a swap, or once its most loaded GPU is at or below
    its ``floor``.

    Args:
        place, slot_load, movable, replicated: [rows, G, S] expert ids, loads, movable
            flags and replicated-expert flags of the slots (the same for every slot of an
            expert); updated in place.
        max_rounds: most rounds.
        floor: [rows] float64 GPU load below which a row's peak does not matter (e.g. the
            least possible peak of a heavier row that shares the measure); None = 0.
    Returns:
        [rows] int64 swaps made per row.
    """
    rows, num_gpus, slots = place.shape
    k = min(pairs, num_gpus // 2)
    swaps = np.zeros(rows, dtype=np.int64)
    if k == 0 or max_rounds == 0:
        return swaps
    # The rounds move item numbers (``perm``) only; the items' attributes are looked up.
    # Immovable items are -inf as a source and +inf as a destination, so that every swap
    # involving one has gain -inf without a mask.
    # float32 keys: the search only ranks candidate swaps (tolerance 1e-6 of the load)
    flat = (rows, num_gpus * slots)
    src_key = np.where(movable, slot_load, -np.inf).astype(np.float32).reshape(flat)
    dst_key = np.where(movable, slot_load, np.inf).astype(np.float32).reshape(flat)
    item_expert, item_load = place.reshape(flat).copy(), slot_load.reshape(flat).copy()
    item_replicated = replicated.reshape(flat).copy()
    perm = np.broadcast_to(np.arange(num_gpus * slots), flat).copy()
    perm = perm.reshape(rows, num_gpus, slots)
    perm_of_gpu = perm.reshape(rows * num_gpus, slots)  # a view: updates go to perm
    src_key, dst_key = src_key.reshape(-1), dst_key.reshape(-1)
    expert_of, replicated_of = item_expert.reshape(-1), item_replicated.reshape(-1)
    check = bool((movable & replicated).any())
    # Where a replicated item may move: its expert's replicas per (row, GPU), so that
    # "already on the other GPU" is one lookup (else a comparison of all S x S slots).
    num_experts = int(item_expert.max()) + 1 if check else 0
    count = None
    if check and rows * num_gpus * num_experts <= _MAX_PRESENCE:
        # (only replicated items: the flag is per expert, so any other item holding a
        # replicated item's expert is replicated too)
        gpu_of_item = np.arange(num_gpus * slots) // slots  # item numbers start in GPU order
        at = (np.arange(rows)[:, None] * num_gpus + gpu_of_item) * num_experts + item_expert
        count = np.zeros(rows * num_gpus * num_experts, dtype=np.int16)  # <= S per entry
        np.add.at(count, at[item_replicated], 1)
    gpu_load = slot_load.sum(-1)  # [rows, G], kept up to date
    stale = np.zeros(rows, dtype=np.int64)
    floor = np.zeros(rows) if floor is None else floor * (1 + 1e-6)
    active = np.flatnonzero(gpu_load.max(-1) > floor)
    rank = np.arange(k)
    # The k heavy GPUs' slots and then the k light ones' are fetched as one [n, 2k, S]
    # block: their keys from src_key and dst_key stacked (the light half reads the second)
    stacked_key = np.concatenate([src_key, dst_key])
    side = np.repeat(np.array([0, src_key.size], dtype=np.int64), k)[:, None]  # [2k, 1]
    barred = np.repeat(np.array([-np.inf, np.inf], dtype=np.float32), k)[:, None]
    for round_ in range(max_rounds):
        if active.size == 0:
            break
        loads = np.take(gpu_load, active, axis=0)
        order = np.argsort(loads, axis=-1, kind="stable")
        heavy = order[:, : -k - 1 : -1]  # [n, k] heaviest first
        light = order[:, (rank + round_) % k]
        high, low = take_rows(loads, heavy), take_rows(loads, light)
        half = (high - low).astype(np.float32) / 2
        # item numbers [n, 2k, S] of each pair's slots; flat indices (numpy's fancy
        # indexing by (row, item) costs several times more) of their attributes
        gpu_base = active[:, None] * num_gpus
        pair = np.concatenate([heavy, light], axis=1)  # [n, 2k]
        items = perm_of_gpu[gpu_base + pair]
        src, dst = items[:, :k], items[:, k:]
        item_at = items + (active * (num_gpus * slots))[:, None, None]
        src_at, dst_at = item_at[:, :k], item_at[:, k:]
        # moving delta from the heavy to the light GPU leaves the pair's larger load at
        # high - (half - |delta - half|): the best swap has delta closest to half
        value = stacked_key[item_at + side]
        if count is not None:
            # a replicated item whose expert the other GPU holds already cannot move: as
            # a source -inf, as a destination +inf (every swap with it then misses by inf)
            other = np.concatenate([light, heavy], axis=1)
            other_at = ((gpu_base + other) * num_experts)[..., None] + expert_of[item_at]
            bad = replicated_of[item_at] & (count[other_at] > 0)
            value = np.where(bad, barred, value)
        src_value, dst_value = value[:, :k], value[:, k:]
        miss = src_value[..., :, None] - dst_value[..., None, :]  # [n, k, S, S]
        miss -= half[..., None, None]
        np.abs(miss, out=miss)
        if check and count is None:
            same = expert_of[src_at][..., :, None] == expert_of[dst_at][..., None, :]
            # any() over an axis of S: S or-s of slices (numpy reduces short axes slowly)
            src_there, dst_there = same[..., 0].copy(), same[..., 0, :].copy()  # [n, k, S]
            for other in range(1, slots):
                src_there |= same[..., other]
                dst_there |= same[..., other, :]
            bad = (replicated_of[src_at] & src_there)[..., :, None] | (
                replicated_of[dst_at] & dst_there
            )[..., None, :]
            miss[bad] = np.inf
        miss = miss.reshape(active.size, k, -1)
        best = miss.argmin(-1)  # [n, k]
        gain = half - take_rows(miss.reshape(-1, miss.shape[-1]), best.reshape(-1, 1)).reshape(
            best.shape
        )
        take = gain > 1e-6 * high
        rr, kk = np.nonzero(take)
        if rr.size:
            i, j = np.divmod(best[rr, kk], slots)
            rows_sel = active[rr]
            g_src, g_dst = heavy[rr, kk], light[rr, kk]
            a, b = src[rr, kk, i], dst[rr, kk, j]
            moved = item_load[rows_sel, a] - item_load[rows_sel, b]
            gpu_load[rows_sel, g_src] -= moved
            gpu_load[rows_sel, g_dst] += moved
            perm[rows_sel, g_src, i], perm[rows_sel, g_dst, j] = b, a
            if count is not None:  # (distinct indices within each statement)
                src_at_e = (rows_sel * num_gpus + g_src) * num_experts
                dst_at_e = (rows_sel * num_gpus + g_dst) * num_experts
                ea, eb = item_expert[rows_sel, a], item_expert[rows_sel, b]
                count[src_at_e + ea] -= 1
                count[dst_at_e + ea] += 1
                count[dst_at_e + eb] -= 1
                count[src_at_e + eb] += 1
        made = take.sum(-1)
        swaps[active] += made
        stale[active] = np.where(made > 0, 0, stale[active] + 1)
        active = active[(stale[active] < patience) & (gpu_load[active].max(-1) > floor[active])]
    index = perm.reshape(-1) + np.repeat(np.arange(rows) * (num_gpus * slots), num_gpus * slots)
    for arr, item in ((place, item_expert), (slot_load, item_load)):
        arr[...] = item.reshape(-1)[index].reshape(arr.shape)
    for arr in (movable, replicated):
        arr[...] = arr.reshape(-1)[index].reshape(arr.shape)
    return swaps


# ---------------------------------------------------------------------- groups -> nodes
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


__all__ = [
    "bldm_pack",
    "pack_groups",
    "pair_splits",
    "repartition_pairs",
    "partitions_peak_bound",
    "place_replicated",
    "place_singles",
    "refine_swaps",
    "replica_counts",
]
