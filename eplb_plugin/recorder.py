"""``LoadRecorder``: per-step expert load on the device, a ring window, an EMA.

Per engine step, ``map_and_count`` adds the tokens this rank routes to every physical slot
into ``counts`` ([L, P] int32, on the device). :meth:`LoadRecorder.record` (once per step)
moves them into the ring window ([W, L, P] float32) and, with the ``ema`` predictor, the EMA
(:class:`~eplb_plugin.predictor.EmaLoad`), and zeroes ``counts``: all
device ops, no host synchronisation. Every window row remembers which layout was in force
when it was counted, so converting slots to logical experts stays right across a rebalance
in the middle of the window. Ranks are summed (one all-reduce) only when a plan is due.

A window can be dumped as a load trace ([steps, L, E], the format ``eplb plan`` and
``eplb simulate`` read) and a trace loaded back into the window (e.g. to plan the first
layout from statistics of an earlier run).
"""

from __future__ import annotations

import os

import torch

from .comm.base import Communicator, LocalCommunicator
from .predictor import EmaLoad, check_predictor
from .traces import read_load, write_load

# Most per-step rows a plan sees (:meth:`LoadRecorder.plan_steps`): the window is cut into
# this many consecutive runs of steps.
PLAN_STEPS = 8


class LoadRecorder:
    """Per-step slot counts -> ring window and EMA of logical loads.

    Args:
        num_layers: L MoE layers.
        num_slots: P physical slots.
        num_experts: E logical experts.
        window: W steps kept.
        phy2log: [L, P] int the layout in force now.
        device: where counts, window and EMA live (the experts' device).
        predictor: ``"window"`` or ``"ema"``: what :meth:`logical_load` returns
            (:mod:`eplb_plugin.predictor`).
        ema_decay: EMA decay per step, in (0, 1).
        comm: communicator for the cross-rank sums (default: one rank).

    Attributes:
        counts: [L, P] int32, the buffer ``map_and_count`` adds into during a step.
        window: [W, L, P] float32 ring of recorded steps.
        ema: the :class:`~eplb_plugin.predictor.EmaLoad` of logical loads.
        steps: steps recorded so far.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_experts: int,
        window: int,
        phy2log: torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        predictor: str = "window",
        ema_decay: float = 0.99,
        comm: Communicator | None = None,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_slots", num_slots),
            ("num_experts", num_experts),
            ("window", window),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_predictor(predictor, ema_decay)
        self.num_layers, self.num_slots, self.num_experts = num_layers, num_slots, num_experts
        self.window_size = window
        self.device = torch.device(device)
        self.predictor = predictor
        self.ema_decay = float(ema_decay)
        self.comm = comm if comm is not None else LocalCommunicator()
        L, P, E = num_layers, num_slots, num_experts
        self.counts = torch.zeros(L, P, dtype=torch.int32, device=self.device)
        self.window = torch.zeros(window, L, P, dtype=torch.float32, device=self.device)
        self.ema = EmaLoad((L, E), ema_decay, window, device=self.device)
        self._scaled = torch.empty(L, P, dtype=torch.float32, device=self.device)
        self._row_version = [-1] * window  # layout version of each window row (-1: empty)
        self._layouts: dict[int, torch.Tensor] = {}  # version -> [L, P] int64 on device
        self._version = -1
        self._pos = 0  # next row to write
        self.filled = 0
        self.steps = 0
        self.set_layout(phy2log)

    # ------------------------------------------------------------------ per step
    def set_layout(self, phy2log: torch.Tensor) -> None:
        """Declare the layout in force from the next recorded step on ([L, P] int)."""
        phy2log = torch.as_tensor(phy2log)
        if tuple(phy2log.shape) != (self.num_layers, self.num_slots):
            raise ValueError(
                f"phy2log must be [{self.num_layers}, {self.num_slots}], got {tuple(phy2log.shape)}"
            )
        self._version += 1
        self._layouts[self._version] = phy2log.to(device=self.device, dtype=torch.int64).clone()
        self._drop_unused_layouts()

    def record(self) -> None:
        """Close the step: counts -> window row and EMA, then zero counts (device only)."""
        row = self._pos
        self.window[row].copy_(self.counts)
        self._row_version[row] = self._version
        if self.predictor == "ema":
            self.ema.add_slots(self.counts, self._layouts[self._version], self._scaled)
        self.counts.zero_()
        self._pos = (row + 1) % self.window_size
        self.filled = min(self.filled + 1, self.window_size)
        self.steps += 1
        if self.filled == self.window_size and self._pos == 0:
            self._drop_unused_layouts()

    # ------------------------------------------------------------------ reading
    def _rows(self) -> list[int]:
        """Valid window rows, oldest first."""
        start = (self._pos - self.filled) % self.window_size
        return [(start + i) % self.window_size for i in range(self.filled)]

    def _drop_unused_layouts(self) -> None:
        used = {self._row_version[r] for r in self._rows()} | {self._version}
        for version in [v for v in self._layouts if v not in used]:
            del self._layouts[version]

    def slot_window(self) -> torch.Tensor:
        """[S, L, P] float32 recorded slot counts of this rank, oldest step first."""
        return self.window[torch.tensor(self._rows(), dtype=torch.long, device=self.device)]

    def logical_window(self) -> torch.Tensor:
        """[S, L, E] float32 this rank's per-step logical loads, oldest first.

        Each step is converted through the layout that was in force when it was recorded.
        """
        rows = self._rows()
        out = torch.zeros(
            len(rows), self.num_layers, self.num_experts, dtype=torch.float32, device=self.device
        )
        for version, idx in self._rows_by_version(rows).items():
            index = self._layouts[version].unsqueeze(0).expand(len(idx), -1, -1)
            pos = torch.tensor(idx, dtype=torch.long, device=self.device)
            src = self.window[torch.tensor([rows[i] for i in idx], device=self.device)]
            out.index_copy_(0, pos, torch.zeros_like(out[: len(idx)]).scatter_add_(2, index, src))
        return out

    def _rows_by_version(self, rows: list[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(self._row_version[r], []).append(i)
        return groups

    def local_load(self) -> torch.Tensor:
        """[L, E] float64 this rank's load for the predictor (window sum or EMA), device."""
        if self.predictor == "ema":
            return self.ema.load().to(torch.float64)
        return self._logical_sum(self._rows())

    def _logical_sum(self, rows: list[int]) -> torch.Tensor:
        """[L, E] float64 on the device: the window ``rows``' logical loads, summed."""
        total = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64,
                            device=self.device)  # fmt: skip
        return self._add_logical(rows, total)

    def _to_host(self, local: torch.Tensor, reduce: bool) -> torch.Tensor:
        """``local`` summed over the ranks when ``reduce`` (collective), on the host."""
        if reduce and self.comm.world_size > 1:
            self.comm.all_reduce(local, op="sum")
        return local.cpu()

    def _add_logical(self, rows: list[int], out: torch.Tensor) -> torch.Tensor:
        """Add the window ``rows``' slot counts, summed, into ``out`` [L, E] float64 as
        logical loads, each row through the layout it was recorded with; returns ``out``.
        Layout by layout on the slot window: never an [S, L, E] copy of the window."""
        for version, idx in self._rows_by_version(rows).items():
            sel = torch.tensor([rows[i] for i in idx], dtype=torch.long, device=self.device)
            per_slot = self.window[sel].to(torch.float64).sum(0)
            out.scatter_add_(1, self._layouts[version], per_slot)
        return out

    def logical_load(self, reduce: bool = True) -> torch.Tensor:
        """[L, E] float64 load on the host, summed over ranks when ``reduce`` (collective).

        The window predictor sums the window's steps; the EMA predictor returns the EMA of
        all steps, bias-corrected and scaled to the window's steps (the same scale).
        """
        return self._to_host(self.local_load(), reduce)

    def plan_steps(
        self, max_steps: int = PLAN_STEPS, reduce: bool = True, last: int | None = None
    ) -> torch.Tensor | None:
        """[S', L, E] float64 the window (or its ``last`` newest steps) cut into
        ``S' = min(steps, max_steps)`` consecutive runs of steps, each summed, oldest first,
        on the host; summed over ranks when ``reduce`` (collective). None with the ``ema``
        predictor (no per-step window).

        What a policy that weighs the window's steps one by one (recency, spread) plans
        on: its sum is the window predictor's load. Runs rather than single steps keep the
        all-reduce small (``max_steps`` x L x E) for windows of thousands of steps; runs of
        many steps average per-step noise out, so what ``spread`` then sees is the drift
        between them. ``torch.tensor_split`` sizes: runs differ by one step at most.
        """
        if self.predictor != "window":
            return None
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        rows = self._newest_rows(last)
        runs = torch.tensor_split(torch.arange(len(rows)), max(1, min(len(rows), max_steps)))
        shape = (len(runs), self.num_layers, self.num_experts)
        steps = torch.zeros(shape, dtype=torch.float64, device=self.device)
        for out, run in zip(steps, runs):
            self._add_logical([rows[i] for i in run.tolist()], out)
        return self._to_host(steps, reduce)

    def newest_load(self, steps: int, reduce: bool = True) -> torch.Tensor:
        """[L, E] float64 logical load of the ``steps`` newest recorded steps (at most the
        window), on the host; summed over ranks when ``reduce`` (collective): what the
        shift detector compares with the plan's forecast."""
        return self._to_host(self._logical_sum(self._newest_rows(steps)), reduce)

    def _newest_rows(self, last: int | None) -> list[int]:
        rows = self._rows()
        if last is None:
            return rows
        if isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise ValueError(f"last must be a positive number of steps, got {last!r}")
        return rows[-last:]

    def gpu_loads(self, num_gpus: int, reduce: bool = True) -> torch.Tensor:
        """[L, num_gpus] float64 tokens each GPU received over the window (measured).

        Slot counts already include the dispatch mode's replica choice, so this is the load
        each GPU actually served, whatever the layout changes in between.
        """
        if self.num_slots % num_gpus:
            raise ValueError(f"num_gpus={num_gpus} does not divide {self.num_slots} slots")
        per_slot = self.slot_window().to(torch.float64).sum(0)
        return self._to_host(per_slot.view(self.num_layers, num_gpus, -1).sum(-1), reduce)

    # ------------------------------------------------------------------ files
    def dump(self, path: str | os.PathLike) -> torch.Tensor:
        """Write the window as a load trace [steps, L, E] (summed over ranks; collective).

        Every rank must call it; rank 0 writes the file (atomically). Returns the trace.
        """
        trace = self.logical_window().to(torch.float64)
        if self.comm.world_size > 1:
            self.comm.all_reduce(trace, op="sum")
        trace = trace.to(torch.float32).cpu()
        if trace.shape[0] == 0:
            raise ValueError("the window is empty: record at least one step before dumping")
        if self.comm.rank == 0:
            write_load(path, trace)
        return trace

    def load(self, path: str | os.PathLike) -> int:
        """Append a load trace's steps to the window, as if just recorded; returns steps added.

        The trace holds loads summed over ranks ([L, E] or [steps, L, E], e.g. from
        :meth:`dump`, ``eplb`` tools or an SGLang/vLLM statistics dump converted by
        ``eplb_plugin.traces``). Call it on every rank: rank 0 keeps the counts (placed on each
        expert's first slot of the layout in force), the others add zero steps, so the
        cross-rank sum sees the trace once. Only the last ``window`` steps are kept in the
        window; the EMA predictor takes in every step.
        """
        trace = read_load(path)
        if trace.dim() == 2:
            trace = trace.unsqueeze(0)
        if tuple(trace.shape[1:]) != (self.num_layers, self.num_experts):
            raise ValueError(
                f"load trace {os.fspath(path)!r} has [layers, experts] = "
                f"{list(trace.shape[1:])}, expected [{self.num_layers}, {self.num_experts}]"
            )
        every_step = trace.to(self.device)
        trace = every_step[-self.window_size :]
        phy2log = self._layouts[self._version]
        shape = (self.num_layers, self.num_experts)
        first = torch.full(shape, self.num_slots, dtype=torch.int64, device=self.device)
        slots = torch.arange(self.num_slots, device=self.device).expand_as(phy2log)
        first.scatter_reduce_(1, phy2log, slots, reduce="amin")
        missing = first >= self.num_slots
        if bool(missing.any()):
            raise ValueError("the layout in force leaves some expert without a slot")
        for step in trace:
            row = self._pos
            self.window[row].zero_()
            if self.comm.rank == 0:
                self.window[row].scatter_(1, first, step)
            self._row_version[row] = self._version
            self._pos = (row + 1) % self.window_size
            self.filled = min(self.filled + 1, self.window_size)
        if self.predictor == "ema":  # every step; other ranks add zero steps, as in the window
            for step in every_step:
                self.ema.add(step if self.comm.rank == 0 else torch.zeros_like(step))
        self._drop_unused_layouts()
        return int(trace.shape[0])


__all__ = ["LoadRecorder"]
