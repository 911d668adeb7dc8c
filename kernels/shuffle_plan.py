"""Planning an in-place slot shuffle: the order of row copies and the staging they need.

``shuffle_experts`` (Triton and torch alike) realises ``new[s] = old[new_to_old[s]]`` in
place: :func:`plan_shuffle` orders the row copies in waves (trees of the slot graph leaf
first, then cycles cut at staged rows), :func:`staging_groups` fits them into the staging
budget, and :func:`prepare_shuffle` checks the arguments and plans every group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checks import check_slot_tensors, check_tensor, index_list, is_int, slot_row_bytes
from .slot_rows import slot_rows

# Alignment of each tensor's area inside a staging buffer (bytes): lets copies use wide words.
STAGING_ALIGN = 16
# Rows up to this size are cut further when spare staging allows (Triton path only): an
# estimate, not a measurement here -- a launch costs ~5 us, and on an H100-class GPU (~3 TB/s)
# two extra copies of a 1 MiB row cost about the same, so larger rows gain nothing.
CUT_ROW_BYTES = 1 << 20


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
    if not is_int(max_staging) or max_staging < 1:
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
    if not is_int(staging_bytes) or staging_bytes < 0:
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
        check_tensor("staging", staging, ndim=1, dtypes=(torch.uint8,), contiguous=True)
        if staging.device != device:
            raise ValueError(f"staging is on {staging.device} but tensors are on {device}")
        if staging_bytes is not None and staging_bytes != staging.numel():
            raise ValueError(
                f"staging_bytes={staging_bytes} disagrees with staging.numel()={staging.numel()}"
            )
        staging_bytes = staging.numel()
    row_bytes = [slot_row_bytes(t) for t in tensors]
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
