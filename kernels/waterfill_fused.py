"""Fused water-fill: ``waterfill_shares`` as one Triton launch, every sweep on-chip.

The torch function ``eplb_plugin.kernels.waterfill.waterfill_shares`` stays the reference
(and what the host-side dispatch model calls); this kernel computes the same damped Jacobi
sweeps (duplicate replicas on one GPU as one bin, heavy-ball momentum with the shares clamped
at 0, renormalisation, singles = 1, idle experts keep ``base_share``) in ONE launch instead
of about 30 + 36 x sweeps small torch kernels.

Layout: one program per layer row. Slot quantities live in a ``[G_PAD, S_PAD]`` tile
(slot ``p = g * S + s``), expert quantities in an ``[E_PAD, X_PAD]`` tile (replica ``x`` of
expert ``e`` is slot ``log2phy[e, x]``). Moving a value between the two (a gather by slot,
by expert or by GPU) goes through a small per-layer scratch row in global memory: store,
CTA barrier (``tl.debug_barrier``, i.e. ``bar.sync``, which makes the block's global writes
visible to the whole block), load. One sweep has four such exchanges; a buffer is rewritten
only after a later barrier, so no thread still reads the old value. The sort of each
expert's <= X replica bins is done by rank counting (a bin's rank is the number of bins
below it, ties by index), and the sum of the k lowest bins is the sum of the bins whose rank
is at most the bin's own: O(E X^2) work, no ``tl.sort``. Pairwise comparisons (bins of one
expert; slots of one GPU holding the same expert) are one [E, X, X] / [G, S, S] tile when
that has at most ``CUBE_ELEMENTS`` elements (and always in the interpreter), else a loop
over the last axis in O(E X) / O(G S) registers.

Agreement with the reference: the same formulas in float32 with FMA contraction off, but
the sums (GPU loads, a GPU's own load of an expert, the sorted prefix sums, the
renormalisation) are added in another order, so results agree within float32 rounding, not
bitwise (``tests/test_kernels_waterfill.py`` checks ``atol=2e-5`` on shares after up to 32
sweeps). Every row stays non-negative and sums to 1 per expert.

On a GPU the whole layer row is one CTA: fine for one layer per call (the dispatch op) and
a few hundred slots; the tile sizes grow with E x X and G x S, so very wide layouts (X or S
in the hundreds) would spill registers.
"""

from __future__ import annotations

import torch

from eplb_plugin.kernels._backend import backend_for, interpreting, next_power_of_2, tl, triton
from eplb_plugin.kernels.waterfill import MOMENTUM, waterfill_shares

__all__ = ["fits_one_block", "waterfill", "waterfill_shares_triton"]

# largest [G, S, S] or [E, X, X] tile compared in one go on a GPU (16 elements a thread at
# 8 warps); wider layouts loop over the last axis instead
CUBE_ELEMENTS = 4096
# largest [E, X] or [G, S] tile the one-CTA kernel takes (64 elements a thread at 8 warps);
# wider layouts would spill registers, so ``waterfill`` runs the torch reference for them
MAX_TILE_ELEMENTS = 16384


def fits_one_block(num_experts: int, width: int, num_gpus: int, slots_per_gpu: int) -> bool:
    """Whether the fused kernel takes this layout (its padded tiles within
    ``MAX_TILE_ELEMENTS``): E experts with up to ``width`` replicas, G GPUs of S slots."""
    tile = max(
        next_power_of_2(num_experts) * next_power_of_2(width),
        next_power_of_2(num_gpus) * next_power_of_2(slots_per_gpu),
    )
    return tile <= MAX_TILE_ELEMENTS


