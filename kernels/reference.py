"""Plain torch implementations of the kernel ops: the test oracle and the fallback.

Every op here has the same signature and semantics as its Triton-backed twin in
``map_and_count.py``, ``shuffle_experts.py`` and ``pack.py``; the argument checks live here
too, so both backends reject bad input with the same ``ValueError`` before writing anything.
Nothing here needs Triton or a GPU.

- ``map_and_count``: logical -> physical expert ids per the dispatch contract
  (``docs/dispatch.md``), counting tokens per physical slot. Sync-free on any device (sorts,
  scatters and gathers only) unless ``validate=True``.
- ``shuffle_experts``: in-place slot permutation with duplicates, one slot copy at a time
  following a ``ShufflePlan``, so it needs at most the staging the plan asks for.
- ``pack_slots`` / ``unpack_slots`` / ``bytes_per_slot``: slot rows to and from one
  contiguous byte buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Dither constants of the apportionment (docs/dispatch.md): frac of a 2-D Weyl sequence.
DITHER_EXPERT = 0.6180339887
DITHER_SEED = 0.7548776662
DISPATCH_MODES = ("static", "local")
INDEX_DTYPES = (torch.int32, torch.int64)
# Alignment of each tensor's area inside a staging buffer (bytes): lets copies use wide words.
STAGING_ALIGN = 16
# Rows up to this size are cut further when spare staging allows (Triton path only): an
# estimate, not a measurement here -- a launch costs ~5 us, and on an H100-class GPU (~3 TB/s)
# two extra copies of a 1 MiB row cost about the same, so larger rows gain nothing.
CUT_ROW_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------
# argument checks shared by both backends
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _describe(t: torch.Tensor) -> str:
    return f"shape={tuple(t.shape)} dtype={t.dtype} device={t.device}"


def _check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}, got {_describe(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like topk_ids, got {_describe(t)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got stride={t.stride()} ({_describe(t)})")
    return t


def map_and_count_block(num_entries: int, block_size: int | None = None) -> int:
    """Entries of ``topk_ids`` (``N * K``) that one Triton program maps; a power of two.

    Fixed by the entry count alone, so a workspace sized for the largest batch covers every
    smaller one.
    """
    if block_size is not None:
        if not _is_int(block_size) or block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
        return block_size
    block = 16
    while block < min(num_entries, 256):
        block *= 2
    return block


def map_and_count_workspace_size(
    num_tokens: int, top_k: int, num_experts: int, block_size: int | None = None
) -> int:
    """int32 elements of workspace ``map_and_count`` needs for a ``[num_tokens, top_k]`` batch.

    Layout: ``[B, E]`` per-block counts per expert (then their running prefix over blocks),
    followed by ``[E]`` per-expert totals, with ``B = ceil(num_tokens * top_k / block)``.
    The torch path needs none.
    """
    entries = num_tokens * top_k
    blocks = -(-entries // map_and_count_block(entries, block_size))
    return (blocks + 1) * num_experts


def make_map_and_count_workspace(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    device: torch.device | str,
    block_size: int | None = None,
) -> torch.Tensor:
    """Preallocate ``map_and_count``'s workspace: int32 [size] for batches up to ``num_tokens``."""
    size = map_and_count_workspace_size(num_tokens, top_k, num_experts, block_size)
    return torch.empty(size, dtype=torch.int32, device=device)


