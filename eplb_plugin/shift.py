"""Re-plan early when the load shifts, instead of waiting for the next regular re-plan.

A plan made every ``interval`` steps from the last ``window`` steps is stale from the moment
the traffic changes (a new mix of requests, a new topic in long sequences) until the next
plan, and that plan still averages the old load with the new. The detector compares each
new *run* of steps (the unit :meth:`~eplb_plugin.recorder.LoadRecorder.plan_steps` cuts the
window into) with the load the layout in service was planned on, and calls a shift when the
run departs from that forecast ``threshold`` times as far as a run of the same load would.
The Balancer and the simulator then re-plan at once on the runs since the shift only, plan
again ``FOLLOW_UP_RUNS`` runs later on the runs since the shift (more data, still no old
load), and resume the regular cadence after that.

The yardstick comes from the window's own run-to-run scatter ``noise`` (the mean deviation
of a run from the runs' true mean), so the rule needs no notion of what noise a step of a
given size has: sequences that make the load jumpy raise it, long quiet runs lower it. A new
run's deviation from a forecast that is itself the mean of S noisy runs is expected at
``noise x (1 + 1 / S)`` when nothing shifted: a forecast of one run (just after a shift) is
twice as far from the next run as the true mean is, and the yardstick says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .names import SHIFT_THRESHOLD

# A shift-triggered plan sees one run; the follow-up plan this many runs later sees three.
FOLLOW_UP_RUNS = 2


def run_deviation(observed: torch.Tensor, forecast: torch.Tensor) -> float:
    """How far one run's load departs from a forecast: the mean over layers and experts of
    ``(observed - expected)^2 / max(expected, 1)``, ``expected`` being the forecast scaled,
    per layer, to the run's own total (runs of different sizes compare on their mix).

    Args:
        observed: [L, E] float tokens per logical expert of the run.
        forecast: [L, E] float the load the layout was planned on (any scale).
    Returns:
        A float >= 0 (0 when the run's mix equals the forecast's, or the run is empty; a
        layer idle in the forecast counts the run's whole load as departure).
    """
    observed = observed.to(torch.float64)
    forecast = forecast.to(torch.float64)
    total = forecast.sum(-1, keepdim=True)
    scale = observed.sum(-1, keepdim=True) / total.clamp_min(1e-12)
    expected = forecast * torch.where(total > 0, scale, torch.zeros_like(scale))
    return float(((observed - expected).square() / expected.clamp_min(1.0)).mean())


@dataclass
class ShiftDetector:
    """The forecast of the layout in service and the scatter its window showed.

    Attributes:
        threshold: a run whose deviation exceeds ``threshold`` x the expected deviation
            ``noise x (1 + 1 / forecast_runs)`` is a shift (``0``: never).
        forecast: [L, E] float64 mean load per run the layout was planned on.
        forecast_runs: S, the runs the forecast is the mean of.
        noise: mean deviation of a run from the runs' true mean, estimated from the window's
            runs' deviation from their own mean (x S / (S - 1), as the mean is fitted to
            them); kept from the last plan that had at least two runs.
        run_steps: engine steps per run of the last plan: a check looks at that many
            newest steps, so it compares like with like.
    """

    threshold: float = SHIFT_THRESHOLD
    forecast: torch.Tensor | None = None
    forecast_runs: int = 1
    noise: float | None = None
    run_steps: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"shift threshold must be a number, got {self.threshold!r}")
        if not self.threshold >= 0:
            raise ValueError(f"shift threshold must be >= 0, got {self.threshold!r}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @property
    def ready(self) -> bool:
        """A forecast and a yardstick exist: checks can run."""
        return self.enabled and self.forecast is not None and self.noise is not None

    def calibrate(
        self, runs: torch.Tensor, run_steps: int, noise_runs: torch.Tensor | None = None
    ) -> None:
        """Take the forecast (and, from two runs on, the yardstick) of a new plan.

        Args:
            runs: [S, L, E] float the all-rank load of the runs the plan was made on.
            run_steps: engine steps per run (>= 1).
            noise_runs: [S', L, E] float the runs whose scatter is the yardstick (default
                ``runs``): the newest window's, when ``runs`` also holds older windows whose
                drift would inflate it.
        """
        for name, value in (("runs", runs), ("noise_runs", noise_runs)):
            if value is not None and (value.dim() != 3 or value.shape[0] < 1):
                raise ValueError(f"{name} must be [S >= 1, L, E], got {tuple(value.shape)}")
        runs = runs.to(torch.float64)
        self.forecast = runs.mean(0)
        self.run_steps = max(1, int(run_steps))
        self.forecast_runs = runs.shape[0]
        noise_runs = runs if noise_runs is None else noise_runs.to(torch.float64)
        count = noise_runs.shape[0]
        if count >= 2:
            mean = noise_runs.mean(0)
            scatter = sum(run_deviation(run, mean) for run in noise_runs) / count
            self.noise = scatter * count / (count - 1)

    @property
    def expected(self) -> float:
        """Expected deviation of a new run from the forecast when nothing shifted."""
        return (self.noise or 0.0) * (1.0 + 1.0 / self.forecast_runs)

    def shifted(self, observed: torch.Tensor) -> bool:
        """Whether the run ``observed`` [L, E] departs from the forecast beyond the threshold
        (False while not ``ready`` or when the run holds no tokens)."""
        if not self.ready or float(observed.sum()) <= 0:
            return False
        return run_deviation(observed, self.forecast) > self.threshold * self.expected

    def deviation_ratio(self, observed: torch.Tensor) -> float:
        """The run's deviation over the expected one (for logs); inf when that is 0."""
        if not self.ready:
            return 0.0
        value, expected = run_deviation(observed, self.forecast), self.expected
        return value / expected if expected > 0 else (float("inf") if value > 0 else 0.0)


def run_steps_of(steps: int, max_runs: int) -> int:
    """Engine steps per run when ``steps`` steps are cut into ``min(steps, max_runs)`` runs
    (``torch.tensor_split`` sizes: the longest run)."""
    runs = max(1, min(steps, max_runs))
    return -(-max(steps, 1) // runs)


def cut_runs(steps: torch.Tensor, max_runs: int) -> tuple[torch.Tensor, int]:
    """Per-step loads [n, L, E] -> (runs [min(n, max_runs), L, E], steps per run): the
    consecutive runs :meth:`~eplb_plugin.recorder.LoadRecorder.plan_steps` makes of a window
    of ``n`` steps, each summed."""
    n = steps.shape[0]
    parts = torch.tensor_split(steps, max(1, min(n, max_runs)))
    return torch.stack([part.sum(0) for part in parts]), run_steps_of(n, max_runs)
