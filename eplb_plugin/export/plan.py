"""Planning an export: every output file and tensor, and the index describing them,
decided from the checkpoint's headers and the layout before anything is written (pure)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..checkpoint import (
    INDEX_FILE,
    Checkpoint,
    ExpertTable,
    TensorInfo,
    find_experts,
    resolve_inside,
)
from ..layout import ExpertLayout
from ..names import COPY_MODES as COPY_MODES

EXPORT_FORMAT = "eplb-export"
EXPORT_VERSION = 1
EXPORT_INDEX = "eplb_export.json"
LAYOUT_FILE = "layout.safetensors"
SGLANG_LAYOUT_FILE = "expert_location.json"
PAGE = 4096
# Files beside the weights that are copied unchanged (weights in other formats are not).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass(frozen=True)
class ExportConfig:
    """How an export is written.

    Attributes:
        ep_size: EP ranks to split slots over; default the layout's ``topology.num_gpus``
            (a different value is refused: the layout was balanced for that many GPUs).
        max_shard_bytes: split a rank's (or the shared) tensors into files of at most this
            many bytes (a single larger tensor gets a file of its own).
        copy_mode: ``auto`` (kernel ``copy_file_range`` where source and target offsets
            agree within a page, ``read`` elsewhere or where the filesystem lacks it),
            ``read`` (``pread`` into one reused buffer, then ``write``) or ``safe_open``
            (tensors read with safetensors' lazy ``safe_open``, one at a time).
        chunk_bytes: bytes per copy call (bounds memory in ``read`` mode).
        max_bytes_per_s: throttle, e.g. to spare a disk that is also serving; None = none.
        fsync: fsync every file and folder before the final rename.
        progress: show a tqdm bar (bytes, throughput); None = only on a terminal.
    """

    ep_size: int | None = None
    max_shard_bytes: int = 4 * 2**30
    copy_mode: str = "auto"
    chunk_bytes: int = 16 * 2**20
    max_bytes_per_s: float | None = None
    fsync: bool = True
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.ep_size is not None and (
            isinstance(self.ep_size, bool) or not isinstance(self.ep_size, int) or self.ep_size < 1
        ):
            raise ValueError(f"ep_size must be a positive integer, got {self.ep_size!r}")
        for name in ("max_shard_bytes", "chunk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.copy_mode not in COPY_MODES:
            raise ValueError(f"copy_mode must be one of {COPY_MODES}, got {self.copy_mode!r}")
        if self.max_bytes_per_s is not None and not self.max_bytes_per_s > 0:
            raise ValueError(f"max_bytes_per_s must be positive, got {self.max_bytes_per_s!r}")


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the export and where its bytes come from.

    ``rows`` is None when the whole source tensor is copied, else the source's dim-0 rows
    (experts of a fused tensor) in output order.
    """

    name: str
    source: TensorInfo
    shape: tuple[int, ...]
    rows: tuple[int, ...] | None = None
    rank: int | None = None
    layer: int | None = None
    slots: tuple[int, ...] = ()
    experts: tuple[int, ...] = ()

    @property
    def dtype(self) -> str:
        return self.source.dtype

    @property
    def nbytes(self) -> int:
        if self.rows is None:
            return self.source.nbytes
        return len(self.rows) * (self.source.nbytes // self.source.shape[0])

    def ranges(self) -> list[tuple[int, int]]:
        """Absolute byte ranges in the source file, adjacent rows merged."""
        if self.rows is None:
            return [(self.source.start, self.source.end)]
        out: list[tuple[int, int]] = []
        for row in self.rows:
            start, end = self.source.row_range(row)
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out

    def row_runs(self) -> list[tuple[int, int]]:
        """Runs ``[r0, r1)`` of consecutive source rows (for sliced reads)."""
        runs: list[tuple[int, int]] = []
        for row in self.rows or ():
            if runs and runs[-1][1] == row:
                runs[-1] = (runs[-1][0], row + 1)
            else:
                runs.append((row, row + 1))
        return runs


@dataclass(frozen=True)
class OutFile:
    name: str
    rank: int | None
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class ExportPlan:
    """Everything an export will write, computed before anything is written."""

    checkpoint: Checkpoint
    table: ExpertTable
    layout: ExpertLayout
    ep_size: int
    layout_rows: dict[int, int]  # model layer id -> layout row
    files: list[OutFile]
    side_files: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def slots_per_rank(self) -> int:
        return self.layout.num_slots // self.ep_size


def match_layers(layout: ExpertLayout, table: ExpertTable, num_hidden_layers: int | None):
    """Model layer id -> layout row.

    A layout has either one row per MoE layer (in layer order; this project's and vLLM's
    form) or one row per hidden layer (SGLang's form, dense layers' rows ignored).
    """
    moe = table.layers
    rows = layout.num_layers
    if rows == len(moe):
        return {layer: i for i, layer in enumerate(moe)}
    if rows > moe[-1] and (num_hidden_layers is None or rows == num_hidden_layers):
        return {layer: layer for layer in moe}
    raise ValueError(
        f"layout has {rows} layers but the checkpoint has {len(moe)} MoE layers "
        f"(ids {moe[0]}..{moe[-1]}) of {num_hidden_layers} hidden layers; expected "
        f"{len(moe)} or {num_hidden_layers} rows"
    )


def plan_export(
    checkpoint: Checkpoint, layout: ExpertLayout, config: ExportConfig = ExportConfig()
) -> ExportPlan:
    """Decide every output file and tensor; reads headers only.

    Raises:
        ValueError when the layout and the checkpoint disagree (expert count, layer
        count, EP size) or an expert tensor is missing.
    """
    table = find_experts(checkpoint)
    layout.validate()
    ep_size = config.ep_size or layout.topology.num_gpus
    if ep_size != layout.topology.num_gpus:
        raise ValueError(
            f"ep_size={ep_size} disagrees with the layout, planned for "
            f"num_gpus={layout.topology.num_gpus}"
        )
    if layout.num_slots % ep_size:
        raise ValueError(f"{layout.num_slots} slots are not divisible by ep_size={ep_size}")
    if layout.num_experts != table.num_experts:
        raise ValueError(
            f"layout has {layout.num_experts} experts per layer but checkpoint "
            f"{checkpoint.root!r} has {table.num_experts}"
        )
    num_hidden = checkpoint.text_config.get("num_hidden_layers")
    rows = match_layers(layout, table, num_hidden if isinstance(num_hidden, int) else None)
    per_rank = layout.num_slots // ep_size
    files = []
    expert_names = table.names()
    shared = [t for name, t in checkpoint.tensors.items() if name not in expert_names]
    shared_out = [OutTensor(t.name, t, t.shape) for t in shared]
    files += _pack("shared", None, shared_out, config.max_shard_bytes)
    for rank in range(ep_size):
        slots = range(rank * per_rank, (rank + 1) * per_rank)
        tensors = [
            t
            for layer in table.layers
            for t in _rank_layer(table, layout, rows, layer, rank, slots)
        ]
        files += _pack(f"experts-rank{rank:05d}", rank, tensors, config.max_shard_bytes)
    side = sorted(
        n
        for n in os.listdir(checkpoint.root)
        if not n.startswith(".")
        and n != INDEX_FILE
        and not n.endswith(_WEIGHT_SUFFIXES)
        and os.path.isfile(os.path.join(checkpoint.root, n))
    )
    for name in side:  # copied into the export: a link out would copy a foreign file
        resolve_inside(checkpoint.root, name, f"checkpoint {checkpoint.root!r}", hf_cache=True)
    return ExportPlan(checkpoint, table, layout, ep_size, rows, files, side)


def _rank_layer(table, layout, rows, layer, rank, slots) -> list[OutTensor]:
    row = layout.phy2log[rows[layer]].tolist()
    head = table.heads[layer]
    out = []
    if layer in table.per_expert:
        experts = table.per_expert[layer]
        for slot in slots:
            expert = row[slot]
            for tail, info in experts[expert].items():
                out.append(
                    OutTensor(f"{head}.{slot}.{tail}", info, info.shape, None, rank, layer,
                              (slot,), (expert,))
                )  # fmt: skip
    else:
        chosen = tuple(row[s] for s in slots)
        for tail, info in table.fused[layer].items():
            shape = (len(chosen), *info.shape[1:])
            out.append(
                OutTensor(f"{head}.{tail}", info, shape, chosen, rank, layer, tuple(slots), chosen)
            )
    return out


def _pack(prefix: str, rank: int | None, tensors: list[OutTensor], limit: int) -> list[OutFile]:
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    # whole-page tensors first: with a page-padded header they start page-aligned, which
    # lets the kernel copy them without touching partial pages (small scales go last)
    return [
        OutFile(
            f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors",
            rank,
            tuple(sorted(g, key=lambda t: t.nbytes % PAGE != 0)),
        )  # fmt: skip
        for i, g in enumerate(groups)
    ]


def _sglang_rows(plan: ExportPlan) -> tuple[ExpertLayout, list[int], int]:
    """(layout of the MoE layers' rows, their model layer ids, hidden layers): SGLang wants
    one row per hidden layer, MoE rows from the layout and trivial rows elsewhere."""
    num_hidden = plan.checkpoint.text_config.get("num_hidden_layers")
    moe = sorted(plan.layout_rows)
    sub = plan.layout
    if plan.layout.num_layers != len(moe):
        idx = torch.tensor([plan.layout_rows[layer] for layer in moe])
        sub = ExpertLayout.from_phy2log(
            plan.layout.phy2log[idx], plan.layout.topology, plan.layout.num_experts
        )
    return sub, moe, num_hidden if isinstance(num_hidden, int) else max(moe) + 1


def export_index(plan: ExportPlan) -> dict:
    """The JSON index of an export (also the contract the reader relies on)."""
    root = plan.checkpoint.root
    tensors = []
    files = {}
    for out_file in plan.files:
        files[out_file.name] = {"rank": out_file.rank, "nbytes": out_file.nbytes}
        for t in out_file.tensors:
            entry = {
                "name": t.name,
                "file": out_file.name,
                "rank": t.rank,
                "source": t.source.name,
                "source_file": os.path.relpath(t.source.path, root),
            }
            if t.layer is not None:
                entry.update(layer=t.layer, slots=list(t.slots), experts=list(t.experts))
            if t.rows is not None:
                entry["rows"] = list(t.rows)
            tensors.append(entry)
    per_rank = plan.slots_per_rank
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "source": {
            "checkpoint": os.path.abspath(root),
            "files": plan.checkpoint.files,
            "nbytes": plan.checkpoint.nbytes,
        },  # fmt: skip
        "family": plan.table.family.name,
        "num_experts": plan.table.num_experts,
        "num_slots": plan.layout.num_slots,
        "ep_size": plan.ep_size,
        "slots_per_rank": per_rank,
        "moe_layers": plan.table.layers,
        "layout_rows": {str(k): v for k, v in sorted(plan.layout_rows.items())},
        "expert_heads": {str(k): v for k, v in sorted(plan.table.heads.items())},
        "layout": LAYOUT_FILE,
        "sglang_layout": SGLANG_LAYOUT_FILE,
        "side_files": plan.side_files,
        "shared_files": [f.name for f in plan.files if f.rank is None],
        "ranks": [
            {
                "rank": r,
                "slots": [r * per_rank, (r + 1) * per_rank],
                "files": [f.name for f in plan.files if f.rank == r],
            }  # fmt: skip
            for r in range(plan.ep_size)
        ],
        "files": files,
        "tensors": tensors,
    }
