"""Argument checks of the kernel ops, and the sizes derived from their arguments.

Both backends of every op (the Triton kernel and the torch reference) run these checks in
the op's entry point (``map_and_count.py``, ``shuffle_experts.py``, ``pack.py``), so bad input
is rejected with the same ``ValueError`` before anything is written. Metadata only (shapes,
dtypes, devices, strides), except where a docstring says it reads values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The modes the map_and_count op itself implements. The user-facing "global" mode
# (eplb_plugin.names.DISPATCH_MODES) is "static" here, with shares the caller all-reduced.
OP_DISPATCH_MODES = ("static", "local")
INDEX_DTYPES = (torch.int32, torch.int64)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _describe(t: torch.Tensor) -> str:
    return f"shape={tuple(t.shape)} dtype={t.dtype} device={t.device}"


def check_tensor(
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
        if not is_int(block_size) or block_size < 16 or block_size & (block_size - 1):
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
    offsets: torch.Tensor | None = None,
    totals: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming the bad argument; reads no tensor data unless validating.

    Shapes, dtypes, devices and contiguity are always checked (metadata only). Values
    (expert ids in ``[-1, E)``, ``num_valid`` in ``[0, N]``, the layer's ``logcnt`` in
    ``[1, X]`` and its used ``log2phy`` entries in ``[0, P)``) are checked when ``validate``
    is true, or when it is ``None`` and the tensors are on the CPU, where reading them costs
    no device synchronisation.
    """
    ids = check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES)
    device = ids.device
    check_tensor("log2phy", log2phy, ndim=3, dtypes=(torch.int64,), device=device, contiguous=True)
    num_layers, num_experts, _ = log2phy.shape
    check_tensor("logcnt", logcnt, ndim=2, dtypes=(torch.int64,), device=device, contiguous=True)
    if tuple(logcnt.shape) != (num_layers, num_experts):
        raise ValueError(
            f"logcnt must be [L, E] = [{num_layers}, {num_experts}] like log2phy, "
            f"got {_describe(logcnt)}"
        )
    check_tensor(
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
    check_tensor("counts", counts, ndim=2, dtypes=(torch.int32,), device=device, contiguous=True)
    if tuple(counts.shape) != (num_layers, num_slots):
        raise ValueError(
            f"counts must be [L, P] = [{num_layers}, {num_slots}] int32, got {_describe(counts)}"
        )
    if not is_int(layer) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, {num_layers}), got {layer!r}")
    if dispatch not in OP_DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {OP_DISPATCH_MODES}, got {dispatch!r}")
    if dispatch == "local":
        if phy2log is None or slots_per_gpu is None:
            raise ValueError("dispatch='local' needs phy2log and slots_per_gpu")
        check_tensor(
            "phy2log", phy2log, ndim=2, dtypes=(torch.int64,), device=device, contiguous=True
        )
        if tuple(phy2log.shape) != (num_layers, num_slots):
            raise ValueError(
                f"phy2log must be [L, P] = [{num_layers}, {num_slots}], got {_describe(phy2log)}"
            )
        if not is_int(slots_per_gpu) or slots_per_gpu <= 0 or num_slots % slots_per_gpu:
            raise ValueError(
                f"slots_per_gpu must be a positive divisor of P={num_slots}, got {slots_per_gpu!r}"
            )
        if not is_int(waterfill_iters) or waterfill_iters < 0:
            raise ValueError(f"waterfill_iters must be an int >= 0, got {waterfill_iters!r}")
    num_tokens, top_k = ids.shape
    if isinstance(num_valid, torch.Tensor):
        if num_valid.dim() != 0 or not _integer_dtype(num_valid.dtype):
            raise ValueError(
                f"num_valid must be a 0-dim integer tensor, got {_describe(num_valid)}"
            )
        if num_valid.device != device:
            raise ValueError(f"num_valid must be on {device} like topk_ids, got {num_valid.device}")
    elif not is_int(num_valid) or not 0 <= num_valid <= num_tokens:
        raise ValueError(f"num_valid must be an int in [0, {num_tokens}], got {num_valid!r}")
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or not _integer_dtype(seed.dtype):
            raise ValueError(f"seed must be a 0-dim integer tensor, got {_describe(seed)}")
        if seed.device != device:
            raise ValueError(f"seed must be on {device} like topk_ids, got {seed.device}")
    elif seed is not None and not is_int(seed):
        raise ValueError(f"seed must be None, an int or a 0-dim int tensor, got {seed!r}")
    if (offsets is None) != (totals is None):
        raise ValueError("offsets and totals go together: pass both or neither")
    if offsets is not None:
        if dispatch != "static":
            raise ValueError("offsets/totals need dispatch='static' (shares given by the caller)")
        for name, value in (("offsets", offsets), ("totals", totals)):
            check_tensor(name, value, ndim=1, dtypes=INDEX_DTYPES, device=device, contiguous=True)
            if value.shape[0] != num_experts:
                raise ValueError(f"{name} must be [E] = [{num_experts}], got {_describe(value)}")
    if out is not None:
        check_tensor("out", out, ndim=2, dtypes=(ids.dtype,), device=device)
        if out.shape != ids.shape:
            raise ValueError(
                f"out must have topk_ids' shape {tuple(ids.shape)}, got {_describe(out)}"
            )
    entries = num_tokens * top_k
    block = map_and_count_block(entries, block_size)
    if workspace is not None:
        check_tensor(
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
        if offsets is not None and bool((offsets < 0).any() | (totals < 0).any()):
            raise ValueError("offsets and totals must be >= 0")


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
# slot tensors: shuffle_experts and pack/unpack
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
    return t.shape[0] == 1 or t.stride(0) >= slot_row_elems(t)


def bytes_per_slot(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes one slot occupies over all ``tensors`` (the stride of ``pack_slots``' layout)."""
    check_slot_tensors(tensors)
    return sum(slot_row_bytes(t) for t in tensors)


def slot_row_bytes(t: torch.Tensor) -> int:
    return slot_row_elems(t) * t.element_size()


def slot_row_elems(t: torch.Tensor) -> int:
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
    elif isinstance(index, (list, tuple)) and all(is_int(v) for v in index):
        values = list(index)
    else:
        raise ValueError(f"{name} must be a 1-D int64 tensor or a list of ints, got {index!r}")
    lo = -1 if allow_minus_one else 0
    for i, v in enumerate(values):
        if not lo <= v < num_slots:
            allowed = f"[{lo}, {num_slots})"
            raise ValueError(f"{name}[{i}] = {v} is out of range {allowed}")
    return values


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
    per_slot = sum(slot_row_bytes(t) for t in tensors)
    if buffer is not None:
        check_tensor(buffer_name, buffer, ndim=1, dtypes=(torch.uint8,), contiguous=True)
        if buffer.device != device:
            raise ValueError(f"{buffer_name} is on {buffer.device} but tensors are on {device}")
        if buffer.numel() != len(values) * per_slot:
            raise ValueError(
                f"{buffer_name} must hold {len(values)} slots x {per_slot} bytes = "
                f"{len(values) * per_slot} bytes, got {buffer.numel()}"
            )
    return values, per_slot
