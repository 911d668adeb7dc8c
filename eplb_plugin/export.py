"""Offline export of a checkpoint into a balanced per-rank layout, its verification, and
the reader that engines use to load one rank of an export.

An export folder holds

- ``experts-rank{r:05d}-{i:05d}-of-{n:05d}.safetensors``: the expert tensors of rank ``r``'s
  physical slots, replicas duplicated, named like the source but with the *global slot id*
  in place of the expert id (``model.layers.3.mlp.experts.{slot}.gate_proj.weight``; fused
  sources keep their name and hold the rank's slots along dim 0);
- ``shared-{i:05d}-of-{n:05d}.safetensors``: every other tensor once, original names;
- ``layout.safetensors`` (:meth:`ExpertLayout.save`) and ``expert_location.json`` (SGLang's
  ``--init-expert-location`` form, one row per hidden layer);
- ``eplb_export.json``: the index, listing every tensor with its file, rank, layer, slots,
  logical experts and source tensor/file;
- the checkpoint's small side files (``config.json``, tokenizer files, ...), unchanged.

Writing streams byte ranges (never more than one copy chunk, or one tensor with
``copy_mode="safe_open"``, resident), into a hidden temporary folder beside the target
that is fsynced and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .checkpoint import INDEX_FILE, Checkpoint, ExpertTable, TensorInfo, find_experts, read_header
from .layout import ExpertLayout

EXPORT_FORMAT = "eplb-export"
EXPORT_VERSION = 1
EXPORT_INDEX = "eplb_export.json"
LAYOUT_FILE = "layout.safetensors"
SGLANG_LAYOUT_FILE = "expert_location.json"
COPY_MODES = ("auto", "read", "safe_open")
PAGE = 4096
# Files beside the weights that are copied unchanged (weights in other formats are not).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_PARTIAL = ".eplb-partial-"


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


# ============================================================================ planning (pure)
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


# ============================================================================ writing
def safetensors_header(tensors: tuple[OutTensor, ...], metadata: dict[str, str]) -> bytes:
    """Length prefix + JSON header for tensors in this order, space-padded so the data
    starts on a page boundary (JSON allows trailing spaces; safetensors pads the same way,
    to 8 bytes)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}  # fmt: skip
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % PAGE)
    return len(raw).to_bytes(8, "little") + raw


class _Copier:
    """Copies byte ranges of source files to an output file, reporting progress."""

    def __init__(self, config: ExportConfig, on_bytes: Callable[[int], None]):
        self.config = config
        self.on_bytes = on_bytes
        self.mode = config.copy_mode
        self._fds: dict[str, int] = {}
        self._buffer: bytearray | None = None
        self._done = 0
        self._start = time.monotonic()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _account(self, n: int) -> None:
        self._done += n
        self.on_bytes(n)
        rate = self.config.max_bytes_per_s
        if rate:
            ahead = self._done / rate - (time.monotonic() - self._start)
            if ahead > 0:
                time.sleep(ahead)

    def tensor(self, t: OutTensor, out_fd: int) -> None:
        if self.mode == "safe_open":
            self._tensor_safe_open(t, out_fd)
            return
        for start, end in t.ranges():
            self._range(self._fd(t.source.path), start, end, out_fd)

    def _range(self, src: int, start: int, end: int, out_fd: int) -> None:
        chunk = self.config.chunk_bytes
        # copy_file_range is fast only when source and target share their offset within a
        # page (else the kernel copies partial pages); pread + write does not care
        kernel = self.mode == "auto" and (start - os.lseek(out_fd, 0, os.SEEK_CUR)) % PAGE == 0
        while start < end:
            n = min(chunk, end - start)
            if kernel and self.mode == "auto":
                try:
                    n = os.copy_file_range(src, out_fd, n, start)
                except OSError:
                    self.mode = "read"  # e.g. a filesystem without it: plain reads from here
                    continue
                if n == 0:
                    raise ValueError(f"source file ended early at byte {start}")
            else:
                if self._buffer is None:
                    self._buffer = bytearray(chunk)
                view = memoryview(self._buffer)[:n]
                got = os.preadv(src, [view], start)
                if got == 0:
                    raise ValueError(f"source file ended early at byte {start}")
                _write_all(out_fd, view[:got])
                n = got
            start += n
            self._account(n)

    def _tensor_safe_open(self, t: OutTensor, out_fd: int) -> None:
        from safetensors import safe_open

        with safe_open(t.source.path, framework="pt") as f:
            sliced = f.get_slice(t.source.name)
            parts = [sliced[:]] if t.rows is None else [sliced[a:b] for a, b in t.row_runs()]
            for part in parts:
                data = part.contiguous().reshape(-1).view(torch.uint8).numpy()
                _write_all(out_fd, memoryview(data))
                self._account(data.nbytes)
                del data, part


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view) :]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _partial_dir(out: str) -> str:
    parent, base = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{base}{_PARTIAL}{socket.gethostname()}-{os.getpid()}")