def check_map_and_count(
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
) -> None:
    """Raise ``ValueError`` naming the bad argument; reads no tensor data unless validating.

    Shapes, dtypes, devices and contiguity are always checked (metadata only). Values
    (expert ids in ``[-1, E)``, ``num_valid`` in ``[0, N]``, the layer's ``logcnt`` in
    ``[1, X]`` and its used ``log2phy`` entries in ``[0, P)``) are checked when ``validate``
    is true, or when it is ``None`` and the tensors are on the CPU, where reading them costs
    no device synchronisation.
    """
    ids = _check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    device = ids.device
    _check_tensor("log2phy", log2phy, ndim=3, dtypes=(torch.int64,), device=device, contiguous=True)
    num_layers, num_experts, _ = log2phy.shape
    _check_tensor("logcnt", logcnt, ndim=2, dtypes=(torch.int64,), device=device, contiguous=True)
    if tuple(logcnt.shape) != (num_layers, num_experts):
        raise ValueError(
            f"logcnt must be [L, E] = [{num_layers}, {num_experts}] like log2phy, "
            f"got {_describe(logcnt)}"
        )
    _check_tensor(
        "replica_share",
        replica_share,
        ndim=2,
        dtypes=(torch.float32,),
        device=device,
        contiguous=True,
    )
    if replica_share.shape[0] != num_layers:
        raise ValueError(
            f"replica_share must be [L, P] with L={num_layers}, got {_describe(replica_share)}"
        )
    num_slots = replica_share.shape[1]
    _check_tensor("counts", counts, ndim=2, dtypes=(torch.int32,), device=device, contiguous=True)
    if tuple(counts.shape) != (num_layers, num_slots):
        raise ValueError(
            f"counts must be [L, P] = [{num_layers}, {num_slots}] int32, got {_describe(counts)}"
        )
    if not _is_int(layer) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, {num_layers}), got {layer!r}")
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
    if dispatch == "local":
        if phy2log is None or slots_per_gpu is None:
            raise ValueError("dispatch='local' needs phy2log and slots_per_gpu")
        _check_tensor(
            "phy2log", phy2log, ndim=2, dtypes=(torch.int64,), device=device, contiguous=True
        )
        if tuple(phy2log.shape) != (num_layers, num_slots):
            raise ValueError(
                f"phy2log must be [L, P] = [{num_layers}, {num_slots}], got {_describe(phy2log)}"
            )
        if not _is_int(slots_per_gpu) or slots_per_gpu <= 0 or num_slots % slots_per_gpu:
            raise ValueError(
                f"slots_per_gpu must be a positive divisor of P={num_slots}, got {slots_per_gpu!r}"
            )
        if not _is_int(waterfill_iters) or waterfill_iters < 0:
            raise ValueError(f"waterfill_iters must be an int >= 0, got {waterfill_iters!r}")
    num_tokens, top_k = ids.shape
    if isinstance(num_valid, torch.Tensor):
        if num_valid.dim() != 0 or not _integer_dtype(num_valid.dtype):
            raise ValueError(
                f"num_valid must be a 0-dim integer tensor, got {_describe(num_valid)}"
            )
        if num_valid.device != device:
            raise ValueError(f"num_valid must be on {device} like topk_ids, got {num_valid.device}")
    elif not _is_int(num_valid) or not 0 <= num_valid <= num_tokens:
        raise ValueError(f"num_valid must be an int in [0, {num_tokens}], got {num_valid!r}")
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or not _integer_dtype(seed.dtype):
            raise ValueError(f"seed must be a 0-dim integer tensor, got {_describe(seed)}")
        if seed.device != device:
            raise ValueError(f"seed must be on {device} like topk_ids, got {seed.device}")
    elif seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be None, an int or a 0-dim int tensor, got {seed!r}")
    if out is not None:
        _check_tensor("out", out, ndim=2, dtypes=(ids.dtype,), device=device)
        if out.shape != ids.shape:
            raise ValueError(
                f"out must have topk_ids' shape {tuple(ids.shape)}, got {_describe(out)}"
            )
    entries = num_tokens * top_k
    block = map_and_count_block(entries, block_size)
    if workspace is not None:
        _check_tensor(
            "workspace", workspace, ndim=1, dtypes=(torch.int32,), device=device, contiguous=True
        )
        need = map_and_count_workspace_size(num_tokens, top_k, num_experts, block)
        if workspace.numel() < need:
            raise ValueError(
                f"workspace must hold at least {need} int32 elements for N={num_tokens}, "
                f"K={top_k}, E={num_experts}, got {workspace.numel()}"
            )
    if validate is None:
        validate = device.type == "cpu"
    if validate:
        _check_map_values(ids, log2phy[layer], logcnt[layer], num_slots, num_valid)


