"""Plain torch maths of the kernel ops: the fallback where Triton cannot run.

Each function here is the torch path of an op whose entry point (``map_and_count.py``,
``shuffle_experts.py``, ``pack.py``) has already checked the arguments (``checks.py``) and,
for the shuffle, planned the copies (``shuffle_plan.py``). Nothing here needs Triton or a
GPU, and nothing here checks arguments.

- ``map_and_count``: logical -> physical expert ids per the dispatch contract
  (``docs/dispatch.md``), counting tokens per physical slot. Sync-free on any device (sorts,
  scatters and gathers only).
- ``run_shuffle``: a planned in-place slot permutation, one slot-row ``copy_`` at a time.
- ``pack_slots`` / ``unpack_slots``: slot rows to and from one contiguous byte buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .shuffle_plan import ShufflePlan, shuffle_groups
from .slot_rows import slot_rows
from .waterfill import waterfill_shares

# Dither constants of the apportionment (docs/dispatch.md): frac of a 2-D Weyl sequence.
DITHER_EXPERT = 0.6180339887
DITHER_SEED = 0.7548776662


def dither(num_experts: int, seed: torch.Tensor | int | None, device: torch.device) -> torch.Tensor:
    """[E] float32 dither ``u_e = frac(0.6180339887 * (e + 1) + 0.7548776662 * seed)``.

    Computed in float32 as two products and one sum (the Triton kernel does the same, with
    FMA contraction disabled), so both backends round identically.
    """
    # torch.full, not torch.tensor: no host-to-device copy, so CUDA-graph capturable
    experts = torch.arange(1, num_experts + 1, device=device, dtype=torch.float32)
    x = experts * torch.full((), DITHER_EXPERT, dtype=torch.float32, device=device)
    if seed is not None:
        if not isinstance(seed, torch.Tensor):
            seed = torch.full((), seed, dtype=torch.int64, device=device)
        seed_f = seed.to(torch.float32)  # int -> float32 rounding, as the kernel's
        x = x + seed_f * torch.full((), DITHER_SEED, dtype=torch.float32, device=device)
    return x - torch.floor(x)


def layer_shares(
    dispatch: str,
    expert_counts: torch.Tensor,
    layer: int,
    replica_share: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    phy2log: torch.Tensor | None,
    slots_per_gpu: int | None,
    waterfill_iters: int,
) -> torch.Tensor:
    """[P] float32 replica shares the dispatch mode gives one batch of one layer.

    ``expert_counts``: [E] integer valid entries per logical expert in the batch.
    ``static`` returns ``replica_share[layer]``; ``local`` water-fills from the batch's own
    counts (``waterfill_shares``, pure torch and sync-free).
    """
    if dispatch == "static":
        return replica_share[layer]
    rows = slice(layer, layer + 1)
    shares = waterfill_shares(
        expert_counts.to(torch.float32).unsqueeze(0),
        phy2log[rows],
        log2phy[rows],
        logcnt[rows],
        slots_per_gpu,
        replica_share[rows],
        iters=waterfill_iters,
    )
    return shares[0]


def replica_bounds(
    expert_counts: torch.Tensor,
    log2phy_l: torch.Tensor,
    logcnt_l: torch.Tensor,
    share: torch.Tensor,
    seed: torch.Tensor | int | None,
) -> torch.Tensor:
    """[E, X] int64 interval ends ``b_j`` of each expert's replicas (docs/dispatch.md).

    Replica ``j`` of expert ``e`` serves occurrence indices ``[b_{j-1}, b_j)``; columns at
    or past ``logcnt[e] - 1`` hold ``c[e]``. ``b_j`` is also clamped to ``[b_{j-1}, c[e]]``,
    which only matters when float rounding pushes a partial sum of shares past 1.

    Args:
        expert_counts: [E] int64 valid entries per expert ``c[e]``.
        log2phy_l: [E, X] int64 the layer's slots per expert (-1 padded).
        logcnt_l: [E] int64 the layer's replica counts.
        share: [P] float32 shares for this batch.
        seed: dither seed (0-dim int tensor, int, or None = 0).
    """
    u = dither(log2phy_l.shape[0], seed, log2phy_l.device)
    return apportion(expert_counts, log2phy_l, logcnt_l, share, u)


def apportion(
    expert_counts: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    share: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """Interval ends ``b_j`` (:func:`replica_bounds`) for any number of batches at once.

    The same float32 arithmetic as the op, batch by batch: the aggregate model
    ``eplb_plugin.dispatch.token_loads`` reproduces the op's whole-token counts with it.

    Args:
        expert_counts: [..., E] integer ``c[e]`` per batch.
        log2phy: [..., E, X] int64 slots per expert (-1 padded).
        logcnt: [..., E] int64 replica counts.
        share: [..., P] float32 shares of each batch.
        u: [..., E] float32 dither of each batch (:func:`dither`).
    Returns:
        [..., E, X] int64.
    """
    width = log2phy.shape[-1]
    cols = torch.arange(width, device=log2phy.device)
    in_use = cols < logcnt.unsqueeze(-1)
    slots = log2phy.clamp(min=0)
    s = share.gather(-1, slots.flatten(-2)).view(slots.shape)
    s = torch.where(in_use, s, 0.0)
    # Cumulative shares summed left to right in float32, as the contract and the kernel do
    # (torch.cumsum accumulates float32 in double on CPU and in parallel on GPU).
    running = torch.zeros(s.shape[:-1], dtype=torch.float32, device=s.device)
    cumulative = []
    for j in range(width):
        running = running + s[..., j]
        cumulative.append(running)
    big_s = torch.stack(cumulative, -1) if width else s
    c = expert_counts.to(torch.int64).unsqueeze(-1)
    bounds = torch.floor(c.to(torch.float32) * big_s + u.unsqueeze(-1)).to(torch.int64)
    bounds = torch.minimum(bounds.clamp(min=0), c).cummax(-1).values
    last = cols >= (logcnt - 1).unsqueeze(-1)
    return torch.where(last, c, bounds)


def map_and_count(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    replica_share: torch.Tensor,
    counts: torch.Tensor,
    layer: int,
    num_valid: torch.Tensor | int,
    *,
    dispatch: str = "static",
    phy2log: torch.Tensor | None = None,
    slots_per_gpu: int | None = None,
    seed: torch.Tensor | int | None = None,
    out: torch.Tensor | None = None,
    waterfill_iters: int = 8,
    offsets: torch.Tensor | None = None,
    totals: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch path of ``eplb_plugin.kernels.map_and_count`` (same arguments, less the
    Triton-only ``workspace``/``block_size``/``validate``; checked by the caller).

    Sorting the entries by expert (stable) lines them up by occurrence index; replica ``j``
    of expert ``e`` then takes the next ``b_j - b_{j-1}`` entries, so the sorted slot ids are
    ``repeat_interleave`` of the slots by their token counts. With ``offsets``/``totals``
    the bounds are those of the all-rank numbering, and this batch, occurrences
    ``[offsets[e], offsets[e] + c[e])`` of it, takes its part of each interval. Allocates
    O(N * K + E * X) temporaries; no host synchronisation (``output_size`` keeps the repeat
    static).
    """
    num_tokens, top_k = topk_ids.shape
    _, num_experts, width = log2phy.shape
    device = topk_ids.device
    entries = num_tokens * top_k
    if out is None:
        out = torch.empty_like(topk_ids)
    if entries == 0:
        return out
    log2phy_l, logcnt_l = log2phy[layer], logcnt[layer]

    ids = topk_ids.reshape(-1).to(torch.int64)
    known = (ids >= 0) & (ids < num_experts)
    # entry i belongs to token i // K: valid iff i < num_valid * K (no division needed)
    valid = known & (torch.arange(entries, device=device) < num_valid * top_k)
    key = torch.where(valid, ids, num_experts)  # padding and -1 sort last, as expert E
    # int32 keys sort about 2.5x faster than int64 on CPU
    order = torch.sort(key.to(torch.int32), stable=True).indices
    per_key = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    per_key.scatter_add_(0, key, torch.ones_like(key))
    expert_counts = per_key[:num_experts]

    share = layer_shares(
        dispatch,
        expert_counts,
        layer,
        replica_share,
        log2phy,
        logcnt,
        phy2log,
        slots_per_gpu,
        waterfill_iters,
    )
    if offsets is None:
        bounds = replica_bounds(expert_counts, log2phy_l, logcnt_l, share, seed)  # [E, X]
    else:
        # this batch's part of the all-rank intervals, renumbered from its first occurrence
        start = offsets.to(torch.int64).unsqueeze(1)
        bounds = replica_bounds(totals.to(torch.int64), log2phy_l, logcnt_l, share, seed)
        bounds = torch.minimum((bounds - start).clamp(min=0), expert_counts.unsqueeze(1))
        last = torch.arange(width, device=device).unsqueeze(0) >= (logcnt_l - 1).unsqueeze(1)
        bounds = torch.where(last, expert_counts.unsqueeze(1), bounds)

    # tokens per replica: b_j - b_{j-1}; padding columns get 0
    prev = torch.cat([torch.zeros_like(bounds[:, :1]), bounds[:, :-1]], 1)
    in_use = torch.arange(width, device=device).unsqueeze(0) < logcnt_l.unsqueeze(1)
    per_slot = torch.where(in_use, bounds - prev, 0).reshape(-1)
    slots = log2phy_l.reshape(-1)
    counts[layer].scatter_add_(0, slots.clamp(min=0), per_slot.to(torch.int32))

    # sorted entries: valid ones expert by expert, replica by replica; then the rest
    filler = torch.full((1,), -1, dtype=slots.dtype, device=device)
    rest = per_key[num_experts:]  # entries sorted last (padding, -1)
    phys_sorted = torch.repeat_interleave(
        torch.cat([slots, filler]), torch.cat([per_slot, rest]), output_size=entries
    )
    phys = torch.empty_like(ids).scatter_(0, order, phys_sorted)
    # padding rows: replica 0 of their expert; -1 stays -1
    first = log2phy_l[ids.clamp(0, num_experts - 1), 0]
    phys = torch.where(valid, phys, torch.where(known, first, -1))
    out.copy_(phys.view(num_tokens, top_k))
    return out


