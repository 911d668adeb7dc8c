"""The weight move of an accepted plan: its prepared transfer joined (every rank votes that
its preparation succeeded), then one chunk of layers per step staged, voted and committed by
the :class:`~eplb_plugin.executor.Executor`; and the host layout with a chunk's layers put
in force (:func:`merge_layers`)."""

from __future__ import annotations

import logging
from concurrent.futures import Future

import torch

from .balancer_report import BalancerStats
from .comm import Communicator
from .executor import ChunkResult, Executor
from .layout import ExpertLayout
from .metrics import BalancerMetrics
from .transfer import TransferPlan

log = logging.getLogger("eplb_plugin.runtime")


def merge_layers(layout: ExpertLayout, target: ExpertLayout, layers: list[int]) -> ExpertLayout:
    """``layout`` with the rows ``layers`` of ``target``'s phy2log [L, P] int64 and
    replica_share [L, P] float32 (the other layers unchanged)."""
    index = torch.tensor(layers, dtype=torch.long)
    phy2log = layout.phy2log.clone()
    share = layout.replica_share.clone()
    phy2log[index] = target.phy2log[index]
    share[index] = target.replica_share[index]
    return ExpertLayout.from_phy2log(
        phy2log, layout.topology, layout.num_experts, replica_share=share
    )


class Mover:
    """Moves this rank's weights to an accepted plan's layout, one chunk per call.

    It counts what it moves and what fails into the balancer's ``stats`` and ``metrics``;
    the balancer decides at which step each call happens and puts committed layers in force.

    Attributes:
        target: the layout being moved to (None when no move is in progress).
        prepared: Future of (TransferPlan, chunks, staging arena), until joined.
        start_at: step at which the move is joined and its first chunk runs.
        chunks: layers of each chunk still to run, in order.
        moved: (layers, slots, bytes) of the last joined plan, for the rebalance's log line.
    """

    def __init__(
        self,
        executor: Executor,
        comm: Communicator,
        stats: BalancerStats,
        metrics: BalancerMetrics,
    ) -> None:
        self.executor = executor
        self.comm = comm
        self.stats = stats
        self.metrics = metrics
        self.target: ExpertLayout | None = None
        self.prepared: Future | None = None
        self.start_at: int | None = None
        self.plan: TransferPlan | None = None
        self.chunks: list[list[int]] = []
        self.moved: tuple[int, int, int] = (0, 0, 0)

    def begin(self, target: ExpertLayout, prepared: Future, start_at: int) -> None:
        """Accept a move to ``target``, prepared by ``prepared``, joined at step ``start_at``."""
        self.target, self.prepared, self.start_at = target, prepared, start_at

    def join(self) -> bool:
        """Join the prepared move (blocks only if it is not ready); True when every rank may
        run its chunks.

        Every rank votes that its preparation succeeded (one all-reduce), so that a rank
        whose transfer plan or arena failed does not leave its peers waiting in a chunk. On
        False the move is dropped and counted as a failure.
        """
        prepared, self.prepared, self.start_at = self.prepared, None, None
        ok = True
        try:
            self.plan, self.chunks, arena = prepared.result()
        except Exception as exc:  # noqa: BLE001 - told to the peers by the vote below
            log.error("rank %d: preparing the move failed: %s: %s", self.comm.rank,
                      type(exc).__name__, exc)  # fmt: skip
            ok = False
        if self.comm.world_size > 1:
            ok = self.comm.agree(ok)
        if not ok:
            self.plan, self.target, self.chunks = None, None, []
            self.executor.release()
            self.stats.failures += 1
            self.metrics.failure("prepare")
            return False
        self.executor.adopt(arena)
        plan = self.plan
        self.moved = (len(plan.layers), int(plan.slots_changed.sum()), plan.total_bytes)
        return True

    def run_chunk(self) -> tuple[list[int], ChunkResult]:
        """Stage, vote and commit the next chunk (collective); its layers and result.

        A failed chunk leaves every rank on the old layout for its layers: the rest of the
        move is dropped and counted as a failure.
        """
        layers = self.chunks.pop(0)
        result = self.executor.run_chunk(self.plan, layers)
        self.stats.bytes_moved += result.bytes_sent + result.bytes_received
        self.metrics.moved(0, result.bytes_sent + result.bytes_received)
        if result.ok:
            self.stats.slots_moved += result.slots_changed
            self.metrics.moved(result.slots_changed, 0)
        else:
            self.chunks = []
            self.plan = self.target = None
            self.executor.release()
            self.stats.failures += 1
            self.metrics.failure("comm" if result.comm_broken else "chunk")
        return layers, result

    def finish(self) -> None:
        """Count the completed rebalance (every chunk committed) and free its arena."""
        self.stats.rebalances += 1
        self.metrics.rebalanced()
        self.plan = self.target = None
        self.executor.release()

    def abandon(self) -> None:
        """Drop the move in progress or prepared, without counting it (rebalancing stops)."""
        self.chunks = []
        self.prepared = self.start_at = None
        self.executor.release()
