"""Route map-and-count: logical expert ids -> physical slots, tokens counted per slot.

The dispatch contract (``docs/dispatch.md``) fixes which replica each entry gets: entries of
expert ``e`` are numbered in row-major order (occurrence index ``n``), the shares cut
``[0, c[e])`` into intervals ``[b_{j-1}, b_j)``, and replica ``j`` takes the entries whose ``n``
falls in its interval. Three Triton launches compute it without a host synchronisation:

1. ``_hist_kernel`` (one program per block of ``BLOCK`` entries): per-block token counts
   per expert (column sums of one-hot [BLOCK, TILE_E] tiles).
2. ``_scan_kernel`` (one program per tile of experts): running prefix of the block counts
   over blocks, in place, and the totals ``c[e]``.
3. ``_map_kernel`` (one program per block): an entry's occurrence index is the prefix over
   earlier blocks plus its rank among the block's entries of the same expert (a cumulative
   sum of a one-hot [BLOCK, TILE_E] tile, expert tile by expert tile); it walks the expert's
   replicas to find the interval holding it, writes the slot, and the first entry of each
   interval adds the interval's length to ``counts[layer, slot]``.

For ``dispatch="local"`` the shares come from the fused water-fill kernel
(``waterfill_fused.py``, one launch, the same algorithm as the torch ``waterfill_shares`` of
the torch path within float32 rounding) on the totals of step 2, between steps 2 and 3.

Atomics and ordering (what makes it race-free on a GPU; the interpreter runs programs one by
one and proves none of this):
- step 1 writes disjoint workspace rows (one per block), no atomics;
- step 2 reads and rewrites whole columns of experts, one program per column tile;
- launches on one stream run in order, so step 3 sees steps 1-2 complete;
- in step 3 each entry of ``topk_ids`` is loaded exactly once, and the value stored at its
  position is computed from that loaded id (a data dependency, whichever thread stores it),
  so the store cannot overtake the load and ``out`` may alias ``topk_ids``;
- a slot belongs to one expert and each non-empty interval has exactly one first entry, so
  each slot gets at most one ``atomic_add`` per call; atomics (relaxed: nothing in the call
  reads ``counts`` back) keep the sum exact even if a corrupt layout gave one slot to two
  experts, or another stream updates the same counts row.

Floating point: shares are summed and ``floor(c * S_j + u_e)`` evaluated in float32 with FMA
contraction disabled (``enable_fp_fusion=False``), the same rounding as the torch reference.
"""

from __future__ import annotations

import torch

from eplb_plugin.kernels import checks, reference
from eplb_plugin.kernels._backend import backend_for, interpreting, next_power_of_2, tl, triton
from eplb_plugin.kernels.waterfill_fused import waterfill_shares_triton

__all__ = [
    "make_map_and_count_workspace",
    "map_and_count",
    "map_and_count_workspace_size",
]

make_map_and_count_workspace = checks.make_map_and_count_workspace
map_and_count_workspace_size = checks.map_and_count_workspace_size