def _check_map_values(
    ids: torch.Tensor,
    log2phy_l: torch.Tensor,
    logcnt_l: torch.Tensor,
    num_slots: int,
    num_valid: torch.Tensor | int,
) -> None:
    num_experts, width = log2phy_l.shape
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"topk_ids must hold expert ids in [0, {num_experts}) or -1 (no expert), got {bad}"
            )
    nv = int(num_valid)
    if not 0 <= nv <= ids.shape[0]:
        raise ValueError(f"num_valid must be in [0, {ids.shape[0]}], got {nv}")
    cnt_lo, cnt_hi = int(logcnt_l.min()), int(logcnt_l.max())
    if cnt_lo < 1 or cnt_hi > width:
        raise ValueError(f"logcnt of the layer must be in [1, {width}], got [{cnt_lo}, {cnt_hi}]")
    used = torch.arange(width, device=log2phy_l.device) < logcnt_l.unsqueeze(1)
    slots = log2phy_l[used]
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
        raise ValueError(
            f"log2phy of the layer must hold slots in [0, {num_slots}) for each expert's "
            f"logcnt replicas, got [{int(slots.min())}, {int(slots.max())}]"
        )


# --------------------------------------------------------------------------------------------
# map_and_count
# --------------------------------------------------------------------------------------------


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
    from eplb_plugin.kernels.waterfill import waterfill_shares

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
    num_experts, width = log2phy_l.shape
    device = log2phy_l.device
    cols = torch.arange(width, device=device)
    in_use = cols.unsqueeze(0) < logcnt_l.unsqueeze(1)
    s = torch.where(in_use, share[log2phy_l.clamp(min=0)], 0.0)
    # Cumulative shares summed left to right in float32, as the contract and the kernel do
    # (torch.cumsum accumulates float32 in double on CPU and in parallel on GPU).
    running = torch.zeros(num_experts, dtype=torch.float32, device=device)
    cumulative = []
    for j in range(width):
        running = running + s[:, j]
        cumulative.append(running)
    big_s = torch.stack(cumulative, 1) if width else s
    c = expert_counts.to(torch.int64).unsqueeze(1)
    u = dither(num_experts, seed, device).unsqueeze(1)
    bounds = torch.floor(c.to(torch.float32) * big_s + u).to(torch.int64)
    bounds = torch.minimum(bounds.clamp(min=0), c).cummax(1).values
    last = cols.unsqueeze(0) >= (logcnt_l - 1).unsqueeze(1)
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
    workspace: torch.Tensor | None = None,
    block_size: int | None = None,
    waterfill_iters: int = 8,
    validate: bool | None = None,
) -> torch.Tensor:
    """Torch reference of ``eplb_plugin.kernels.map_and_count`` (same arguments and result)."""
    check_map_and_count(
        topk_ids,
        log2phy,
        logcnt,
        replica_share,
        counts,
        layer,
        num_valid,
        dispatch=dispatch,
        phy2log=phy2log,
        slots_per_gpu=slots_per_gpu,
        seed=seed,
        out=out,
        workspace=workspace,
        block_size=block_size,
        waterfill_iters=waterfill_iters,
        validate=validate,
    )
    return map_and_count_unchecked(
        topk_ids,
        log2phy,
        logcnt,
        replica_share,
        counts,
        layer,
        num_valid,
        dispatch=dispatch,
        phy2log=phy2log,
        slots_per_gpu=slots_per_gpu,
        seed=seed,
        out=out,
        waterfill_iters=waterfill_iters,
    )


