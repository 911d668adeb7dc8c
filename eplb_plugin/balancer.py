"""``Balancer``: the controller a serving engine calls once per step.

Public API (other modules code against it; bodies are being filled in):

    maps = BalancerMaps            # device tensors the router reads, updated in place
    balancer = Balancer(config, layout, expert_tensors, group=None)
    map_and_count(topk_ids, balancer.maps.log2phy, balancer.maps.logcnt,
                  balancer.maps.replica_share, balancer.counts, layer, num_valid, ...)
    report = balancer.step()       # once per engine step, after the forward
    balancer.stats, balancer.layout
    balancer.close()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import EplbConfig
from .layout import ExpertLayout


@dataclass
class BalancerMaps:
    """Device mapping tensors read by the router; written in place on every commit.

    Allocated once at their maximum size so that pointers captured in CUDA graphs stay valid.

    Attributes:
        phy2log: [L, P] int64 logical expert of each slot.
        log2phy: [L, E, Xmax] int64 slots of each expert, -1 padded; Xmax = P - E + 1 (the
            most replicas one expert can have), fixed for the life of the balancer.
        logcnt: [L, E] int64 replicas per expert.
        replica_share: [L, P] float32 share of its expert's tokens each slot receives.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    replica_share: torch.Tensor


@dataclass
class StepReport:
    """What one ``Balancer.step()`` did (None is returned when it did nothing).

    Attributes:
        step: engine step index (number of ``step()`` calls so far, starting at 1).
        event: ``"planned"`` (load snapshot taken, plan started), ``"skipped"`` (plan
            collected, predicted gain below ``min_gain`` or nothing to move), ``"chunk"``
            (a chunk of layers moved and committed), ``"done"`` (the last chunk committed),
            ``"failed"`` (a chunk was abandoned; every rank kept its old layout for it).
        layers: layers committed in this step.
        bytes_sent: bytes this rank sent in this step.
        bytes_received: bytes this rank received in this step.
        pause_s: seconds spent inside ``step()``.
        balancedness_before: predicted balancedness of the layout in force (plan events).
        balancedness_after: predicted balancedness of the planned layout (plan events).
        error: the error message for ``"failed"``.
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


@dataclass
class BalancerStats:
    """Running totals of a balancer.

    Attributes:
        rebalances: rebalances completed (every chunk committed).
        failures: chunks abandoned after an error or timeout.
        skipped: plans not acted on (gain below ``min_gain``).
        slots_moved: slots whose expert changed on this rank, summed over commits.
        bytes_moved: bytes this rank sent plus received.
        longest_pause_s: longest single ``step()``.
        balancedness: (step, predicted before, predicted after) per collected plan.
    """

    rebalances: int = 0
    failures: int = 0
    skipped: int = 0
    slots_moved: int = 0
    bytes_moved: int = 0
    longest_pause_s: float = 0.0
    balancedness: list[tuple[int, float, float]] = field(default_factory=list)


class Balancer:
    """Records load, decides when to re-plan, plans off the critical path, moves weights.

    Args:
        config: an EplbConfig.
        layout: the ExpertLayout the engine serves with now (host tensors); its topology's
            ``num_gpus`` must equal the world size.
        expert_tensors: ``expert_tensors[layer]`` = this rank's tensors of that MoE layer
            whose dim 0 is the rank's local slots (``slots_per_gpu``): weights, fp8 scales,
            biases. Moved in place.
        group: torch.distributed process group of the EP ranks (default: the world group
            when torch.distributed is initialized, else a single process).
        rank, world_size: override the group's (tests).
        bytes_per_slot: bytes of one slot over all its tensors (default: measured).

    Attributes:
        maps: BalancerMaps on the experts' device.
        counts: [L, P] int32 device buffer that ``map_and_count`` adds this step's counts to.
        layout: host ExpertLayout in force (per layer, the last committed one).
        stats: BalancerStats.
    """

    def __init__(
        self,
        config: EplbConfig,
        layout: ExpertLayout,
        expert_tensors: list[list[torch.Tensor]],
        group: object | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        bytes_per_slot: int | None = None,
    ) -> None:
        raise NotImplementedError("Balancer is being implemented (issue 5)")

    def step(self) -> StepReport | None:
        """Call once per engine step, after the forward pass, on every EP rank.

        Records this step's counts (no host sync), and when due: snapshots and all-reduces
        the load, starts the plan in the background, collects it ``plan_delay`` steps later,
        then moves and commits one chunk of ``layers_per_step`` layers per step.

        Returns:
            A StepReport when something happened, else None.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Stop the background planner and release staging memory; idempotent."""
        raise NotImplementedError


__all__ = ["Balancer", "BalancerMaps", "BalancerStats", "StepReport"]
