"""Local-search refinement of a placement: even out the GPUs by moving slots between them.

A greedy first placement (:mod:`.placement`) leaves some GPUs more loaded than others, and
the most loaded GPU is what a step waits for. Both functions here pair
the heaviest GPUs with the lightest and exchange slots within each pair while that lowers
the pair's larger load, in place, vectorized over rows (layers, or layers x nodes), in numpy
for the same reason as :mod:`.placement`:

- :func:`repartition_pairs` re-splits each pair's items exhaustively over all splits
  (:func:`pair_splits` of them): the stronger move, affordable for few slots per GPU;
- :func:`refine_swaps` makes the single best swap per pair: any number of slots per GPU,
  and it keeps a replicated expert off a GPU that holds it already.

Arrays: ``place`` [rows, G, S] int64 expert per slot and ``slot_load`` [rows, G, S]
float64 load per slot, both updated in place.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from .placement import take_rows

# largest (row, GPU, expert) table refine_swaps keeps for the replicated items' check
_MAX_PRESENCE = 1 << 20


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


__all__ = ["pair_splits", "refine_swaps", "repartition_pairs", "sum_last"]