def map_and_count_unchecked(
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
) -> torch.Tensor:
    """The torch path of ``map_and_count`` after ``check_map_and_count`` passed.

    Sorting the entries by expert (stable) lines them up by occurrence index; replica ``j``
    of expert ``e`` then takes the next ``b_j - b_{j-1}`` entries, so the sorted slot ids are
    ``repeat_interleave`` of the slots by their token counts. Allocates O(N * K + E * X)
    temporaries; no host synchronisation (``output_size`` keeps the repeat static).
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
    bounds = replica_bounds(expert_counts, log2phy_l, logcnt_l, share, seed)  # [E, X]

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


# --------------------------------------------------------------------------------------------
# slot tensors: shared by shuffle_experts and pack/unpack
# --------------------------------------------------------------------------------------------


def check_slot_tensors(tensors: object, name: str = "tensors") -> tuple[int, torch.device]:
    """Check a list of tensors indexed by slot on dim 0; return (S, device).

    Each tensor needs dim >= 1, the same ``shape[0]`` and device as the first, and rows that
    are contiguous in memory (``t[s]`` contiguous; the slot stride ``t.stride(0)`` is free), so
    a slot is one run of bytes.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise ValueError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    if not tensors:
        raise ValueError(f"{name} must not be empty")
    first = None
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"{name}[{i}] must have a slot dimension (dim >= 1), got 0-dim")
        if first is None:
            first = t
        elif t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name}[{i}] has {t.shape[0]} slots on dim 0 but {name}[0] has "
                f"{first.shape[0]}: all tensors must have the same slot count"
            )
        elif t.device != first.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {first.device}")
        if t.numel():
            twin = next(
                (
                    j
                    for j in range(i)
                    if tensors[j].numel() and tensors[j].data_ptr() == t.data_ptr()
                ),
                None,
            )
            if twin is not None:
                raise ValueError(
                    f"{name}[{i}] and {name}[{twin}] start at the same address: the same "
                    f"memory would be moved twice"
                )
        if not _rows_contiguous(t):
            raise ValueError(
                f"{name}[{i}] must have contiguous, non-overlapping slot rows "
                f"(t[s].is_contiguous()), got shape={tuple(t.shape)} stride={t.stride()}; "
                f"pass .contiguous() and copy back"
            )
    return first.shape[0], first.device


def _rows_contiguous(t: torch.Tensor) -> bool:
    if t.shape[0] == 0:
        return True
    if t.dim() > 1 and not t[0].is_contiguous():
        return False
    # rows of one slot must not overlap the next slot's (a broadcast view would)
    return t.shape[0] == 1 or t.stride(0) >= _row_elems(t)


def slot_rows(t: torch.Tensor) -> torch.Tensor:
    """[S, row_bytes] uint8 view of a tensor with contiguous slot rows (shares its memory)."""
    num_slots = t.shape[0]
    row_elems = 1
    for size in t.shape[1:]:
        row_elems *= size
    flat = t.as_strided((num_slots, row_elems), (t.stride(0), 1), t.storage_offset())
    if row_elems == 0 or num_slots == 0:
        return torch.empty(num_slots, 0, dtype=torch.uint8, device=t.device)
    return flat.view(torch.uint8)


WORD_DTYPES = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def word_size(*views: torch.Tensor | None, extra: Sequence[int] = ()) -> int:
    """Widest word (8, 4, 2 or 1 bytes) dividing every 2-D uint8 view's width, row stride
    and address, and every number in ``extra`` (byte offsets): copies then move whole words."""
    for size, _ in WORD_DTYPES:
        fits = all(n % size == 0 for n in extra)
        for v in views:
            if v is None:
                continue
            fits = fits and v.shape[1] % size == 0 and v.data_ptr() % size == 0
            fits = fits and (v.shape[0] <= 1 or v.stride(0) % size == 0)
        if fits:
            return size
    return 1


