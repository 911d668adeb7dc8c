"""Pack slot rows into one contiguous transfer buffer, and unpack them back into slots.

Used around the runtime's all-to-all: ``pack_slots(tensors, slots)`` gathers the rows to
send to one peer into a uint8 buffer laid out slot-major (for each slot in order, for each
tensor in order, that tensor's row bytes); ``unpack_slots(tensors, slots, buffer)`` scatters a
received buffer of the same layout into the given slots. ``bytes_per_slot(tensors)`` is the
stride of that layout.

``_pack_kernel`` moves one tensor's rows, one program per (row chunk, slot), as the widest
integer word that the row width, slot stride, offset in the buffer and addresses allow.

Ordering (why it is race-free on a GPU): packing writes disjoint buffer ranges (one per
(slot, tensor)); unpacking writes distinct slots (``unpack_slots`` rejects repeats) and
reads only the buffer. One launch per tensor on one stream, no atomics. The buffer must not
alias the tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eplb_plugin.kernels import checks, reference
from eplb_plugin.kernels._backend import backend_for, tl, triton
from eplb_plugin.kernels.shuffle_experts import MAX_GRID_Y, copy_block
from eplb_plugin.kernels.slot_rows import as_words, slot_rows, word_size

__all__ = ["bytes_per_slot", "pack_slots", "unpack_slots"]

bytes_per_slot = checks.bytes_per_slot

if triton is not None:

    @triton.jit
    def _pack_kernel(
        rows_ptr,
        rows_stride,
        buffer_ptr,
        buffer_stride,
        buffer_offset,
        slots_ptr,
        row_words,
        UNPACK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row_words
        i = tl.program_id(1).to(tl.int64)
        slot = tl.load(slots_ptr + i).to(tl.int64)
        at_rows = rows_ptr + slot * rows_stride + cols
        at_buffer = buffer_ptr + i * buffer_stride + buffer_offset + cols
        if UNPACK:
            tl.store(at_rows, tl.load(at_buffer, mask=mask), mask=mask)
        else:
            tl.store(at_buffer, tl.load(at_rows, mask=mask), mask=mask)


def _run(
    tensors: Sequence[torch.Tensor],
    slots: torch.Tensor | Sequence[int],
    values: list[int],
    per_slot: int,
    buffer: torch.Tensor,
    unpack: bool,
) -> None:
    if not values or per_slot == 0:
        return
    device = tensors[0].device
    if isinstance(slots, torch.Tensor) and slots.device == device:
        slots = slots.to(torch.int64).contiguous()  # already on the device: no copy over
    else:
        slots = torch.tensor(values, dtype=torch.int64).to(device)
    table = buffer.view(len(values), per_slot)
    offset = 0
    for t in tensors:
        rows = slot_rows(t)
        width = rows.shape[1]
        if width:
            size = word_size(rows, table, extra=(offset, per_slot))
            rows_w = as_words(rows, size)
            table_w = as_words(table, size)
            block = copy_block(width // size)
            for lo in range(0, len(values), MAX_GRID_Y):
                hi = min(len(values), lo + MAX_GRID_Y)
                _pack_kernel[(triton.cdiv(width // size, block), hi - lo)](
                    rows_w,
                    rows_w.stride(0),
                    table_w[lo:hi],
                    table_w.stride(0),
                    offset // size,
                    slots[lo:hi],
                    width // size,
                    UNPACK=unpack,
                    BLOCK=block,
                )
        offset += width


def pack_slots(
    tensors: list[torch.Tensor],
    slots: torch.Tensor | Sequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather slot rows of all ``tensors`` into one uint8 buffer.

    Args:
        tensors: tensors whose dim 0 is the S local slots (contiguous rows, same S/device).
        slots: [n] int64 (CPU or device; read on the host) or list: slots to pack, in order;
            repeats allowed.
        out: optional uint8 [n * bytes_per_slot(tensors)] on the tensors' device.

    Returns:
        uint8 [n * bytes_per_slot(tensors)]: for each slot in order, for each tensor in
        order, that tensor's row bytes.
    """
    values, per_slot = checks.check_pack(tensors, slots, out, buffer_name="out", unique=False)
    if out is None:
        out = torch.empty(len(values) * per_slot, dtype=torch.uint8, device=tensors[0].device)
    if backend_for(tensors[0].device) == "torch":
        return reference.pack_slots(tensors, values, per_slot, out)
    _run(tensors, slots, values, per_slot, out, unpack=False)
    return out


def unpack_slots(
    tensors: list[torch.Tensor], slots: torch.Tensor | Sequence[int], buffer: torch.Tensor
) -> None:
    """Scatter a ``pack_slots``-layout buffer into the given slots of ``tensors``, in place.

    Args:
        tensors: as for ``pack_slots``.
        slots: [n] int64 or list: destination slot of each packed row; no repeats.
        buffer: uint8 [n * bytes_per_slot(tensors)] on the tensors' device.
    """
    if buffer is None:
        raise ValueError("buffer must be a uint8 tensor, got None")
    values, per_slot = checks.check_pack(tensors, slots, buffer, buffer_name="buffer", unique=True)
    if backend_for(tensors[0].device) == "torch":
        reference.unpack_slots(tensors, values, per_slot, buffer)
        return
    _run(tensors, slots, values, per_slot, buffer, unpack=True)