def _remove_stale_partials(out: str) -> None:
    """Delete temp folders left by killed exports to the same target on this host."""
    parent, base = os.path.split(os.path.abspath(out))
    prefix = f".{base}{_PARTIAL}{socket.gethostname()}-"
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix) :])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_dir(out: str | os.PathLike) -> str:
    """Refuse an existing target or a missing/unwritable parent; return the absolute path."""
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out):
        raise ValueError(f"output directory {out!r} already exists; choose a new path")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ValueError(f"parent folder {parent!r} of the output does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"parent folder {parent!r} of the output is not writable")
    return out


@dataclass
class ExportSummary:
    out: str
    files: int
    tensors: int
    nbytes: int
    seconds: float

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    layout: ExpertLayout,
    out_dir: str | os.PathLike,
    config: ExportConfig = ExportConfig(),
) -> ExportSummary:
    """Write ``checkpoint_dir`` re-arranged by ``layout`` into the new folder ``out_dir``.

    Every check (checkpoint headers, expert completeness, layout agreement, free disk
    space, target absent) runs before anything is written; the output appears in one
    rename. Raises ValueError on bad input, with nothing written.
    """
    out = check_output_dir(out_dir)
    checkpoint = Checkpoint.open(checkpoint_dir)
    plan = plan_export(checkpoint, layout, config)
    free = shutil.disk_usage(os.path.dirname(out)).free
    if plan.nbytes > free:
        raise ValueError(
            f"the export needs {plan.nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB "
            f"are free beside {out!r}"
        )
    _remove_stale_partials(out)
    tmp = _partial_dir(out)
    os.mkdir(tmp)
    start = time.perf_counter()
    try:
        _write_plan(plan, tmp, config)
        if os.path.lexists(out):
            raise ValueError(f"output directory {out!r} appeared during the export")
        os.rename(tmp, out)
        if config.fsync:
            _fsync_dir(os.path.dirname(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    ntensors = sum(len(f.tensors) for f in plan.files)
    return ExportSummary(out, len(plan.files), ntensors, plan.nbytes, seconds)


def _write_plan(plan: ExportPlan, tmp: str, config: ExportConfig) -> None:
    from tqdm import tqdm

    show = sys.stderr.isatty() if config.progress is None else config.progress
    bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="eplb export", disable=not show, smoothing=0.1)  # fmt: skip
    copier = _Copier(config, bar.update)
    try:
        for out_file in plan.files:
            meta = {"format": "pt", "eplb_export": str(EXPORT_VERSION),
                    "rank": "" if out_file.rank is None else str(out_file.rank)}  # fmt: skip
            header = safetensors_header(out_file.tensors, meta)
            path = os.path.join(tmp, out_file.name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, memoryview(header))
                for t in out_file.tensors:
                    copier.tensor(t, fd)
                if os.fstat(fd).st_size != len(header) + out_file.nbytes:
                    raise RuntimeError(f"{out_file.name}: wrote a wrong number of bytes")
            finally:
                os.close(fd)
    finally:
        copier.close()
        bar.close()
    for name in plan.side_files:
        shutil.copyfile(os.path.join(plan.checkpoint.root, name), os.path.join(tmp, name))
    _write_layouts(plan, tmp)
    index = export_index(plan)
    with open(os.path.join(tmp, EXPORT_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, separators=(",", ":"))
    if config.fsync:  # once at the end: the kernel writes back while later files are copied
        for name in os.listdir(tmp):
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(tmp)


def _write_layouts(plan: ExportPlan, tmp: str) -> None:
    from .formats import write_sglang_layout

    plan.layout.save(os.path.join(tmp, LAYOUT_FILE), {"source": "eplb export"})
    write_sglang_layout(os.path.join(tmp, SGLANG_LAYOUT_FILE), *_sglang_rows(plan))


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


# ============================================================================ reading
class ExportedCheckpoint:
    """An export folder opened for loading; every read is lazy and per file.

    Attributes:
        root, index (the parsed ``eplb_export.json``), layout (ExpertLayout), ep_size,
        num_slots, slots_per_rank, num_experts, moe_layers (model layer ids),
        layout_rows (model layer id -> layout row), opened (paths of the weight files this
        reader has opened, in order: what a rank can show it read).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        path = os.path.join(self.root, EXPORT_INDEX)
        if not os.path.isfile(path):
            raise ValueError(f"{self.root!r} is not an eplb export (no {EXPORT_INDEX})")
        try:
            with open(path, encoding="utf-8") as f:
                self.index = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {path!r}: {exc}") from exc
        if self.index.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{path!r} is not an eplb export index")
        if int(self.index.get("version", 0)) > EXPORT_VERSION:
            raise ValueError(
                f"{path!r} has export version {self.index['version']}; this eplb-plugin "
                f"reads up to {EXPORT_VERSION}"
            )
        self.layout = ExpertLayout.load(os.path.join(self.root, self.index["layout"]))
        self.ep_size = int(self.index["ep_size"])
        self.num_slots = int(self.index["num_slots"])
        self.slots_per_rank = int(self.index["slots_per_rank"])
        self.num_experts = int(self.index["num_experts"])
        self.moe_layers = [int(x) for x in self.index["moe_layers"]]
        self.layout_rows = {int(k): int(v) for k, v in self.index["layout_rows"].items()}
        self.opened: list[str] = []

    def _check_rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.ep_size:
            raise ValueError(f"rank must be in [0, {self.ep_size}), got {rank!r}")
        return rank

    def local_slots(self, rank: int) -> range:
        """Global slot ids held by ``rank``."""
        self._check_rank(rank)
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def rank_experts(self, rank: int) -> torch.Tensor:
        """[num MoE layers, slots_per_rank] int64: logical expert of each local slot."""
        rows = torch.tensor([self.layout_rows[layer] for layer in self.moe_layers])
        slots = self.local_slots(rank)
        return self.layout.phy2log[rows][:, slots.start : slots.stop]

    def rank_files(self, rank: int) -> list[str]:
        self._check_rank(rank)
        return [os.path.join(self.root, n) for n in self.index["ranks"][rank]["files"]]

    def shared_files(self) -> list[str]:
        return [os.path.join(self.root, n) for n in self.index["shared_files"]]

    def moe_layout(self) -> ExpertLayout:
        """The layout with one row per MoE layer, in ``moe_layers`` order (what an engine
        indexes by MoE layer); the stored layout itself when it already has that form."""
        rows = [self.layout_rows[layer] for layer in self.moe_layers]
        if rows == list(range(self.layout.num_layers)):
            return self.layout
        index = torch.tensor(rows)
        return ExpertLayout.from_phy2log(
            self.layout.phy2log[index], self.layout.topology, self.num_experts,
            replica_share=self.layout.replica_share[index],
        )  # fmt: skip

    def _open(self, path: str, device: str | torch.device):
        from safetensors import safe_open

        self.opened.append(path)
        return safe_open(path, framework="pt", device=str(device))

    def _iter_files(
        self, paths: list[str], device: str | torch.device
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for path in paths:
            with self._open(path, device) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    def iter_rank_tensors(self, rank: int, device: str | torch.device = "cpu"):
        """Yield (export name, tensor) of ``rank``'s expert tensors, one at a time."""
        return self._iter_files(self.rank_files(rank), device)

    def rank_tensors(
        self, rank: int, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """``rank``'s expert tensors by export name (global slot ids); reads only its files."""
        return dict(self.iter_rank_tensors(rank, device))

    def rank_state_dict(self, rank: int, device: str | torch.device = "cpu"):
        """``rank``'s expert tensors named as in the source checkpoint with *local* slot
        ids: ``{head}.{slot - first_slot}.{tail}``; what a model built with
        ``slots_per_rank`` experts per layer loads as is. Fused tensors keep their name.
        """
        first = self.local_slots(rank).start
        heads = sorted(self.index["expert_heads"].values(), key=len, reverse=True)
        out = {}
        for name, tensor in self.iter_rank_tensors(rank, device):
            out[_local_name(name, heads, first)] = tensor
        return out

    def shared_tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every non-expert tensor under its original checkpoint name."""
        return dict(self._iter_files(self.shared_files(), device))

    def state_dict(self, rank: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Shared tensors + :meth:`rank_state_dict`: the original checkpoint's names, with
        ``slots_per_rank`` local experts per MoE layer."""
        out = self.shared_tensors(device)
        out.update(self.rank_state_dict(rank, device))
        return out

    def original_state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The source checkpoint's full state dict (logical expert ids, original names),
        rebuilt from the first replica of every expert; reads from every rank's files.

        For a single-process engine that loads logical experts and applies the layout itself.
        """
        out = self.shared_tensors(device)
        fused: dict[str, list] = {}
        for entry in self.index["tensors"]:
            if entry.get("layer") is None:
                continue
            name = entry["name"]
            path = os.path.join(self.root, entry["file"])
            row = self.layout_rows[int(entry["layer"])]
            first = self.layout.log2phy[row, :, 0]
            if "rows" not in entry:
                slot, expert = entry["slots"][0], entry["experts"][0]
                if int(first[expert]) != slot:
                    continue
                with self._open(path, device) as f:
                    out[entry["source"]] = f.get_tensor(name)
                continue
            with self._open(path, device) as f:
                tensor = f.get_tensor(name)
            parts = fused.setdefault(entry["source"], [None] * self.num_experts)
            for i, (slot, expert) in enumerate(zip(entry["slots"], entry["experts"])):
                if int(first[expert]) == slot:
                    parts[expert] = tensor[i]
        for name, parts in fused.items():
            out[name] = torch.stack(parts)
        return out


def _local_name(name: str, heads: list[str], first_slot: int) -> str:
    for head in heads:
        if name.startswith(head + "."):
            slot, _, tail = name[len(head) + 1 :].partition(".")
            if slot.isdigit() and tail:
                return f"{head}.{int(slot) - first_slot}.{tail}"
            return name
    return name


def open_export(root: str | os.PathLike) -> ExportedCheckpoint:
    """Open an export folder for loading (reads only the index and the layout)."""
    return ExportedCheckpoint(root)


# ============================================================================ verify
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
    from .formats import SGLANG_LAYOUT_KEY, _read_json, sglang_phy2log

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
