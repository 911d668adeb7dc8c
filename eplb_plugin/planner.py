"""This rank's plan, made off the critical path: the policy run in a background thread on
the window's load, the predicted balancedness of a layout, whether a plan is worth moving,
and the move's preparation (transfer plan, chunks, staging arena)."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from concurrent.futures import Future

import torch

from .config import EplbConfig
from .executor import Executor
from .layout import ExpertLayout, Topology, balancedness_of
from .metrics import BalancerMetrics
from .plan_decision import ACT, FAILED, NOT_READY, SKIP
from .policies import dispatch_option
from .policies import plan as plan_layout
from .threads import background, run_now
from .transfer import align_slots, plan_transfer

log = logging.getLogger("eplb_plugin.runtime")

# Policy threads that may run at once on a rank (see Planner.start).
MAX_PLANNERS = 2


class Planner:
    """Runs the policy for this rank off the critical path and judges what it returns.

    Args:
        config: the EplbConfig.
        topology: the Topology of the layouts planned.
        executor: the Executor a move is prepared for (its chunks and staging arena).
        metrics: the balancer's BalancerMetrics (policy time).

    Attributes:
        future: the plan started last, until collected: Future of (new layout or None,
            predicted balancedness now, with the new layout, prepared move or None).
        busy: the last plan did not start: ``MAX_PLANNERS`` policy threads still run.
    """

    def __init__(
        self,
        config: EplbConfig,
        topology: Topology,
        executor: Executor,
        metrics: BalancerMetrics,
    ) -> None:
        self.config = config
        self.topology = topology
        self.executor = executor
        self.metrics = metrics
        self.rank = executor.rank
        self.future: Future | None = None
        # policy threads still running, collected or abandoned. A thread cannot be killed:
        # a policy that never returns keeps its thread, so at most MAX_PLANNERS run at once
        # (one abandoned beside a new one); beyond that no plan starts ("not ready").
        self._threads: list[Future] = []
        self.busy = False

    def start(self, weight: torch.Tensor, current: ExpertLayout) -> None:
        """Start :meth:`compute` on ``weight`` ([L, E] or [S, L, E] float) for ``current``:
        in a thread, or here with ``plan_delay=0``."""
        self.busy = False
        if self.config.plan_delay == 0:
            self.future = run_now(self.compute, weight, current)
            return
        self._threads = [f for f in self._threads if not f.done()]
        if len(self._threads) >= MAX_PLANNERS:
            self.busy = True  # abandoned plans still running: no more threads
        else:
            self.future = background("eplb-plan", self.compute, weight, current)
            self._threads.append(self.future)

    def collect(
        self, current: ExpertLayout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
        """This rank's decision on the plan started last, waiting at most ``plan_wait_s``.

        Args:
            current: the layout in force.

        Returns:
            ``header`` [3] float64 (decision code of :mod:`~eplb_plugin.plan_decision`,
            predicted balancedness before, after; all 0, i.e. ``SKIP``, when this rank
            started no plan), the new layout's ``phy2log`` [L, P] int64 and ``share``
            [L, P] float32 (unset unless the policy returned one), and the move prepared
            with the plan (``plan_on="all"``) or None.
        """
        future, self.future = self.future, None
        L, P = current.num_layers, current.num_slots
        header = torch.zeros(3, dtype=torch.float64)
        phy2log = torch.empty(L, P, dtype=torch.int64)
        share = torch.empty(L, P, dtype=torch.float32)
        prepared = None
        if self.busy:
            header[0] = NOT_READY
        elif future is not None:
            # never block serving on the policy: wait at most plan_wait_s, else abandon it
            if not future.done() and self.config.plan_wait_s > 0:
                concurrent.futures.wait([future], timeout=self.config.plan_wait_s)
            if not future.done():
                header[0] = NOT_READY
            else:
                try:
                    new, before, after, prepared = future.result()
                    act = new is not None and self.worth_it(new, current, before, after)
                    header[0] = ACT if act else SKIP
                    header[1], header[2] = before, after
                    if new is not None:
                        phy2log.copy_(new.phy2log)
                        share.copy_(new.replica_share)
                except Exception as exc:  # noqa: BLE001 - a policy error must not stop serving
                    log.error(
                        "rank %d: planning failed: %s: %s", self.rank, type(exc).__name__, exc
                    )
                    header[0] = FAILED
        return header, phy2log, share, prepared

    def forget(self) -> None:
        """Drop the plan and the policy threads (daemons: they block neither this nor exit)."""
        self.future = None
        self._threads = []

    def compute(self, weight: torch.Tensor, current: ExpertLayout) -> tuple:
        """Background: (new layout or None, predicted balancedness now, with the new layout,
        prepared move or None). With ``plan_on="all"`` the move is prepared here too.

        ``weight``: [L, E] the predicted load, or [S, L, E] its per-step runs (the load is
        their sum), which the policy then plans on."""
        load = weight.sum(0) if weight.dim() == 3 else weight
        if float(load.sum()) <= 0:
            return None, 1.0, 1.0, None
        start = time.perf_counter()
        # the default policy places replicas for the dispatch mode that will serve them
        options = {
            **dispatch_option(self.config.policy, self.config.dispatch),
            **self.config.policy_options,
        }
        new = plan_layout(
            weight.to(torch.float32), self.topology, policy=self.config.policy, previous=current,
            **options,
        )  # fmt: skip
        self.metrics.plan_time(time.perf_counter() - start)
        new = align_slots(current, new)  # experts staying on a GPU keep their slot
        before, after = self.predict(current, load), self.predict(new, load)
        prepared = None
        if self.config.plan_on == "all" and self.worth_it(new, current, before, after):
            prepared = self.prepare(current.phy2log, new)
        return new, before, after, prepared

    def worth_it(
        self, new: ExpertLayout, current: ExpertLayout, before: float, after: float
    ) -> bool:
        """Whether ``new`` changes ``current`` and gains at least ``min_gain`` balancedness."""
        differs = not (
            torch.equal(new.phy2log, current.phy2log)
            and torch.equal(new.replica_share, current.replica_share)
        )
        return differs and after - before >= self.config.min_gain

    def prepare(self, phy2log: torch.Tensor, target: ExpertLayout) -> tuple:
        """Background: transfer plan, chunks and a pre-faulted staging arena for the move
        from ``phy2log`` [L, P] int64 (the layout in force) to ``target``."""
        plan = plan_transfer(phy2log, target, self.topology, self.executor.bytes_per_slot)
        chunks = self.executor.chunks(plan, self.config.layers_per_step)
        return plan, chunks, self.executor.new_arena(plan, chunks, touch=True)

    def predict(self, layout: ExpertLayout, load: torch.Tensor) -> float:
        """Predicted balancedness of ``layout`` under ``load`` [L, E] and the dispatch mode."""
        if self.config.dispatch == "static":
            return layout.balancedness(load)
        from .dispatch import slot_loads

        per_slot = slot_loads(layout, load, self.config.dispatch, self.config.waterfill_iters)
        return balancedness_of(per_slot.view(layout.num_layers, self.topology.num_gpus, -1).sum(-1))
