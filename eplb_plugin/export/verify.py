"""Verifying an export against its source checkpoint: layout, index, side files, and the
SHA-256 of every exported tensor against its source bytes."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field

import torch

from ..checkpoint import Checkpoint, TensorInfo, read_header
from ..formats import SGLANG_LAYOUT_KEY, _read_json, sglang_phy2log
from .plan import (
    SGLANG_LAYOUT_FILE,
    ExportConfig,
    ExportPlan,
    _sglang_rows,
    export_index,
    plan_export,
)
from .read import ExportedCheckpoint, open_export


@dataclass
class VerifyReport:
    tensors_checked: int = 0
    bytes_hashed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _sha256(path: str, ranges: list[tuple[int, int]], chunk: int, on_bytes) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        for start, end in ranges:
            while start < end:
                view = memoryview(buffer)[: min(chunk, end - start)]
                got = os.preadv(f.fileno(), [view], start)
                if got == 0:
                    raise ValueError(f"{path!r} ended early at byte {start}")
                digest.update(view[:got])
                start += got
                on_bytes(got)
    return digest.hexdigest()


def _check_sglang_layout(export: ExportedCheckpoint, plan: ExportPlan) -> list[str]:
    """SGLang's form of the layout must say what layout.safetensors says (SGLang loads it)."""
    name = export.index.get("sglang_layout", SGLANG_LAYOUT_FILE)
    path = os.path.join(export.root, name)
    if not os.path.isfile(path):
        return [f"{name} (SGLang's form of the layout) is missing"]
    try:
        found = torch.as_tensor(_read_json(path)[SGLANG_LAYOUT_KEY], dtype=torch.int64)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        return [f"{name} cannot be read as SGLang's layout: {exc}"]
    expected = sglang_phy2log(*_sglang_rows(plan))
    if found.shape != expected.shape or not torch.equal(found, expected):
        return [
            f"{name} disagrees with {export.index['layout']} (SGLang would load another layout)"
        ]
    return []


# what each index entry says of a tensor; the file it lands in depends on --max-shard-size
_ENTRY_FIELDS = ("source", "source_file", "layer", "slots", "experts", "rows")


def _check_index_entries(export: ExportedCheckpoint, plan: ExportPlan) -> list[str]:
    """Each tensor's index entry must name its true source, layer, slots and experts."""
    fresh = {(e["rank"], e["name"]): e for e in export_index(plan)["tensors"]}
    errors = []
    for entry in export.index.get("tensors", []):
        want = fresh.get((entry.get("rank"), entry.get("name")))
        if want is None:
            continue  # reported with the files' own headers
        wrong = [f for f in _ENTRY_FIELDS if entry.get(f) != want.get(f)]
        if wrong:
            errors.append(
                f"index entry of {entry['name']} (rank {entry.get('rank')}) has wrong "
                f"{', '.join(wrong)}: {[entry.get(f) for f in wrong]} != "
                f"{[want.get(f) for f in wrong]}"
            )
    return errors


def _check_side_files(export: ExportedCheckpoint, plan: ExportPlan, chunk: int) -> list[str]:
    """Config, tokenizer and other copied files must equal the source's (they shape output)."""
    errors = []
    listed = export.index.get("side_files", [])
    for name in sorted(set(plan.side_files) - set(listed)):
        errors.append(f"side file {name} of the checkpoint is not listed in the index")
    for name in listed:
        got = os.path.join(export.root, name)
        src = os.path.join(plan.checkpoint.root, name)
        if not os.path.isfile(got):
            errors.append(f"side file {name} is missing")
        elif not os.path.isfile(src):
            errors.append(f"side file {name} has no source file in the checkpoint")
        else:
            hashes = [_sha256(p, [(0, os.path.getsize(p))], chunk, lambda n: None)
                      for p in (got, src)]  # fmt: skip
            if hashes[0] != hashes[1]:
                errors.append(f"side file {name} differs from the checkpoint's")
    return errors


