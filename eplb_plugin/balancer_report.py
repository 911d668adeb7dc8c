"""The records a :class:`~eplb_plugin.balancer.Balancer` hands out: what one ``step()`` did
(:class:`StepReport`) and its running totals (:class:`BalancerStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepReport:
    """What one ``Balancer.step()`` did (None is returned when it did nothing).

    Attributes:
        step: engine step index (number of ``step()`` calls so far, starting at 1).
        event: ``"planned"`` (load snapshot taken, plan started), ``"skipped"`` (plan
            not acted on: ``reason`` says why),
            ``"collected"`` (plan accepted; the move is being prepared in the background and
            starts ``plan_delay`` steps later), ``"chunk"`` (a chunk of layers moved and
            committed), ``"done"`` (the last chunk committed), ``"failed"`` (planning failed,
            or a chunk was abandoned: every rank kept its old layout for its layers).
        layers: layers committed in this step.
        bytes_sent: bytes this rank sent in this step.
        bytes_received: bytes this rank received in this step.
        pause_s: seconds spent inside ``step()``.
        balancedness_before: predicted balancedness of the layout in force (plan events).
        balancedness_after: predicted balancedness of the planned layout (plan events).
        error: the error message for ``"failed"``.
        reason: why a plan was skipped: ``"no gain"`` (predicted gain below ``min_gain``),
            ``"unchanged"`` (the policy kept the layout), ``"not ready"`` (the policy had
            not finished when the plan was collected, or was still running from an earlier
            interval).
    """

    step: int
    event: str
    layers: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    pause_s: float = 0.0
    balancedness_before: float | None = None
    balancedness_after: float | None = None
    error: str | None = None
    reason: str | None = None


@dataclass
class BalancerStats:
    """Running totals of a balancer.

    Attributes:
        rebalances: rebalances completed (every chunk committed).
        failures: failed plans (the policy raised, ranks disagreed), chunks abandoned after
            an error or timeout, and communication failures.
        skipped: plans not acted on, for any reason (``skip_reasons`` counts each reason:
            ``"no gain"``, ``"unchanged"``, ``"not ready"``, ``"busy"``: due while the
            previous rebalance was still in progress).
        slots_moved: slots whose expert changed on this rank, summed over commits.
        bytes_moved: bytes this rank sent plus received.
        longest_pause_s: longest single ``step()``.
        balancedness: (step, predicted before, predicted after) per collected plan.
        shifts: load shifts detected (each made a plan due at once).
        realized_balancedness: the last measured balancedness (per-GPU loads summed over the
            ranks; mean/max, averaged over layers): over the steps since the previous
            rebalance (measured when a plan falls due) or since the previous
            ``log_balancedness`` line.
    """

    rebalances: int = 0
    failures: int = 0
    skipped: int = 0
    slots_moved: int = 0
    bytes_moved: int = 0
    longest_pause_s: float = 0.0
    balancedness: list[tuple[int, float, float]] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    realized_balancedness: float | None = None
    shifts: int = 0
