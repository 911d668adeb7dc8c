"""Writing an export: byte ranges streamed from the source files into a hidden temporary
folder beside the target, fsynced and renamed into place only when complete.

Never more than one copy chunk (or one tensor with ``copy_mode="safe_open"``) is resident.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint
from ..formats import write_sglang_layout
from ..layout import ExpertLayout
from .plan import (
    EXPORT_INDEX,
    EXPORT_VERSION,
    LAYOUT_FILE,
    PAGE,
    SGLANG_LAYOUT_FILE,
    ExportConfig,
    ExportPlan,
    OutTensor,
    _sglang_rows,
    export_index,
    plan_export,
)

_PARTIAL = ".eplb-partial-"


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
    config: ExportConfig | None = None,
) -> ExportSummary:
    """Write ``checkpoint_dir`` re-arranged by ``layout`` into the new folder ``out_dir``.

    Every check (checkpoint headers, expert completeness, layout agreement, free disk
    space, target absent) runs before anything is written; the output appears in one
    rename. Raises ValueError on bad input, with nothing written.
    """
    config = ExportConfig() if config is None else config
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
            # 0666 less the umask, as open() would give (a fixed 0644 ignored umask 002)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
    plan.layout.save(os.path.join(tmp, LAYOUT_FILE), {"source": "eplb export"})
    write_sglang_layout(os.path.join(tmp, SGLANG_LAYOUT_FILE), *_sglang_rows(plan))