if triton is not None:

    @triton.jit
    def _load_entries(
        ids_ptr,
        stride_t,
        stride_k,
        num_valid_ptr,
        num_valid,
        num_tokens,
        top_k,
        num_experts,
        block,
        NUM_VALID_FROM_PTR: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """The block's entries: (expert ids, token, k, in bounds, known expert, counted)."""
        offs = block * BLOCK + tl.arange(0, BLOCK)
        inside = offs < num_tokens * top_k
        token = offs // top_k
        k = offs % top_k
        ids = tl.load(ids_ptr + token * stride_t + k * stride_k, mask=inside, other=-1)
        ids = ids.to(tl.int32)
        if NUM_VALID_FROM_PTR:
            num_valid = tl.load(num_valid_ptr).to(tl.int32)
        known = inside & (ids >= 0) & (ids < num_experts)
        valid = known & (token < num_valid)
        return ids, token, k, inside, known, valid

    @triton.jit(do_not_specialize=["num_valid"])
    def _hist_kernel(
        ids_ptr,
        stride_t,
        stride_k,
        ws_ptr,
        num_valid_ptr,
        num_valid,
        num_tokens,
        top_k,
        num_experts,
        num_blocks,
        NUM_VALID_FROM_PTR: tl.constexpr,
        BLOCK: tl.constexpr,
        TILE_E: tl.constexpr,
    ):
        block = tl.program_id(0)
        ids, _, _, _, _, valid = _load_entries(
            ids_ptr,
            stride_t,
            stride_k,
            num_valid_ptr,
            num_valid,
            num_tokens,
            top_k,
            num_experts,
            block,
            NUM_VALID_FROM_PTR,
            BLOCK,
        )
        mine = tl.where(valid, ids, -1)
        for first_e in range(0, num_experts, TILE_E):
            experts = first_e + tl.arange(0, TILE_E)
            hot = mine[:, None] == experts[None, :]
            count = tl.sum(hot.to(tl.int32), 0)
            tl.store(ws_ptr + block * num_experts + experts, count, mask=experts < num_experts)

    @triton.jit
    def _scan_kernel(
        ws_ptr,
        num_experts,
        num_blocks,
        TILE_E: tl.constexpr,
        TILE_B: tl.constexpr,
    ):
        experts = tl.program_id(0) * TILE_E + tl.arange(0, TILE_E)
        in_e = experts < num_experts
        carry = tl.zeros([TILE_E], dtype=tl.int32)
        for start in range(0, num_blocks, TILE_B):
            blocks = start + tl.arange(0, TILE_B)
            mask = (blocks < num_blocks)[:, None] & in_e[None, :]
            ptrs = ws_ptr + blocks[:, None] * num_experts + experts[None, :]
            tile = tl.load(ptrs, mask=mask, other=0)
            inclusive = tl.cumsum(tile, 0)
            tl.store(ptrs, inclusive - tile + carry[None, :], mask=mask)
            carry += tl.sum(tile, 0)
        tl.store(ws_ptr + num_blocks * num_experts + experts, carry, mask=in_e)

    @triton.jit(do_not_specialize=["num_valid", "seed"])
    def _map_kernel(
        ids_ptr,
        stride_t,
        stride_k,
        out_ptr,
        out_stride_t,
        out_stride_k,
        log2phy_ptr,
        logcnt_ptr,
        share_ptr,
        counts_ptr,
        ws_ptr,
        num_valid_ptr,
        num_valid,
        seed_ptr,
        seed,
        offsets_ptr,
        totals_ptr,
        num_tokens,
        top_k,
        num_experts,
        width,
        num_slots,
        num_blocks,
        NUM_VALID_FROM_PTR: tl.constexpr,
        SEED_FROM_PTR: tl.constexpr,
        ALL_RANKS: tl.constexpr,
        BLOCK: tl.constexpr,
        TILE_E: tl.constexpr,
    ):
        block = tl.program_id(0)
        ids, token, k, inside, known, valid = _load_entries(
            ids_ptr,
            stride_t,
            stride_k,
            num_valid_ptr,
            num_valid,
            num_tokens,
            top_k,
            num_experts,
            block,
            NUM_VALID_FROM_PTR,
            BLOCK,
        )
        # padding rows: replica 0 of their expert; -1 (no expert) passes through
        first = tl.load(log2phy_ptr + tl.where(known, ids, 0) * width, mask=known, other=-1)
        out_at = out_ptr + token * out_stride_t + k * out_stride_k
        tl.store(out_at, first.to(out_ptr.dtype.element_ty), mask=inside & ~valid)

        # rank among the block's earlier entries of the same expert, one expert tile at a time
        mine = tl.where(valid, ids, -1)
        rank = tl.full([BLOCK], -1, dtype=tl.int32)
        for first_e in range(0, num_experts, TILE_E):
            hot = mine[:, None] == (first_e + tl.arange(0, TILE_E))[None, :]
            run = tl.cumsum(hot.to(tl.int32), 0)
            rank += tl.sum(tl.where(hot, run, 0), 1)
        e = tl.where(valid, ids, 0)
        earlier = tl.load(ws_ptr + block * num_experts + e, mask=valid, other=0)
        mine = tl.load(ws_ptr + num_blocks * num_experts + e, mask=valid, other=0)
        if ALL_RANKS:
            # all-rank numbering: this batch holds occurrences [start, start + mine) of c
            start = tl.load(offsets_ptr + e, mask=valid, other=0).to(tl.int32)
            c = tl.load(totals_ptr + e, mask=valid, other=0).to(tl.int32)
        else:
            start = tl.zeros([BLOCK], dtype=tl.int32)
            c = mine
        n = start + earlier + rank
        cnt = tl.load(logcnt_ptr + e, mask=valid, other=1).to(tl.int32)

        if SEED_FROM_PTR:
            seed = tl.load(seed_ptr)
        x = (e + 1).to(tl.float32) * 0.6180339887 + seed.to(tl.float32) * 0.7548776662
        u = x - tl.floor(x)
        c_f = c.to(tl.float32)
        cum = tl.zeros([BLOCK], dtype=tl.float32)
        lo = tl.zeros([BLOCK], dtype=tl.int32)
        slot_of = tl.full([BLOCK], -1, dtype=tl.int32)
        add = tl.zeros([BLOCK], dtype=tl.int32)
        for j in range(0, tl.max(tl.where(valid, cnt, 0), 0)):
            use = valid & (j < cnt)
            slot = tl.load(log2phy_ptr + e * width + j, mask=use, other=0).to(tl.int32)
            cum += tl.load(share_ptr + slot, mask=use, other=0.0)
            hi = tl.floor(c_f * cum + u).to(tl.int32)
            hi = tl.minimum(tl.maximum(hi, lo), c)
            # the last replica takes the rest (also past c, should totals be short)
            hi = tl.where(j == cnt - 1, tl.maximum(c, start + mine), hi)
            hit = use & (n >= lo) & (n < hi)
            slot_of = tl.where(hit, slot, slot_of)
            # the batch's first entry in the interval adds the batch's part of it
            first_n = tl.maximum(lo, start)
            add = tl.where(hit & (n == first_n), tl.minimum(hi, start + mine) - first_n, add)
            lo = tl.where(use, hi, lo)
        tl.store(out_at, slot_of.to(out_ptr.dtype.element_ty), mask=valid)
        in_range = (slot_of >= 0) & (slot_of < num_slots)
        tl.atomic_add(counts_ptr + slot_of, add, mask=valid & (add > 0) & in_range, sem="relaxed")


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
    workspace: torch.Tensor | None = None,
    block_size: int | None = None,
    waterfill_iters: int = 8,
    validate: bool | None = None,
    offsets: torch.Tensor | None = None,
    totals: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map logical expert ids to physical slots and count tokens per slot (docs/dispatch.md).

    Args:
        topk_ids: [N, K] int32/int64 logical expert ids (any strides); -1 = no expert
            (passes through as -1, never counted).
        log2phy: [L, E, X] int64 slots of each expert, -1 padded (the whole model's map).
        logcnt: [L, E] int64 replicas per expert.
        replica_share: [L, P] float32 share of its expert's tokens each slot gets; for
            ``static`` dispatch the shares used (a caller-computed split, e.g. global mode's
            after an all-reduce, goes here), for ``local`` the shares of idle experts.
        counts: [L, P] int32, row ``layer`` accumulated in place.
        layer: which layer's row of the maps to use.
        num_valid: 0-dim integer tensor on the device, or int: rows ``>= num_valid`` are
            padding, mapped to replica 0 of their expert and not counted.
        dispatch: ``"static"`` or ``"local"`` (water-filled from this batch's own counts;
            needs ``phy2log`` [L, P] int64 and ``slots_per_gpu``).
        seed: 0-dim int64 tensor on the device, int, or None (= 0): dither of the rounding.
        out: [N, K] like ``topk_ids`` to write into (may be ``topk_ids`` itself).
        workspace: 1-D int32 of at least ``map_and_count_workspace_size(N, K, E)``
            elements (``make_map_and_count_workspace``); allocated per call if None.
        block_size: entries per Triton program (power of two >= 16; default up to 256).
        waterfill_iters: sweeps of ``waterfill_shares`` in ``local`` mode.
        validate: check id/layout values before writing (reads tensor data: a host sync on
            a GPU). ``None`` = on CPU tensors only. Unvalidated out-of-range ids map to -1
            and are not counted; no memory outside the tensors is ever touched.
        offsets, totals: [E] int32/int64 on the device, both or neither (``static`` only):
            number this batch's entries of expert ``e`` from ``offsets[e]`` among the
            ``totals[e]`` entries of all ranks (global dispatch: the valid entries of the
            lower ranks, and of all ranks), so the apportionment is made once for all
            ranks; every rank must then pass the same ``seed`` and shares.

    Returns:
        [N, K] physical slot ids, dtype of ``topk_ids`` (``out`` when given).

    No host synchronisation and static launch shapes: capturable in a CUDA graph given a
    preallocated ``workspace`` and ``out`` (``local`` mode also runs the water-fill: the
    fused kernel on the Triton path, ``waterfill_shares`` on the torch path; their
    temporaries come from the graph's memory pool).
    """
    # the same arguments reach the checks, then the torch or the Triton implementation
    args = (topk_ids, log2phy, logcnt, replica_share, counts, layer, num_valid)
    options = dict(dispatch=dispatch, phy2log=phy2log, slots_per_gpu=slots_per_gpu, seed=seed,
                   out=out, waterfill_iters=waterfill_iters, offsets=offsets,
                   totals=totals)  # fmt: skip
    launch = dict(workspace=workspace, block_size=block_size)
    checks.check_map_and_count(*args, **options, **launch, validate=validate)
    if backend_for(topk_ids.device) == "torch":
        return reference.map_and_count(*args, **options)
    return _map_and_count_triton(*args, **options, **launch)


def _map_and_count_triton(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    replica_share: torch.Tensor,
    counts: torch.Tensor,
    layer: int,
    num_valid: torch.Tensor | int,
    *,
    dispatch: str,
    phy2log: torch.Tensor | None,
    slots_per_gpu: int | None,
    seed: torch.Tensor | int | None,
    out: torch.Tensor | None,
    workspace: torch.Tensor | None,
    block_size: int | None,
    waterfill_iters: int,
    offsets: torch.Tensor | None,
    totals: torch.Tensor | None,
) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    _, num_experts, width = log2phy.shape
    num_slots = replica_share.shape[1]
    entries = num_tokens * top_k
    if out is None:
        out = torch.empty_like(topk_ids)
    if entries == 0:
        return out
    block = checks.map_and_count_block(entries, block_size)
    num_blocks = -(-entries // block)
    if workspace is None:
        workspace = checks.make_map_and_count_workspace(
            num_tokens, top_k, num_experts, topk_ids.device, block
        )
    nv_from_ptr = isinstance(num_valid, torch.Tensor)
    nv_ptr = num_valid if nv_from_ptr else workspace  # unread placeholder when an int
    nv_value = 0 if nv_from_ptr else num_valid
    seed_from_ptr = isinstance(seed, torch.Tensor)
    seed_ptr = seed if seed_from_ptr else workspace
    seed_value = 0 if seed_from_ptr or seed is None else seed
    e_pad = next_power_of_2(num_experts)
    # one-hot [BLOCK, TILE_E] tiles: all experts at once in the interpreter (numpy is fast on
    # big tiles), about 8K elements a program on a GPU
    tile_e = e_pad if interpreting() else max(16, min(e_pad, 8192 // block))

    _hist_kernel[(num_blocks,)](
        topk_ids,
        topk_ids.stride(0),
        topk_ids.stride(1),
        workspace,
        nv_ptr,
        nv_value,
        num_tokens,
        top_k,
        num_experts,
        num_blocks,
        NUM_VALID_FROM_PTR=nv_from_ptr,
        BLOCK=block,
        TILE_E=tile_e,
    )
    scan_e = min(e_pad, 128)
    _scan_kernel[(triton.cdiv(num_experts, scan_e),)](
        workspace,
        num_experts,
        num_blocks,
        TILE_E=scan_e,
        TILE_B=min(next_power_of_2(num_blocks), 32),
    )
    # this batch's valid entries per expert (step 2); the argument ``totals`` is all ranks'
    batch_counts = workspace[num_blocks * num_experts : (num_blocks + 1) * num_experts]
    if dispatch == "static":
        share = replica_share[layer]
    elif dispatch == "local":
        # the fused water-fill: one launch for every sweep (the torch path runs the reference)
        rows = slice(layer, layer + 1)
        share = waterfill_shares_triton(
            batch_counts.unsqueeze(0), phy2log[rows], log2phy[rows], logcnt[rows], slots_per_gpu,
            replica_share[rows], waterfill_iters,
        )[0]  # fmt: skip
    else:
        share = reference.layer_shares(
            dispatch,
            batch_counts,
            layer,
            replica_share,
            log2phy,
            logcnt,
            phy2log,
            slots_per_gpu,
            waterfill_iters,
        ).contiguous()
    _map_kernel[(num_blocks,)](
        topk_ids,
        topk_ids.stride(0),
        topk_ids.stride(1),
        out,
        out.stride(0),
        out.stride(1),
        log2phy[layer],
        logcnt[layer],
        share,
        counts[layer],
        workspace,
        nv_ptr,
        nv_value,
        seed_ptr,
        seed_value,
        workspace if offsets is None else offsets,  # unread placeholders without offsets
        workspace if totals is None else totals,
        num_tokens,
        top_k,
        num_experts,
        width,
        num_slots,
        num_blocks,
        NUM_VALID_FROM_PTR=nv_from_ptr,
        SEED_FROM_PTR=seed_from_ptr,
        ALL_RANKS=offsets is not None,
        BLOCK=block,
        TILE_E=tile_e,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out
