"""DeepSeek's EPLB policy, output-identical to deepseek-ai/EPLB, vectorized over layers.

The reference walks every layer in Python; here each greedy step runs once for all rows
(layers, or layers x nodes) at a time, in numpy (a tenth of torch's per-op overhead on
arrays this small), with the reference's arithmetic so that ties break the same way:
torch's ``sort(descending=True)`` for the packing order (torch's unstable sort orders ties
its own way), torch's float32 sum for the group loads, the first maximum for replication,
and the first lightest pack with room for packing.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layout import ExpertLayout, Topology
from . import placement

# A pack with no room left: above the int32 bit pattern of every float32 load (inf included).
_FULL = np.int32(0x7FFFFFFF)
# Redundant slots per row above which _replicate finds the greedy's picks by a sort (the
# greedy loop takes a step of several numpy operations per slot; measured: the sort costs
# more at 64 redundant slots, half at 512), and the halvings of its level.
_SORTED_PICKS = 192
_PICK_HALVINGS = 6
# Loads from which _sort_order's int32 sort pays for its check and conversion.
_INT_SORT_SIZE = 2048
# Packs per row from which _packing_batches beats one item per step: a batch step costs
# several one-item steps, and places up to one item per pack.
_BATCH_PACKS = 8


def _packing_batches(
    sorted_load: np.ndarray, per_pack: int, packs: np.ndarray, ranks: np.ndarray
) -> int:
    """Run the greedy of :func:`_packing` several items per step where that is exact.

    Each pack is one int64 key, ``(load bits or _FULL) << 32 | pack << 16 | items``, so that
    a row's keys sort as the reference's min() ranks the packs (lightest, then first).
    A step proposes each row's next items, in order, to its packs in that order (item j of
    the step to the j-th lightest key k_j, giving it key n_j); item j's proposal is what
    the one-item greedy would do exactly when every pack loaded earlier in the step now
    ranks above the j-th: min(n_0 .. n_{j-1}) > k_j. That holds for a prefix of the
    proposals (if it holds for j it holds for every earlier one, the k_j ascending), which
    the row keeps; it moves on by that many items, at least one (the lightest pack with
    room is the greedy's choice), so that one row's short step holds back no other row.
    Rounds of heaviest-first packing mostly hold whole: a row takes about one step per
    round (9 steps for 72 items on 8 packs instead of 72), and the step count is the
    slowest row's; ties and zero loads make steps short.

    Args:
        sorted_load: [rows, items] float32, each row's loads heaviest first.
        packs, ranks: [rows, items] int64 written with the pack and rank of each item.
    Returns:
        the number of steps taken.
    """
    rows, items = sorted_load.shape
    num_packs = items // per_pack
    width = items + num_packs  # every row may read and write num_packs items past its end
    padded = np.zeros((rows, width), dtype=np.float32)
    padded[:, :items] = sorted_load
    padded = padded.reshape(-1)
    out_packs = np.empty(rows * width, dtype=np.int64)
    out_ranks = np.empty(rows * width, dtype=np.int64)
    # proposals are [num_packs, rows] (lane-major: the prefix scan runs over whole rows)
    lane = np.arange(num_packs, dtype=np.int64)[:, None]
    lane_start = lane + np.arange(rows, dtype=np.int64) * width  # flat start of each row
    key = np.broadcast_to(lane.T << 16, (rows, num_packs)).copy()
    low = np.int64(0xFFFFFFFF)
    full = np.int64(_FULL)
    done = np.zeros(rows, dtype=np.int64)
    steps = 0
    while rows and done.min() < items:
        steps += 1
        key.sort(axis=1)
        head = np.ascontiguousarray(key.T)  # [num_packs, rows], lightest first
        at = lane_start + done  # flat positions of the proposed items
        bits = head >> 32
        count = head & 0xFFFF
        load = bits.astype(np.int32).view(np.float32) + padded[at]
        new_bits = np.where(count == per_pack - 1, _FULL, load.view(np.int32))
        new_key = (new_bits.astype(np.int64) << 32) | ((head & low) + 1)
        holds = bits != full  # (a finished row's packs are all full: it takes nothing)
        holds[1:] &= np.minimum.accumulate(new_key[:-1], axis=0) > head[1:]
        # every proposal is written; those that do not hold are proposed (and written)
        # again from the next step on
        out_packs[at] = (head >> 16) & 0xFFFF
        out_ranks[at] = count
        done += holds.sum(0)
        key = np.ascontiguousarray(np.where(holds, new_key, head).T)  # (sorts faster)
    packs[...] = out_packs.reshape(rows, width)[:, :items]
    ranks[...] = out_ranks.reshape(rows, width)[:, :items]
    return steps


def _sort_order(weight: torch.Tensor) -> np.ndarray:
    """The reference's ``weight.sort(-1, descending=True).indices`` of a [rows, n] float32
    tensor, as numpy.

    torch's sort is unstable (std::sort: ties come out in an order of its own), so it is
    torch's sort that runs. For loads >= 0 it runs on their int32 bit patterns, which order
    as the loads do (-0.0 made +0.0 first): a comparison sort given the same comparisons
    moves the elements the same way, and the int32 comparator skips the float one's NaN
    checks (a third faster). tests/test_plan_speed_equivalence.py checks the two orders
    equal on tie-heavy loads.
    """
    if weight.numel() >= _INT_SORT_SIZE and bool(weight.min() >= 0):
        weight = (weight + 0.0).view(torch.int32)
    return weight.sort(-1, descending=True).indices.numpy()


def _packing_sorted(
    weight: torch.Tensor, num_packs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`balanced_packing`'s greedy on a float32 [rows, items] tensor, in the order it
    places the items.

    Returns:
        (order, packs, ranks) [rows, items] int64: the j-th item placed in a row is item
        ``order[row, j]``, and goes to pack ``packs[row, j]`` as its ``ranks[row, j]``-th.
    """
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:  # item i alone in pack i
        index = np.broadcast_to(np.arange(items, dtype=np.int64), (rows, items))
        return index, index, np.zeros((rows, items), dtype=np.int64)
    order = _sort_order(weight)
    sorted_load = _gather(weight.numpy(), order)  # heaviest first
    if _BATCH_PACKS <= num_packs < 1 << 16 and per_pack < 1 << 16:  # (fields of the keys)
        packs = np.empty((rows, items), dtype=np.int64)
        ranks = np.empty((rows, items), dtype=np.int64)
        _packing_batches(sorted_load, per_pack, packs, ranks)
    else:
        packs = np.empty((items, rows), dtype=np.int64).T  # column-major: one item per step
        ranks = np.empty((items, rows), dtype=np.int64).T
        _packing_steps(sorted_load, num_packs, packs, ranks)
    return order, packs, ranks


def _packing(weight: torch.Tensor, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`balanced_packing` on a float32 [rows, items] tensor, results in numpy."""
    rows, items = weight.shape
    order, packs, ranks = _packing_sorted(weight, num_packs)
    at = (order + _row_offsets(rows, items)).reshape(-1)
    pack_index = np.empty(rows * items, dtype=np.int64)
    rank_in_pack = np.empty(rows * items, dtype=np.int64)
    pack_index[at] = packs.reshape(-1)
    rank_in_pack[at] = ranks.reshape(-1)
    return pack_index.reshape(rows, items), rank_in_pack.reshape(rows, items)


def _packing_steps(
    sorted_load: np.ndarray,
    num_packs: int,
    packs: np.ndarray,
    ranks: np.ndarray,
) -> None:
    """The greedy of :func:`_packing` one item per step (few packs, or too many for the
    fields of :func:`_packing_batches`' keys; the tests' plain twin of that).

    Args:
        sorted_load: [rows, items] float32, each row's loads heaviest first.
        packs, ranks: [rows, items] int64 written with the pack and rank of each item.
    """
    rows, items = sorted_load.shape
    per_pack = items // num_packs
    # A key per pack that orders the packs as the reference's min() does: the bit pattern
    # of its float32 load (monotone in the load for loads >= 0, inf included: -0.0 cannot
    # arise, a sum starting at +0.0 stays +0.0) or _FULL once it has no room. argmin's
    # first minimum is then the first lightest pack with room, whose key holds its load.
    key = np.zeros((rows, num_packs), dtype=np.int32)
    flat_key = key.reshape(-1)
    count = np.zeros(rows * num_packs, dtype=np.int64)
    step_load = np.ascontiguousarray(sorted_load.T)  # row i: every row's i-th item
    full = np.zeros(per_pack, dtype=np.int32)
    full[-1] = _FULL  # or-ed into the key of a pack taking its last item
    base = np.arange(rows, dtype=np.int64) * num_packs
    for i in range(items):
        pack = key.argmin(-1)
        packs[:, i] = pack
        at = pack + base
        rank = count[at]
        ranks[:, i] = rank
        count[at] = rank + 1
        load = flat_key[at].view(np.float32) + step_load[i]
        flat_key[at] = load.view(np.int32) | full[rank]


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack items into ``num_packs`` packs of equal item count, heaviest first onto the lightest.

    Args:
        weight: [rows, items] float32; items % num_packs == 0.
    Returns:
        (pack_index [rows, items] int64, rank_in_pack [rows, items] int64).
    """
    pack_index, rank_in_pack = _packing(weight.float().contiguous(), num_packs)
    return torch.from_numpy(pack_index), torch.from_numpy(rank_in_pack)


def _replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`replicate_experts` on a float32 [rows, num_log] array, results in numpy."""
    rows, num_log = weight.shape
    extra = num_phy - num_log
    if extra < 0:
        raise ValueError(f"{num_phy} slots cannot hold {num_log} experts")
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    picks = _extra_replicas(weight, extra) if extra > _SORTED_PICKS else None
    if picks is not None:
        phy2log = np.empty((rows, num_phy), dtype=np.int64)
        phy2log[:, :num_log] = np.arange(num_log)
        phy2log[:, num_log:] = picks[0]
        rank = np.zeros((rows, num_phy), dtype=np.int64)
        rank[:, num_log:] = picks[1]
        offsets = _row_offsets(rows, num_log)
        logcnt = np.bincount((phy2log + offsets).reshape(-1), minlength=rows * num_log)
        return phy2log, rank, logcnt.reshape(rows, num_log)
    flat = weight.reshape(-1)
    # load per replica, as the reference's float32 / int64 division computes it (w / 1 = w);
    # only the chosen expert's entry changes per step. Counts are kept in float32 (exact
    # up to 2**24) so that the division needs no conversion.
    per_replica = flat.copy()
    per_replica_2d = per_replica.reshape(rows, num_log)
    count = np.ones(rows * num_log, dtype=np.float32)
    base = np.arange(rows, dtype=np.int64) * num_log
    chosen_of = np.empty((extra, rows), dtype=np.int64)  # [step, row]: contiguous per step
    taken_of = np.empty((extra, rows), dtype=np.float32)
    for i in range(extra):
        chosen = per_replica_2d.argmax(-1)
        chosen_of[i] = chosen
        at = chosen + base
        taken = count[at]
        taken_of[i] = taken
        taken += 1
        count[at] = taken
        per_replica[at] = flat[at] / taken
    phy2log = np.empty((rows, num_phy), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    phy2log[:, num_log:] = chosen_of.T
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    rank[:, num_log:] = taken_of.T
    return phy2log, rank, count.astype(np.int64).reshape(rows, num_log)


def _extra_replicas(weight: np.ndarray, extra: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The redundant slots :func:`_replicate`'s greedy hands out, found by one sort.

    The k-th extra replica of expert e is picked when e's load per replica is w_e / k (in
    float32, as the reference divides); per expert these values fall as k grows, and the
    greedy always takes the largest value left, the lowest expert first among equals. So
    its picks are the ``extra`` largest candidates (e, k), in the order (value descending,
    e, k): a stable sort of the candidates listed by (e, k). Candidates are listed up to
    k_e = floor(w_e / level), at a level bisected (in float64) to just below the
    ``extra``-th largest value; the result stands only if every candidate left out,
    (e, k_e + 1), is smaller than the last one picked, which makes it the greedy's whatever
    the level. Otherwise (or for loads that are not finite and positive) None: the caller
    runs the greedy.

    Args:
        weight: [rows, E] float32.
    Returns:
        (expert [rows, extra] int64, replica index [rows, extra] int64) in pick order, or
        None.
    """
    rows, num_log = weight.shape
    load = weight.astype(np.float64)
    total = load.sum(-1)
    if not (rows and np.isfinite(total).all() and (total > 0).all() and load.min() >= 0):
        return None
    # sum_e floor(w_e / L) >= extra at L = total / (extra + E): at least ``extra`` values
    # lie above it; bisect towards total / extra, keeping that
    low, high = total / (extra + num_log), total / extra
    for _ in range(_PICK_HALVINGS):
        mid = (low + high) / 2
        enough = np.floor(load / mid[:, None]).sum(-1) >= extra
        low, high = np.where(enough, mid, low), np.where(enough, high, mid)
    listed = np.minimum(np.floor(load / low[:, None]), extra).astype(np.int64)  # [rows, E]
    per_row = listed.sum(-1)
    if (per_row < extra).any():
        return None
    width = int(per_row.max())
    expert = np.repeat(np.tile(np.arange(num_log, dtype=np.int64), rows), listed.reshape(-1))
    row = np.repeat(np.arange(rows, dtype=np.int64), per_row)
    row_first = np.cumsum(per_row) - per_row  # candidates before each row's
    within = np.arange(expert.size, dtype=np.int64) - row_first[row]  # position in the row
    run_first = np.cumsum(listed.reshape(-1)) - listed.reshape(-1)  # each expert's first
    k = within + row_first[row] - run_first[row * num_log + expert] + 1
    value = weight.reshape(-1)[row * num_log + expert] / k.astype(np.float32)
    at = row * width + within
    padded = np.full(rows * width, -np.inf, dtype=np.float32)
    padded[at] = value
    by_position = np.zeros(rows * width, dtype=np.int64)
    by_position[at] = expert * (extra + 1) + k  # (e, k) of each listed candidate
    order = placement.argsort_stable(padded.reshape(rows, width), descending=True)
    picked = _gather(by_position.reshape(rows, width), order[:, :extra])
    last = _gather(padded.reshape(rows, width), order[:, extra - 1 : extra])  # [rows, 1]
    unlisted = np.where(listed < extra, weight / (listed + 1).astype(np.float32), -np.inf)
    if not (unlisted < last).all():
        return None
    return picked // (extra + 1), picked % (extra + 1)


def replicate_experts(
    weight: torch.Tensor, num_phy: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each redundant slot to the expert with the highest load per replica.

    Args:
        weight: [rows, num_log] float32.
        num_phy: slots per row (>= num_log).
    Returns:
        (phy2log [rows, num_phy] int64, rank [rows, num_phy] int64 replica index,
        logcnt [rows, num_log] int64).
    """
    arrays = _replicate(weight.float().numpy(), num_phy)
    phy2log, rank, logcnt = (torch.from_numpy(a) for a in arrays)
    return phy2log, rank, logcnt


def _row_offsets(rows: int, width: int) -> np.ndarray:
    """[rows, 1] int64 flat index of each row's first element in a [rows, width] array."""
    return (np.arange(rows, dtype=np.int64) * width)[:, None]


def _gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[r, index[r, j]]`` for [rows, n] ``values`` (flat indexing: numpy's
    take_along_axis costs several times more on arrays this small)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    return flat[index + _row_offsets(*values.shape)]


def _scatter(index: np.ndarray, values: np.ndarray, width: int) -> np.ndarray:
    """[rows, width] int64 ``out`` with ``out[r, index[r, j]] = values[r, j]``, -1 elsewhere."""
    rows = index.shape[0]
    out = np.full(rows * width, -1, dtype=np.int64)
    out[(index + _row_offsets(rows, width)).reshape(-1)] = values.reshape(-1)
    return out.reshape(rows, width)


def _check_permutation(perm: np.ndarray, what: str) -> None:
    # a -1 left by _scatter would index the previous row when gathered
    if perm.size and perm.min() < 0:
        raise RuntimeError(f"DeepSeek policy: {what} is not a permutation (please report)")


def _hierarchical(
    weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hierarchical` on a float32 [L, E] tensor -> (phy2log, rank) in numpy."""
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_phy // num_gpus
    log_per_node = num_log // num_nodes
    phy_per_node = num_phy // num_nodes

    # 1. expert groups -> nodes (torch's float32 sum: its summation order, as the reference)
    if num_groups == 1:  # one group, one node: the experts keep their order
        mlog2log = None
        mlog_load = weight.numpy()
    else:
        group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
        order, packs, ranks = _packing_sorted(group_load, num_nodes)
        # node-major slot of each group (node n owns slots n * groups_per_node ...)
        group_at = _scatter(packs * groups_per_node + ranks, order, num_groups)
        _check_permutation(group_at, "the groups' order by node")
        mlog2log = (group_at[:, :, None] * group_size + np.arange(group_size)).reshape(
            num_layers, num_log
        )
        mlog_load = _gather(weight.numpy(), mlog2log).reshape(-1, log_per_node)

    # 2. replicas within each node: rows are (layer, node)
    phy2mlog, phy_rank, mlogcnt = _replicate(mlog_load, phy_per_node)

    # 3. a node's replicas -> its GPUs
    phy_load = _gather(mlog_load / mlogcnt.astype(np.float32), phy2mlog)
    order, packs, ranks = _packing_sorted(torch.from_numpy(phy_load), num_gpus // num_nodes)
    pphy = packs * slots_per_gpu + ranks  # the slot of each replica, in packing order
    node_base = np.arange(0, num_log, log_per_node, dtype=np.int64)
    node_base = np.tile(node_base, num_layers)[:, None]  # [L * nodes, 1]
    pphy2mlog = _scatter(pphy, _gather(phy2mlog, order) + node_base, phy_per_node)
    _check_permutation(pphy2mlog, "the replicas' order by GPU")
    pphy_rank = _scatter(pphy, _gather(phy_rank, order), phy_per_node).reshape(num_layers, -1)
    pphy2mlog = pphy2mlog.reshape(num_layers, -1)
    pphy2log = pphy2mlog if mlog2log is None else _gather(mlog2log, pphy2mlog)
    return pphy2log, pphy_rank


def hierarchical(
    weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups -> nodes, replicas within each node, replicas -> GPUs of the node.

    Args:
        weight: [L, E] float32.
    Returns:
        (phy2log [L, P] int64, rank [L, P] int64, logcnt [L, E] int64).
    """
    weight = weight.float().contiguous()
    phy2log, rank = _hierarchical(weight, num_phy, num_groups, num_nodes, num_gpus)
    offsets = _row_offsets(*weight.shape)
    logcnt = np.bincount((phy2log + offsets).reshape(-1), minlength=weight.numel())
    arrays = phy2log, rank, logcnt.reshape(weight.shape)
    return tuple(torch.from_numpy(a) for a in arrays)


def _topology_args(topology: Topology) -> tuple[int, int, int, int]:
    t = topology
    if t.hierarchical:
        return t.num_replicas, t.num_groups, t.num_nodes, t.num_gpus
    return t.num_replicas, 1, 1, t.num_gpus


def deepseek_tensors(
    weight: torch.Tensor, topology: Topology
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's policy on a validated [L, E] float32 load -> (phy2log, rank, logcnt)."""
    return hierarchical(weight, *_topology_args(topology))


def deepseek_policy(
    weight: torch.Tensor,
    topology: Topology,
    previous: ExpertLayout | None = None,
    *,
    steps: torch.Tensor | None = None,
) -> ExpertLayout:
    """Placement exactly as deepseek-ai/EPLB computes it (equal split across replicas).

    It takes no options. Args:
        weight: [L, E] float32 load (validated by ``plan``); ``previous`` and ``steps``
            (per-step loads) are ignored: DeepSeek plans on the window's sum.
    """
    weight = weight.float().contiguous()
    phy2log, rank = _hierarchical(weight, *_topology_args(topology))
    return ExpertLayout.from_plan(phy2log, rank, topology, weight.shape[1])
