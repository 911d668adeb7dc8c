"""Byte views of slot rows: how the kernels move a slot of any dtype bit for bit.

A tensor with a slot dimension (dim 0) and contiguous slot rows is seen as ``[S, row_bytes]``
uint8 (:func:`slot_rows`), and re-read as the widest integer word its widths, strides and
addresses allow (:func:`word_size`, :func:`as_words`) so copies move whole words.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