def as_words(view: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """A [rows, width] uint8 view re-read as ``size``-byte integers (same memory)."""
    if view is None or size == 1:
        return view
    dtype = dict(WORD_DTYPES)[size]
    # a lone row's stride is never used; make it one the dtype view accepts
    row_stride = view.stride(0) if view.shape[0] > 1 else view.shape[1]
    return view.as_strided(view.shape, (row_stride, 1), view.storage_offset()).view(dtype)


def bytes_per_slot(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes one slot occupies over all ``tensors`` (the stride of ``pack_slots``' layout)."""
    check_slot_tensors(tensors)
    return sum(_row_bytes(t) for t in tensors)


def _row_bytes(t: torch.Tensor) -> int:
    return _row_elems(t) * t.element_size()


def _row_elems(t: torch.Tensor) -> int:
    n = 1
    for size in t.shape[1:]:
        n *= size
    return n


def index_list(
    name: str, index: object, num_slots: int, device: torch.device, *, allow_minus_one: bool
) -> list[int]:
    """Host list of a 1-D int64 slot index (one synchronisation if on a GPU), range-checked."""
    if isinstance(index, torch.Tensor):
        if index.dim() != 1 or index.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name} must be a 1-D int64 tensor, got {_describe(index)}")
        if index.device.type != "cpu" and index.device != device:
            raise ValueError(f"{name} must be on the CPU or on {device}, got {index.device}")
        values = index.tolist()
    elif isinstance(index, (list, tuple)) and all(_is_int(v) for v in index):
        values = list(index)
    else:
        raise ValueError(f"{name} must be a 1-D int64 tensor or a list of ints, got {index!r}")
    lo = -1 if allow_minus_one else 0
    for i, v in enumerate(values):
        if not lo <= v < num_slots:
            allowed = f"[{lo}, {num_slots})"
            raise ValueError(f"{name}[{i}] = {v} is out of range {allowed}")
    return values


# --------------------------------------------------------------------------------------------
# shuffle_experts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShuffleStep:
    """Independent row copies: ``dst[i] <- src[i]``.

    ``kind`` is ``"slot"`` (slot -> slot), ``"stage"`` (slot -> staging row) or
    ``"unstage"`` (staging row -> slot).
    """

    kind: str
    src: tuple[int, ...]
    dst: tuple[int, ...]


@dataclass(frozen=True)
class ShufflePlan:
    """Waves of row copies that realise ``new[s] = old[new_to_old[s]]`` in place.

    Within a wave no destination is read and no destination repeats, so a wave's copies may
    run concurrently; waves run in order. ``num_staging`` staging rows are used.
    """

    waves: tuple[tuple[ShuffleStep, ...], ...]
    num_staging: int

    @property
    def num_copies(self) -> int:
        return sum(len(step.dst) for wave in self.waves for step in wave)


def plan_shuffle(
    new_to_old: Sequence[int], max_staging: int = 1, extra_cuts: bool = True
) -> ShufflePlan:
    """Order the copies of an in-place shuffle using at most ``max_staging`` staging rows.

    ``new_to_old[s]`` is the old slot whose content slot ``s`` gets (-1: left as is). Slots
    form a functional graph ``s -> new_to_old[s]``: trees hanging off cycles. Trees go first,
    leaves first (a slot is overwritten once nobody still has to read it), one wave per
    level. Each remaining cycle is cut at ``r`` points whose rows are staged; the pieces
    between cuts then shift one row per wave, all pieces in parallel, the last row of each
    piece reading the staged copy. Up to ``max_staging`` cycles are cut at once; with
    ``extra_cuts`` the rows left over cut the longest pieces again (fewer waves, but two more
    row copies per cut), otherwise every cycle is cut once (fewest copies).
    """
    if not _is_int(max_staging) or max_staging < 1:
        raise ValueError(f"max_staging must be an int >= 1, got {max_staging!r}")
    source = {d: m for d, m in enumerate(new_to_old) if m >= 0 and m != d}
    readers: dict[int, int] = {}
    for m in source.values():
        readers[m] = readers.get(m, 0) + 1
    waves: list[list[ShuffleStep]] = []
    done: set[int] = set()
    ready = sorted(d for d in source if readers.get(d, 0) == 0)
    while ready:
        waves.append([ShuffleStep("slot", tuple(source[d] for d in ready), tuple(ready))])
        nxt = []
        for d in ready:
            done.add(d)
            m = source[d]
            readers[m] -= 1
            if readers[m] == 0 and m in source:
                nxt.append(m)
        ready = sorted(nxt)

    cycles = []
    seen: set[int] = set(done)
    for d in sorted(source):
        if d in seen:
            continue
        cycle = []
        x = d
        while x not in seen:
            seen.add(x)
            cycle.append(x)
            x = source[x]
        cycles.append(cycle)

    tree_waves = len(waves)
    used = 0
    while cycles:
        batch, cycles = cycles[:max_staging], cycles[max_staging:]
        cuts = [1] * len(batch)
        for _ in range(max_staging - len(batch) if extra_cuts else 0):
            longest = max(range(len(batch)), key=lambda i: -(-len(batch[i]) // cuts[i]))
            if -(-len(batch[longest]) // cuts[longest]) <= 1:
                break
            cuts[longest] += 1
        stage_src, pieces = [], []
        for cycle, r in zip(batch, cuts):
            k = len(cycle)
            points = [i * k // r for i in range(r)]
            first_row = len(stage_src)
            stage_src.extend(cycle[p] for p in points)
            for i, p in enumerate(points):
                end = points[i + 1] if i + 1 < r else k
                # rows cycle[p .. end-1]; the last reads the staged copy of cycle[end % k]
                staged = first_row + (i + 1) % r
                pieces.append(([cycle[q] for q in range(p, end)], cycle[end % k], staged))
        used = max(used, len(stage_src))
        stage = ShuffleStep("stage", tuple(stage_src), tuple(range(len(stage_src))))
        if (
            tree_waves
            and len(waves) == tree_waves
            and not any(set(stage.src) & set(s.dst) for s in waves[0])
        ):
            waves[0].append(stage)  # staging reads only cycle rows, never written by trees
        else:
            waves.append([stage])
        longest = max(len(rows) for rows, _, _ in pieces)
        for step in range(longest):
            src, dst, un_src, un_dst = [], [], [], []
            for rows, _, staged in pieces:
                if step < len(rows) - 1:
                    src.append(source[rows[step]])
                    dst.append(rows[step])
                elif step == len(rows) - 1:
                    un_src.append(staged)
                    un_dst.append(rows[step])
            wave = []
            if dst:
                wave.append(ShuffleStep("slot", tuple(src), tuple(dst)))
            if un_dst:
                wave.append(ShuffleStep("unstage", tuple(un_src), tuple(un_dst)))
            waves.append(wave)
    return ShufflePlan(tuple(tuple(w) for w in waves), used)


def staging_layout(row_bytes: Sequence[int], rows: int) -> tuple[list[int], int]:
    """Byte offsets of each tensor's ``[rows, row_bytes]`` staging area, and the total size.

    Areas follow each other, each starting on a ``STAGING_ALIGN`` boundary so copies into
    them can use wide words.
    """
    offsets, end = [], 0
    for width in row_bytes:
        start = -(-end // STAGING_ALIGN) * STAGING_ALIGN
        offsets.append(start)
        end = start + rows * width
    return offsets, end


def _rows_that_fit(row_bytes: Sequence[int], budget: int) -> int:
    rows = budget // max(sum(row_bytes), 1)
    while rows > 0 and staging_layout(row_bytes, rows)[1] > budget:
        rows -= 1
    return rows


def staging_groups(
    row_bytes: Sequence[int], staging_bytes: int | None
) -> list[tuple[list[int], int]]:
    """Split tensors (by index) into groups shuffled together: ``[(indices, rows)]``.

    ``staging_bytes=None`` (default): one group, one staging row per tensor. A budget that
    holds a row of every tensor gives one group with as many rows as fit; a smaller one
    shuffles the tensors one at a time, each with as many of its own rows as fit.
    """
    everyone = list(range(len(row_bytes)))
    if staging_bytes is None:
        return [(everyone, 1)]
    if not _is_int(staging_bytes) or staging_bytes < 0:
        raise ValueError(f"staging_bytes must be an int >= 0, got {staging_bytes!r}")
    rows = _rows_that_fit(row_bytes, staging_bytes)
    if rows >= 1:
        return [(everyone, rows)]
    biggest = max(row_bytes)
    if staging_bytes < biggest:
        raise ValueError(
            f"staging_bytes={staging_bytes} is smaller than one slot row of the largest "
            f"tensor ({biggest} bytes): a cycle of slots cannot be shuffled in place"
        )
    return [([i], staging_bytes // row_bytes[i]) for i in everyone]


def staging_views(
    rows: Sequence[torch.Tensor], num_staging: int, buffer: torch.Tensor
) -> list[torch.Tensor]:
    """Carve the ``[num_staging, row_bytes]`` uint8 staging area of each tensor from ``buffer``."""
    widths = [r.shape[1] for r in rows]
    offsets, _ = staging_layout(widths, num_staging)
    return [
        buffer[start : start + num_staging * width].view(num_staging, width)
        for start, width in zip(offsets, widths)
    ]


def staging_buffer(
    rows: Sequence[torch.Tensor], num_staging: int, staging: torch.Tensor | None
) -> torch.Tensor:
    """The caller's staging buffer, or a fresh one just large enough for the plan."""
    if staging is not None:
        return staging
    _, need = staging_layout([r.shape[1] for r in rows], num_staging)
    return torch.empty(need, dtype=torch.uint8, device=rows[0].device)


def prepare_shuffle(
    tensors: Sequence[torch.Tensor],
    new_to_old: torch.Tensor | Sequence[int],
    staging_bytes: int | None,
    staging: torch.Tensor | None,
    parallel: bool = False,
) -> list[tuple[list[int], ShufflePlan]]:
    """Check the arguments and plan a shuffle: ``[(tensor indices, plan)]`` per group.

    ``parallel``: the executor runs a wave's copies at once (the Triton path), so spare
    staging rows may cut cycles further, when rows are small enough that saving a step of
    launches is worth two more row copies (``CUT_ROW_BYTES``). Reads ``new_to_old`` on the
    host (one synchronisation when it lives on a GPU).
    """
    num_slots, device = check_slot_tensors(tensors)
    mapping = index_list("new_to_old", new_to_old, num_slots, device, allow_minus_one=True)
    if len(mapping) != num_slots:
        raise ValueError(
            f"new_to_old has {len(mapping)} entries but the tensors have {num_slots} slots"
        )
    if staging is not None:
        _check_tensor("staging", staging, ndim=1, dtypes=(torch.uint8,), contiguous=True)
        if staging.device != device:
            raise ValueError(f"staging is on {staging.device} but tensors are on {device}")
        if staging_bytes is not None and staging_bytes != staging.numel():
            raise ValueError(
                f"staging_bytes={staging_bytes} disagrees with staging.numel()={staging.numel()}"
            )
        staging_bytes = staging.numel()
    row_bytes = [_row_bytes(t) for t in tensors]
    plans = []
    for group, rows in staging_groups(row_bytes, staging_bytes):
        small = max(row_bytes[i] for i in group) <= CUT_ROW_BYTES
        plans.append((group, plan_shuffle(mapping, rows, extra_cuts=parallel and small)))
    return plans


def shuffle_groups(
    tensors: Sequence[torch.Tensor],
    groups: Sequence[tuple[list[int], ShufflePlan]],
    staging: torch.Tensor | None,
):
    """Yield ``(rows, stages, plan)`` per group with work to do.

    ``rows``: [S, row_bytes] uint8 views of the group's tensors (zero-width ones left out);
    ``stages``: their [num_staging, row_bytes] uint8 staging areas (or ``None`` each).
    """
    for group, plan in groups:
        rows = [slot_rows(tensors[i]) for i in group]
        rows = [r for r in rows if r.shape[1]]
        if not plan.waves or not rows:
            continue
        if plan.num_staging:
            buffer = staging_buffer(rows, plan.num_staging, staging)
            stages = staging_views(rows, plan.num_staging, buffer)
        else:
            stages = [None] * len(rows)
        yield rows, stages, plan


def shuffle_experts(
    tensors: list[torch.Tensor],
    new_to_old: torch.Tensor | Sequence[int],
    *,
    staging_bytes: int | None = None,
    staging: torch.Tensor | None = None,
) -> None:
    """Torch reference of ``eplb_plugin.kernels.shuffle_experts``: one ``copy_`` per row."""
    groups = prepare_shuffle(tensors, new_to_old, staging_bytes, staging)
    run_shuffle(tensors, groups, staging)


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


def shuffle_experts_naive(tensors: list[torch.Tensor], new_to_old: Sequence[int]) -> None:
    """Oracle: ``t[s] = old_t[new_to_old[s]]`` through a full copy of each tensor."""
    for t in tensors:
        old = t.clone()
        for s, m in enumerate(new_to_old):
            if m >= 0:
                t[s] = old[m]


# --------------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------------


def check_pack(
    tensors: Sequence[torch.Tensor],
    slots: torch.Tensor | Sequence[int],
    buffer: torch.Tensor | None,
    *,
    buffer_name: str,
    unique: bool,
) -> tuple[list[int], int]:
    """Check pack/unpack arguments; return (host slot list, bytes per slot)."""
    num_slots, device = check_slot_tensors(tensors)
    values = index_list("slots", slots, num_slots, device, allow_minus_one=False)
    if unique and len(set(values)) != len(values):
        dup = next(v for v in values if values.count(v) > 1)
        raise ValueError(f"slots must not repeat a slot when unpacking, got {dup} twice")
    per_slot = sum(_row_bytes(t) for t in tensors)
    if buffer is not None:
        _check_tensor(buffer_name, buffer, ndim=1, dtypes=(torch.uint8,), contiguous=True)
        if buffer.device != device:
            raise ValueError(f"{buffer_name} is on {buffer.device} but tensors are on {device}")
        if buffer.numel() != len(values) * per_slot:
            raise ValueError(
                f"{buffer_name} must hold {len(values)} slots x {per_slot} bytes = "
                f"{len(values) * per_slot} bytes, got {buffer.numel()}"
            )
    return values, per_slot


def pack_slots(
    tensors: list[torch.Tensor],
    slots: torch.Tensor | Sequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of ``eplb_plugin.kernels.pack_slots``."""
    values, per_slot = check_pack(tensors, slots, out, buffer_name="out", unique=False)
    if out is None:
        out = torch.empty(len(values) * per_slot, dtype=torch.uint8, device=tensors[0].device)
    table = out.view(len(values), per_slot) if values else out
    offset = 0
    for t in tensors:
        rows = slot_rows(t)
        width = rows.shape[1]
        for i, s in enumerate(values):
            table[i, offset : offset + width].copy_(rows[s])
        offset += width
    return out


def unpack_slots(
    tensors: list[torch.Tensor], slots: torch.Tensor | Sequence[int], buffer: torch.Tensor
) -> None:
    """Torch reference of ``eplb_plugin.kernels.unpack_slots``."""
    if buffer is None:
        raise ValueError("buffer must be a uint8 tensor, got None")
    values, per_slot = check_pack(tensors, slots, buffer, buffer_name="buffer", unique=True)
    table = buffer.view(len(values), per_slot) if values else buffer
    offset = 0
    for t in tensors:
        rows = slot_rows(t)
        width = rows.shape[1]
        for i, s in enumerate(values):
            rows[s].copy_(table[i, offset : offset + width])
        offset += width