if triton is not None:

    @triton.jit
    def _level(bins, counts, xs, X_PAD: tl.constexpr, CUBE: tl.constexpr):
        """[E_PAD] water level ``min_k (c + sum of the k lowest bins) / k`` per expert.

        ``bins``: [E_PAD, X_PAD] float32 (+inf for no bin); ``xs``: [1, X_PAD] replica index.
        ``CUBE``: compare all pairs in one [E_PAD, X_PAD, X_PAD] tile (few instructions,
        E X^2 registers) instead of a loop over the X_PAD columns.
        """
        if CUBE:
            b_x = bins[:, :, None]
            b_y = bins[:, None, :]
            ys = tl.arange(0, X_PAD)[None, None, :]
            lower = (b_y < b_x) | ((b_y == b_x) & (ys < xs[:, :, None]))
            rank = tl.sum(lower.to(tl.int32), 2)
            lowest = tl.sum(tl.where(rank[:, None, :] <= rank[:, :, None], b_y, 0.0), 2)
        else:
            rank = tl.zeros(bins.shape, dtype=tl.int32)
            for y in tl.static_range(X_PAD):
                b_y = tl.sum(tl.where(xs == y, bins, 0.0), 1)[:, None]
                lower = (b_y < bins) | ((b_y == bins) & (y < xs))
                rank += lower.to(tl.int32)
            lowest = tl.zeros(bins.shape, dtype=tl.float32)
            for y in tl.static_range(X_PAD):
                b_y = tl.sum(tl.where(xs == y, bins, 0.0), 1)[:, None]
                r_y = tl.sum(tl.where(xs == y, rank, 0), 1)[:, None]
                lowest += tl.where(r_y <= rank, b_y, 0.0)
        return tl.min((counts[:, None] + lowest) / (rank + 1).to(tl.float32), 1)

    @triton.jit
    def _own_load(phy, contrib, s, S: tl.constexpr, CUBE: tl.constexpr):
        """[G_PAD, S_PAD] load of each slot's expert on the slot's GPU (its replicas there
        together). ``CUBE``: one [G_PAD, S_PAD, S_PAD] tile instead of a loop over S."""
        if CUBE:
            same = phy[:, :, None] == phy[:, None, :]
            own = tl.sum(tl.where(same, contrib[:, None, :], 0.0), 2)
        else:
            own = tl.zeros(contrib.shape, dtype=tl.float32)
            for j in tl.static_range(S):
                phy_j = tl.sum(tl.where(s == j, phy, 0), 1)
                contrib_j = tl.sum(tl.where(s == j, contrib, 0.0), 1)
                own += tl.where(phy == phy_j[:, None], contrib_j[:, None], 0.0)
        return own

    @triton.jit
    def _waterfill_kernel(
        counts_ptr,
        phy2log_ptr,
        log2phy_ptr,
        logcnt_ptr,
        base_ptr,
        out_ptr,
        scratch_ptr,
        iters,
        momentum,
        num_experts,
        width,
        num_gpus,
        scratch_stride,
        S: tl.constexpr,
        G_PAD: tl.constexpr,
        S_PAD: tl.constexpr,
        E_PAD: tl.constexpr,
        X_PAD: tl.constexpr,
        OWN_CUBE: tl.constexpr,
        LEVEL_CUBE: tl.constexpr,
    ):
        layer = tl.program_id(0)
        num_slots = num_gpus * S
        inf = float("inf")
        # scratch row of this layer: [P] per slot | [E] per expert | [G] per GPU
        slot_buf = scratch_ptr + layer * scratch_stride
        expert_buf = slot_buf + num_slots
        gpu_buf = expert_buf + num_experts
        counts_row = counts_ptr + layer * num_experts

        # slot tile [G_PAD, S_PAD]
        gs = tl.arange(0, G_PAD)
        g = gs[:, None]
        s = tl.arange(0, S_PAD)[None, :]
        in_slot = (g < num_gpus) & (s < S)
        p = g * S + s
        phy_row = phy2log_ptr + layer * num_slots
        phy = tl.load(phy_row + p, mask=in_slot, other=-1).to(tl.int32)
        expert_of = tl.where(in_slot, phy, 0)
        # expert tile [E_PAD, X_PAD]
        es = tl.arange(0, E_PAD)
        in_e = es < num_experts
        xs = tl.arange(0, X_PAD)[None, :]
        in_ex = in_e[:, None] & (xs < width)
        l2p_row = log2phy_ptr + layer * num_experts * width
        l2p = tl.load(l2p_row + es[:, None] * width + xs, mask=in_ex, other=-1).to(tl.int32)
        valid = l2p >= 0
        slot_ex = tl.where(valid, l2p, 0)
        gpu_ex = slot_ex // S
        counts_e = tl.load(counts_row + es, mask=in_e, other=0).to(tl.float32)

        # replicas of one expert on one GPU: ndup of them, only the first is a bin
        ndup = tl.zeros([G_PAD, S_PAD], dtype=tl.float32)
        repeat = tl.zeros([G_PAD, S_PAD], dtype=tl.int1)
        for j in tl.static_range(S):
            phy_j = tl.load(phy_row + gs * S + j, mask=gs < num_gpus, other=-2).to(tl.int32)
            same_j = phy == phy_j[:, None]
            ndup += same_j.to(tl.float32)
            repeat = repeat | (same_j & (j < s))
        ndup = tl.where(in_slot, ndup, 1.0)  # padding: no 0 / 0 in the discarded lanes

        slot_count = tl.load(counts_row + expert_of, mask=in_slot, other=0).to(tl.float32)
        cnt = tl.load(logcnt_ptr + layer * num_experts + expert_of, mask=in_slot, other=1)
        single = cnt == 1
        idle = slot_count <= 0
        keep = single | idle
        base = tl.load(base_ptr + layer * num_slots + p, mask=in_slot, other=0.0)
        fixed = tl.where(single, 1.0, base.to(tl.float32))
        share = fixed
        safe_count = tl.where(idle, 1.0, slot_count)

        prev = share
        for _ in range(iters):
            contrib = slot_count * share
            gpu_load = tl.sum(contrib, 1)
            # padding slots contribute 0, so their matches do not count
            background = gpu_load[:, None] - _own_load(phy, contrib, s, S, OWN_CUBE)
            # slot -> expert: each expert's bins
            tl.store(slot_buf + p, tl.where(repeat, inf, background), mask=in_slot)
            tl.debug_barrier()
            bins = tl.load(slot_buf + slot_ex, mask=valid, other=inf)
            level = _level(bins, counts_e, xs, X_PAD, LEVEL_CUBE)
            # expert -> slot: the level of the slot's expert
            tl.store(expert_buf + es, level, mask=in_e)
            tl.debug_barrier()
            slot_level = tl.load(expert_buf + expert_of, mask=in_slot, other=0.0)
            fill = tl.maximum(slot_level - background, 0.0)
            new = tl.where(keep, fixed, fill / (safe_count * ndup))
            # damping: net change of each GPU vs the largest change one expert wants there
            delta = (new - share) * slot_count
            net = tl.abs(tl.sum(delta, 1))
            alone = tl.max(tl.abs(delta * ndup), 1)
            ratio = tl.where(net > alone, alone / tl.maximum(net, 1e-30), 1.0)
            # GPU -> expert: the smallest ratio over the expert's GPUs
            tl.store(gpu_buf + gs, ratio, mask=gs < num_gpus)
            tl.debug_barrier()
            step = tl.min(tl.load(gpu_buf + gpu_ex, mask=valid, other=1.0), 1)
            tl.store(expert_buf + es, step, mask=in_e)
            tl.debug_barrier()
            slot_step = tl.load(expert_buf + expert_of, mask=in_slot, other=0.0)
            want = new - share
            moved = share + slot_step * want
            # heavy-ball kick as in the reference; momentum 0 leaves ``moved`` as it is (it
            # is >= 0, and ``fixed`` where ``keep``)
            last = share - prev
            kick = tl.minimum(tl.maximum(want * 10.0, tl.minimum(last, 0.0)), tl.maximum(last, 0.0))
            moved = tl.where(keep, fixed, tl.maximum(moved + momentum * kick, 0.0))
            prev = share
            share = moved

        # renormalise per expert against drift
        tl.store(slot_buf + p, share, mask=in_slot)
        tl.debug_barrier()
        total = tl.sum(tl.load(slot_buf + slot_ex, mask=valid, other=0.0), 1)
        tl.store(expert_buf + es, total, mask=in_e)
        tl.debug_barrier()
        slot_total = tl.load(expert_buf + expert_of, mask=in_slot, other=1.0)
        share = tl.where(single, 1.0, share / slot_total)
        tl.store(out_ptr + layer * num_slots + p, share, mask=in_slot)