def run_shuffle(
    tensors: Sequence[torch.Tensor],
    groups: Sequence[tuple[list[int], ShufflePlan]],
    staging: torch.Tensor | None,
) -> None:
    """Execute planned shuffles with torch copies, one slot row at a time."""
    for rows, stages, plan in shuffle_groups(tensors, groups, staging):
        for row, stage in zip(rows, stages):
            for wave in plan.waves:
                for step in wave:
                    src = stage if step.kind == "unstage" else row
                    dst = stage if step.kind == "stage" else row
                    for s, d in zip(step.src, step.dst):
                        dst[d].copy_(src[s])


def pack_slots(
    tensors: Sequence[torch.Tensor], slots: Sequence[int], per_slot: int, out: torch.Tensor
) -> torch.Tensor:
    """Torch path of ``eplb_plugin.kernels.pack_slots``: ``out`` [len(slots) * per_slot]
    uint8 gets, for each slot in order, each tensor's row bytes in order."""
    table = out.view(len(slots), per_slot) if slots else out
    offset = 0
    for t in tensors:
        rows = slot_rows(t)
        width = rows.shape[1]
        for i, s in enumerate(slots):
            table[i, offset : offset + width].copy_(rows[s])
        offset += width
    return out


def unpack_slots(
    tensors: Sequence[torch.Tensor], slots: Sequence[int], per_slot: int, buffer: torch.Tensor
) -> None:
    """Torch path of ``eplb_plugin.kernels.unpack_slots``: the inverse of :func:`pack_slots`
    into the given (distinct) slots."""
    table = buffer.view(len(slots), per_slot) if slots else buffer
    offset = 0
    for t in tensors:
        rows = slot_rows(t)
        width = rows.shape[1]
        for i, s in enumerate(slots):
            rows[s].copy_(table[i, offset : offset + width])
        offset += width
