"""In-place expert weight shuffle across slots, for every tensor with a slot dimension.

``shuffle_experts(tensors, new_to_old)`` makes slot ``s`` of every tensor hold what slot
``new_to_old[s]`` held (duplicates replicate, -1 leaves a slot alone for ``unpack_slots`` to
fill). The host plans the order of row copies (``shuffle_plan.plan_shuffle``): trees of the slot
graph leaf first, then cycles cut at staged rows, so the extra memory is the staging rows the
plan uses (one slot row per tensor by default, or what ``staging_bytes`` allows).

``_copy_rows_kernel`` runs one step of the plan for one tensor: a set of independent
``dst[d_i] <- src[s_i]`` row copies, one program per (row chunk, copy). Bytes are moved as
the widest integer word the tensor's row width, slot stride and address allow, so any dtype
(bf16, fp8, packed int4 in uint8, ...) is copied bit for bit.

Ordering (why it is race-free on a GPU): within one step no destination row is also a source
and no destination repeats (``ShufflePlan``'s invariant), so the programs of a launch touch
disjoint memory for writing and never write what another reads; steps are separate launches on
one stream and run in order. No atomics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eplb_plugin.kernels import reference
from eplb_plugin.kernels._backend import backend_for, interpreting, next_power_of_2, tl, triton
from eplb_plugin.kernels.checks import check_slot_tensors
from eplb_plugin.kernels.shuffle_plan import prepare_shuffle, shuffle_groups
from eplb_plugin.kernels.slot_rows import as_words, word_size

__all__ = ["shuffle_experts"]

# CUDA caps the second grid dimension at 65535 programs; longer index lists are split.
MAX_GRID_Y = 65535

if triton is not None:

    @triton.jit
    def _copy_rows_kernel(
        src_ptr,
        src_stride,
        dst_ptr,
        dst_stride,
        src_index_ptr,
        dst_index_ptr,
        row_words,
        BLOCK: tl.constexpr,
    ):
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row_words
        copy = tl.program_id(1)
        src_row = tl.load(src_index_ptr + copy).to(tl.int64)
        dst_row = tl.load(dst_index_ptr + copy).to(tl.int64)
        values = tl.load(src_ptr + src_row * src_stride + cols, mask=mask)
        tl.store(dst_ptr + dst_row * dst_stride + cols, values, mask=mask)


def copy_block(row_words: int) -> int:
    """Words per program: whole rows in the interpreter (it runs programs one by one), 1024
    on a GPU (4 warps, 8 words a thread)."""
    if interpreting():
        return min(next_power_of_2(row_words), 1 << 16)
    return 1024


def launch_copy_rows(
    src: torch.Tensor, dst: torch.Tensor, src_index: torch.Tensor, dst_index: torch.Tensor
) -> None:
    """``dst[dst_index[i]] = src[src_index[i]]`` for 2-D word views with unit column stride.

    ``src_index``/``dst_index``: [n] int64 on the device; the rows written must not be read
    or written twice in one call.
    """
    count = src_index.numel()
    width = src.shape[1]
    if count == 0 or width == 0:
        return
    block = copy_block(width)
    for lo in range(0, count, MAX_GRID_Y):
        hi = min(count, lo + MAX_GRID_Y)
        grid = (triton.cdiv(width, block), hi - lo)
        _copy_rows_kernel[grid](
            src,
            src.stride(0),
            dst,
            dst.stride(0),
            src_index[lo:hi],
            dst_index[lo:hi],
            width,
            BLOCK=block,
        )


def shuffle_experts(
    tensors: list[torch.Tensor],
    new_to_old: torch.Tensor | Sequence[int],
    *,
    staging_bytes: int | None = None,
    staging: torch.Tensor | None = None,
) -> None:
    """Rearrange slots in place: slot ``s`` of each tensor gets old slot ``new_to_old[s]``.

    Args:
        tensors: tensors whose dim 0 is the S local slots (weights, scales, biases; any
            dtype and trailing shape, same S and device). Each slot row must be contiguous
            (``t[s].is_contiguous()``; the slot stride is free, so slices along dim 0 work);
            other views are rejected with a ``ValueError``.
        new_to_old: [S] int64 (CPU or the tensors' device; read on the host) or list:
            old slot whose content slot ``s`` gets; repeats replicate, -1 leaves ``s`` as is.
        staging_bytes: bound on the extra memory for cycles. Default: one slot row per
            tensor. More stages several cycles at once (fewer steps) and, on the Triton path
            with rows up to ``shuffle_plan.CUT_ROW_BYTES``, cuts long cycles in more places;
            less than a row of every tensor shuffles the tensors one by one.
        staging: optional preallocated uint8 [bytes] buffer used for staging (its size is the
            budget); otherwise one is allocated per call when the mapping has cycles.

    Bit exact. Arguments are checked before anything is written. One host read of
    ``new_to_old``; ``plan steps x len(tensors)`` kernel launches on the Triton path.
    """
    _, device = check_slot_tensors(tensors)
    triton_path = backend_for(device) == "triton"
    groups = prepare_shuffle(tensors, new_to_old, staging_bytes, staging, parallel=triton_path)
    if not triton_path:
        reference.run_shuffle(tensors, groups, staging)
        return
    for rows, stages, plan in shuffle_groups(tensors, groups, staging):
        steps = [step for wave in plan.waves for step in wave]
        flat = [i for step in steps for i in step.src + step.dst]
        index = torch.tensor(flat, dtype=torch.int64).to(device)
        for row, stage in zip(rows, stages):
            size = word_size(row, stage)
            row_w, stage_w = as_words(row, size), as_words(stage, size)
            at = 0
            for step in steps:
                n = len(step.dst)
                src = stage_w if step.kind == "unstage" else row_w
                dst = stage_w if step.kind == "stage" else row_w
                launch_copy_rows(src, dst, index[at : at + n], index[at + n : at + 2 * n])
                at += 2 * n
