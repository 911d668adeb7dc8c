"""``PlanMemory``: the load of earlier plans' windows, kept for the next plans.

A plan sees the engine's window (W steps). Where noise dominates the load (sequences that
change every few steps around a stable task mix), a forecast over more steps is better: the
window's mean carries its own noise into the placement. Where the load drifts, older steps
mislead. The shift detector (:mod:`eplb_plugin.shift`) tells the two apart, so a plan can
also look at the windows earlier plans saw, as long as no shift was detected since: memory
where the load is stationary, none across a shift.

The memory holds what the plans already had on the host (their windows' runs, summed over
ranks: ``[S, L, E]`` float64 each, about 0.5 MB at DeepSeek-V3's shape), so it costs no
device memory and no collective. Each run keeps the engine steps it covers, so a run that
overlaps the new plan's window (a window longer than the interval, or a follow-up plan
after a shift) is never counted twice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .names import MAX_MEMORY_WINDOWS


def run_bounds(first_step: int, num_steps: int, num_runs: int) -> list[tuple[int, int]]:
    """The engine steps ``[start, end)`` of each run when ``num_steps`` steps from
    ``first_step`` are cut into ``num_runs`` consecutive runs (``torch.tensor_split``
    sizes, as :meth:`~eplb_plugin.recorder.LoadRecorder.plan_steps` cuts them)."""
    bounds, start = [], first_step
    for part in torch.tensor_split(torch.arange(num_steps), max(1, num_runs)):
        bounds.append((start, start + part.numel()))
        start += part.numel()
    return bounds


@dataclass
class PlanMemory:
    """Runs of earlier plans' windows, for the next plans.

    Attributes:
        windows: how many windows a plan sees: its own and up to ``windows - 1`` earlier
            plans' (1: its own only, no memory).
        floor: no run that starts before this engine step is used (set at a detected
            shift: the load before it is not the load after it); None until the first shift
            (a window loaded from a trace before serving counts from negative steps).
    """

    windows: int = 2
    floor: int | None = None
    _entries: deque = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.windows, bool) or not isinstance(self.windows, int) or self.windows < 1:
            raise ValueError(f"memory windows must be a positive integer, got {self.windows!r}")
        if self.windows > MAX_MEMORY_WINDOWS:
            raise ValueError(f"memory windows must be <= {MAX_MEMORY_WINDOWS}, got {self.windows}")

    def forget_before(self, step: int) -> None:
        """A shift was detected at ``step``: runs that start before it are not used again."""
        self.floor = int(step) if self.floor is None else max(self.floor, int(step))

    def runs_before(self, start: int) -> tuple[torch.Tensor | None, list[int]]:
        """The remembered runs that lie wholly within ``[floor, start)``, oldest first:
        ([S', L, E] float as remembered, or None when there are none; each run's steps)."""
        kept = [
            (run, end - begin)
            for bounds, runs in self._entries
            for (begin, end), run in zip(bounds, runs)
            if (self.floor is None or begin >= self.floor) and end <= start
        ]
        if not kept:
            return None, []
        return torch.stack([run for run, _ in kept]), [n for _, n in kept]

    def remember(self, runs: torch.Tensor, first_step: int, num_steps: int) -> None:
        """Keep a plan's window: ``runs`` [S, L, E] float the all-rank load of the
        ``num_steps`` engine steps from ``first_step``, cut into S runs as :func:`run_bounds`
        cuts them. Only the ``windows - 1`` newest plans' windows are kept."""
        if self.windows < 2:
            return
        self._entries.append((run_bounds(first_step, num_steps, runs.shape[0]), runs))
        while len(self._entries) > self.windows - 1:
            self._entries.popleft()

    def extend(
        self, window: torch.Tensor, first_step: int, num_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A plan's load: its window's runs after the remembered ones; the window is then
        remembered for the next plans.

        Args:
            window: [S, L, E] float the all-rank runs of the ``num_steps`` engine steps from
                ``first_step`` (cut as :func:`run_bounds` cuts them).
        Returns:
            (load [S' + S, L, E] of ``window``'s dtype: what the plan is made on, oldest run first;
            forecast runs: ``load`` when no run spans more than 5/4 as many steps as
            another, else ``window``: the runs the shift detector's forecast is the mean of,
            which must be alike for its yardstick to hold).
        """
        older, older_steps = self.runs_before(first_step)
        self.remember(window, first_step, num_steps)
        if older is None:
            return window, window
        load = torch.cat([older.to(window.dtype), window])
        lengths = older_steps + [end - begin for begin, end in self._entries[-1][0]]
        # tensor_split's runs differ by a step; runs of 1 step after runs of 2 are not alike
        alike = 4 * max(lengths) <= 5 * min(lengths)
        return load, (load if alike else window)
