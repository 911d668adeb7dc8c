"""Record a live server's load: periodic, atomic writes of the balancer's load window.

With ``EplbConfig.record_dir`` set, the Balancer owns a :class:`LoadWindowWriter`. Every
``record_interval`` engine steps (``window`` when 0: consecutive writes then cover
consecutive windows) every EP rank converts its window to logical loads, the ranks sum them
(one all-reduce of ``[steps, L, E]`` float64, in the engine step: collective), and rank 0
writes the result in a background thread, atomically (temporary file, then rename), so a
reader never sees a half-written file and the serving step does not wait for the disk:

- ``record_format="eplb"``: ``record_dir/load.safetensors``, a load trace ``[steps, L, E]``
  float32 (key ``load``), overwritten by each write: what ``eplb export --load``,
  ``eplb plan`` and ``eplb simulate`` read;
- ``record_format="sglang"``: one SGLang stat dump per write,
  ``record_dir/expert_distribution_recorder_<step>.pt`` =
  ``{"rank": 0, "logical_count": [steps, L, E] int, "average_utilization_rate_over_window":
  None}``, as SGLang's ``/dump_expert_distribution_record`` writes them. SGLang's layer
  axis spans every hidden layer: the SGLang integration sets :attr:`layer_ids` /
  :attr:`num_layers` so that dense layers get zero rows. A folder of these dumps is itself
  a load (``eplb export --load DIR`` concatenates them in file-name order).

A write that fails (disk full, folder removed) is logged and serving goes on.

The loop closes with :func:`read_initial_layout`: an engine integration given
``EplbConfig.initial_layout`` (an ``eplb export`` folder or a layout file) starts serving
from that layout instead of its own start-up one.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from .comm.base import Communicator
from .recorder import LoadRecorder

log = logging.getLogger(__name__)

EPLB_FILE = "load.safetensors"
SGLANG_PREFIX = "expert_distribution_recorder_"


class LoadWindowWriter:
    """Writes a LoadRecorder's window, summed over ranks, every ``interval`` steps.

    Args:
        recorder: the Balancer's LoadRecorder.
        folder: where rank 0 writes (created if missing).
        interval: engine steps between two writes (>= 1).
        fmt: ``"eplb"`` or ``"sglang"`` (module docstring).
        comm: the communicator of the EP ranks (the recorder's by default).

    Attributes:
        layer_ids: for the SGLang form, the model layer id of each balanced layer (None:
            the balanced layers are the model's layers).
        num_layers: for the SGLang form, the model's hidden layer count.
        written: paths written so far (rank 0), oldest first.
        failures: writes that failed.
    """

    def __init__(
        self,
        recorder: LoadRecorder,
        folder: str | os.PathLike,
        interval: int,
        fmt: str = "eplb",
        comm: Communicator | None = None,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"record interval must be a positive integer, got {interval!r}")
        if fmt not in ("eplb", "sglang"):
            raise ValueError(f"record format must be 'eplb' or 'sglang', got {fmt!r}")
        self.recorder = recorder
        self.comm = comm if comm is not None else recorder.comm
        self.folder = os.fspath(folder)
        self.interval = interval
        self.fmt = fmt
        self.layer_ids: list[int] | None = None
        self.num_layers: int | None = None
        self.written: list[str] = []
        self.failures = 0
        self._thread: threading.Thread | None = None
        if self.comm.rank == 0:
            try:
                os.makedirs(self.folder, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"record_dir {self.folder!r}: cannot create it: {exc}") from exc
            if not os.access(self.folder, os.W_OK):
                raise ValueError(f"record_dir {self.folder!r} is not writable")

    @classmethod
    def from_config(cls, config, recorder: LoadRecorder, comm: Communicator | None = None):
        """The writer ``config`` (an EplbConfig) asks for, or None when ``record_dir`` is ''."""
        if not config.record_dir:
            return None
        interval = config.record_interval or config.window
        return cls(recorder, config.record_dir, interval, config.record_format, comm)

    def path_for(self, step: int) -> str:
        """Where the write at engine step ``step`` goes."""
        if self.fmt == "eplb":
            return os.path.join(self.folder, EPLB_FILE)
        return os.path.join(self.folder, f"{SGLANG_PREFIX}{step:012d}.pt")

    def maybe_write(self, step: int) -> bool:
        """Write when ``step`` (engine steps recorded so far) is due; call on every rank."""
        if step % self.interval or self.recorder.filled == 0:
            return False
        self.write(step)
        return True

    def write(self, step: int) -> None:
        """Sum the window over the ranks (collective) and, on rank 0, write it in the
        background (the previous write is waited for first)."""
        trace = self.recorder.logical_window().to(torch.float64)  # [S, L, E]
        if self.comm.world_size > 1:
            self.comm.all_reduce(trace, op="sum")
        if self.comm.rank != 0:
            return
        trace = trace.cpu()
        self.flush()
        path = self.path_for(step)
        self._thread = threading.Thread(
            target=self._write_file, args=(path, trace), name="eplb-record", daemon=False
        )
        self._thread.start()

    def _write_file(self, path: str, trace: torch.Tensor) -> None:
        try:
            if self.fmt == "eplb":
                from .traces import write_load

                write_load(path, trace.to(torch.float32))
            else:
                from .formats import write_sglang_dump

                write_sglang_dump(path, self._sglang_rows(trace), rank=0)
            self.written.append(path)
        except Exception as exc:  # noqa: BLE001 - recording must never take serving down
            self.failures += 1
            log.warning("eplb-plugin: writing the load window to %s failed: %s", path, exc)

    def _sglang_rows(self, trace: torch.Tensor) -> torch.Tensor:
        """[S, L, E] -> [S, num_layers, E] with the balanced layers at their model ids."""
        if self.layer_ids is None:
            return trace.round()
        num_layers = self.num_layers or (max(self.layer_ids) + 1)
        full = torch.zeros(trace.shape[0], num_layers, trace.shape[2], dtype=trace.dtype)
        full[:, torch.tensor(self.layer_ids, dtype=torch.long)] = trace
        return full.round()

    def flush(self) -> None:
        """Wait for the write in progress, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    close = flush


def read_initial_layout(
    path: str | os.PathLike, num_layers: int, num_experts: int, num_slots: int, ep_size: int
) -> torch.Tensor:
    """The [L, P] int64 phy2log of ``EplbConfig.initial_layout``, checked against the engine.

    Args:
        path: an ``eplb export`` folder (its ``layout.safetensors``), a layout
            ``.safetensors`` or SGLang's ``.pt``/``.json`` form with one row per MoE layer.
        num_layers, num_experts, num_slots, ep_size: what the engine serves (L MoE layers, E
            experts, P = E + num_redundant_experts slots over ep_size ranks).
    Raises:
        ValueError: a missing or unreadable file, or a layout for another shape, named.
    """
    from .formats import read_layout

    path = os.fspath(path)
    source = path
    if os.path.isdir(path):
        source = os.path.join(path, "layout.safetensors")
        if not os.path.isfile(source):
            raise ValueError(f"initial_layout {path!r} is a folder without layout.safetensors "
                             "(not an `eplb export` folder)")  # fmt: skip
    layout = read_layout(source, ep_size)
    shape = (layout.num_layers, layout.num_slots, layout.num_experts)
    if shape != (num_layers, num_slots, num_experts):
        raise ValueError(
            f"initial_layout {path!r} has {shape[0]} layers, {shape[1]} slots and {shape[2]} "
            f"experts; the engine serves {num_layers} MoE layers and {num_experts} experts on "
            f"{num_slots} slots (num_redundant_experts must be {shape[1] - shape[2]})"
        )
    if layout.topology.num_gpus != ep_size:
        raise ValueError(
            f"initial_layout {path!r} was planned for {layout.topology.num_gpus} EP ranks, "
            f"the engine has {ep_size}"
        )
    return layout.phy2log.to(torch.int64).clone()


def check_initial_layout_path(path: str) -> None:
    """ValueError unless ``path`` ('' for none) exists: checked by the launchers before an
    engine starts, the shape only once the engine knows its model."""
    if path and not os.path.exists(path):
        raise ValueError(f"initial_layout {path!r} does not exist")


__all__ = [
    "LoadWindowWriter",
    "EPLB_FILE",
    "SGLANG_PREFIX",
    "read_initial_layout",
    "check_initial_layout_path",
]