def waterfill_shares_triton(
    counts: torch.Tensor,
    phy2log: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    slots_per_gpu: int,
    base_share: torch.Tensor,
    iters: int = 8,
    *,
    momentum: float = MOMENTUM,
    cube: bool | None = None,
) -> torch.Tensor:
    """``waterfill_shares`` in one Triton launch (same arguments, shapes and result, within
    float32 rounding). No host synchronisation; the scratch row is allocated per call.

    Args:
        counts: [L, E] float32 or integer tokens per logical expert (non-negative).
        phy2log: [L, P] int64; log2phy: [L, E, X] int64 (-1 padded); logcnt: [L, E] int64.
        slots_per_gpu: slots per GPU (P is a multiple of it).
        base_share: [L, P] float32 starting split.
        iters: water-fill sweeps (>= 0).
        momentum: heavy-ball factor in [0, 1), as in ``waterfill_shares``.
        cube: pairwise comparisons as one 3-D tile (True) or a loop (False); None: cubes
            up to ``CUBE_ELEMENTS`` elements, and always in the interpreter (where each
            tile op costs far more than its size).

    Returns:
        [L, P] float32 shares on ``counts.device``.
    """
    if triton is None:
        raise RuntimeError("waterfill_shares_triton needs Triton")
    num_layers, num_slots = phy2log.shape
    _, num_experts, width = log2phy.shape
    if slots_per_gpu < 1 or num_slots % slots_per_gpu:
        raise ValueError(f"slots_per_gpu={slots_per_gpu} must divide P={num_slots}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    num_gpus = num_slots // slots_per_gpu
    out = torch.empty(num_layers, num_slots, dtype=torch.float32, device=counts.device)
    if num_layers == 0 or num_slots == 0:
        return out
    stride = num_slots + num_experts + num_gpus
    scratch = torch.empty(num_layers, stride, dtype=torch.float32, device=counts.device)
    e_pad, x_pad = next_power_of_2(num_experts), next_power_of_2(width)
    g_pad, s_pad = next_power_of_2(num_gpus), next_power_of_2(slots_per_gpu)
    tile = max(e_pad * x_pad, g_pad * s_pad)
    own_cube, level_cube = g_pad * s_pad * s_pad, e_pad * x_pad * x_pad
    if cube is None:
        own_cube, level_cube = (
            interpreting() or n <= CUBE_ELEMENTS for n in (own_cube, level_cube)
        )
    else:
        own_cube = level_cube = cube
    _waterfill_kernel[(num_layers,)](
        counts.contiguous(),
        phy2log.contiguous(),
        log2phy.contiguous(),
        logcnt.contiguous(),
        base_share.to(torch.float32).contiguous(),
        out,
        scratch,
        iters,
        float(momentum),
        num_experts,
        width,
        num_gpus,
        stride,
        S=slots_per_gpu,
        G_PAD=g_pad,
        S_PAD=s_pad,
        E_PAD=e_pad,
        X_PAD=x_pad,
        OWN_CUBE=own_cube,
        LEVEL_CUBE=level_cube,
        # 8 warps keep E = 256 tiles at ~110-130 registers a thread on sm_90 (4: 170-240)
        num_warps=min(16, max(8, tile // 128)),
        enable_fp_fusion=False,
    )
    return out


def waterfill(
    counts: torch.Tensor,
    phy2log: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    slots_per_gpu: int,
    base_share: torch.Tensor,
    iters: int = 8,
    *,
    momentum: float = MOMENTUM,
) -> torch.Tensor:
    """The water-fill of the device ops: the fused Triton kernel where Triton runs
    (``_backend.backend_for``) and the layout fits one thread block (:func:`fits_one_block`),
    else the torch reference ``waterfill_shares``. Same arguments and result as
    ``waterfill_shares`` ([L, P] float32)."""
    _, num_experts, width = log2phy.shape
    num_gpus = phy2log.shape[1] // max(slots_per_gpu, 1)
    fits = fits_one_block(num_experts, width, num_gpus, slots_per_gpu)
    if fits and backend_for(counts.device) == "triton":
        return waterfill_shares_triton(
            counts, phy2log, log2phy, logcnt, slots_per_gpu, base_share, iters, momentum=momentum
        )
    return waterfill_shares(
        counts, phy2log, log2phy, logcnt, slots_per_gpu, base_share, iters, momentum=momentum
    )