def verify_export(
    checkpoint_dir: str | os.PathLike,
    export_dir: str | os.PathLike,
    progress: bool | None = None,
    chunk_bytes: int = 16 * 2**20,
) -> VerifyReport:
    """Check an export against its source checkpoint.

    Checks: the layout is consistent and matches the index; SGLang's form of the layout says
    the same; every index entry names its tensor's true source, layer, slots and experts;
    the copied side files (config, tokenizer, ...) equal the source's; every export file is
    a complete safetensors file; the export holds exactly the tensors the layout implies
    (each in a file of the right rank, with the right dtype and shape); every logical
    expert of every MoE layer is present in at least one slot; and every exported tensor's
    SHA-256 equals that of its source bytes (replicas of one expert hash the source once).

    Returns:
        a VerifyReport; ``errors`` lists every problem found. Raises ValueError only when
        the export or checkpoint cannot be opened at all.
    """
    from tqdm import tqdm

    export = open_export(export_dir)
    checkpoint = Checkpoint.open(checkpoint_dir)
    report = VerifyReport()
    errors = report.errors
    layout = export.layout
    if layout.num_slots != export.num_slots or export.num_slots != (
        export.ep_size * export.slots_per_rank
    ):
        errors.append(
            f"index says {export.num_slots} slots = {export.ep_size} ranks x "
            f"{export.slots_per_rank}, layout has {layout.num_slots}"
        )
        return report
    try:
        plan = plan_export(checkpoint, layout, ExportConfig(ep_size=export.ep_size))
    except ValueError as exc:
        errors.append(f"layout does not fit the checkpoint: {exc}")
        return report
    if plan.layout_rows != export.layout_rows:
        errors.append(f"index layout_rows {export.layout_rows} != expected {plan.layout_rows}")
    for layer, row in plan.layout_rows.items():
        missing = (layout.logcnt[row] < 1).nonzero().flatten().tolist()
        if missing:
            errors.append(f"layer {layer}: logical experts {missing} have no slot")
    errors.extend(_check_sglang_layout(export, plan))
    errors.extend(_check_index_entries(export, plan))
    errors.extend(_check_side_files(export, plan, chunk_bytes))
    # fused expert tensors keep one name on every rank: key tensors by (rank, name)
    expected = {(f.rank, t.name): t for f in plan.files for t in f.tensors}
    found: dict[tuple[int | None, str], TensorInfo] = {}
    for name, entry in export.index["files"].items():
        path = os.path.join(export.root, name)
        if not os.path.isfile(path):
            errors.append(f"export file {name} is missing")
            continue
        try:
            tensors, _ = read_header(path)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        for key, info in tensors.items():
            found[(entry["rank"], key)] = info
    where = {None: "shared files"}
    for rank, name in sorted(set(expected) - set(found), key=str):
        errors.append(f"tensor {name} is missing from {where.get(rank, f'rank {rank}')}")
    for rank, name in sorted(set(found) - set(expected), key=str):
        errors.append(
            f"tensor {name} in {where.get(rank, f'rank {rank}')} is not implied by the layout"
        )
    present: dict[int, set[int]] = {layer: set() for layer in plan.layout_rows}
    todo = []
    for key, t in expected.items():
        info = found.get(key)
        if info is None:
            continue
        if (info.dtype, info.shape) != (t.dtype, t.shape):
            errors.append(
                f"tensor {t.name} is {info.dtype}{list(info.shape)}, expected "
                f"{t.dtype}{list(t.shape)}"
            )
            continue
        todo.append((t, info))
        if t.layer is not None:
            present[t.layer].update(t.experts)
    for layer, seen in present.items():
        absent = sorted(set(range(plan.table.num_experts)) - seen)
        if absent:
            errors.append(f"layer {layer}: logical experts {absent} are absent from the export")
    total = sum(t.nbytes + info.nbytes for t, info in todo)
    show = sys.stderr.isatty() if progress is None else progress
    source_hashes: dict[tuple, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="eplb verify",
              disable=not show) as bar:  # fmt: skip
        for t, info in todo:
            key = (t.source.name, t.rows)
            if key not in source_hashes:
                source_hashes[key] = _sha256(t.source.path, t.ranges(), chunk_bytes, bar.update)
                report.bytes_hashed += t.nbytes
            else:
                bar.update(t.nbytes)
            got = _sha256(info.path, [(info.start, info.end)], chunk_bytes, bar.update)
            report.bytes_hashed += info.nbytes
            report.tensors_checked += 1
            if got != source_hashes[key]:
                what = f"slot(s) {list(t.slots)} expert(s) {list(t.experts)}" if t.slots else ""
                errors.append(
                    f"tensor {t.name} {what} differs from its source {t.source.name} "
                    f"(sha256 {got[:12]} != {source_hashes[key][:12]})"
                )
    return report
