"""``Balancer``: the controller a serving engine calls once per step.

    balancer = Balancer(config, layout, expert_tensors, group=ep_group)
    # in the router, per MoE layer (eplb_plugin.routing.Router over balancer.maps):
    phys = balancer.route(topk_ids, layer, num_valid)
    report = balancer.step()       # once per engine step, after the forward, on every rank
    balancer.stats, balancer.layout
    balancer.close()

Timeline, identical on every rank (each rank counts its own ``step()`` calls, so decisions
need no messages):

- every ``interval`` steps, the plan is *due*: the window's load is summed over ranks (the
  only per-plan all-reduce) and the policy starts in a background thread (on rank 0 for
  ``plan_on="rank0"``, on every rank for ``"all"``);
- ``plan_delay`` steps later it is *collected*: rank 0 broadcasts the new layout (or every
  rank takes its own deterministic result); if the predicted balancedness gain is below
  ``min_gain``, nothing moves;
- the move is *prepared* off the critical path (transfer plan, chunks, staging arena): for
  ``plan_on="all"`` together with the plan, for ``"rank0"`` on every rank after the
  broadcast, moving from ``plan_delay`` steps later;
- from then on, one chunk of ``layers_per_step`` layers per step is staged, voted and
  committed (``eplb_plugin.executor``); the maps of a chunk's layers switch in place, right
  after every rank staged it. A failed chunk leaves every rank on the old layout for its
  layers and abandons the rest of that rebalance; a communication failure or timeout also
  stops rebalancing for good (the process group is in an unknown state) while serving
  continues on the layout in force.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .comm import Communicator, make_communicator
from .comm.base import CommError, LocalCommunicator
from .config import EplbConfig
from .executor import ChunkResult, Executor, FaultHook, InconsistentWeightsError
from .layout import ExpertLayout, balancedness_of
from .maps import ExpertMaps
from .policies import dispatch_option
from .policies import plan as plan_layout
from .recorder import LoadRecorder
from .routing import Router
from .transfer import TransferPlan, align_slots, plan_transfer

log = logging.getLogger("eplb_plugin.runtime")


@dataclass
class StepReport:
    """What one ``Balancer.step()`` did (None is returned when it did nothing).

    Attributes:
        step: engine step index (number of ``step()`` calls so far, starting at 1).
        event: ``"planned"`` (load snapshot taken, plan started), ``"skipped"`` (plan
            collected, predicted gain below ``min_gain`` or nothing to move),
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
            ``num_gpus`` must equal the world size, and ``num_slots - num_experts`` must equal
            ``config.num_redundant_experts``.
        expert_tensors: ``expert_tensors[layer]`` = this rank's tensors of that MoE layer
            whose dim 0 is the rank's local slots (``slots_per_gpu``): weights, fp8 scales,
            biases. Moved in place.
        group: torch.distributed process group of the EP ranks (default: the world group
            when torch.distributed is initialized, else a single process).
        rank, world_size: expected rank and size; a ValueError if the group disagrees.
        bytes_per_slot: bytes of one slot over all its tensors (default: measured).
        communicator: a ready Communicator (overrides ``group`` and ``config.communicator``).
        fault: test hook passed to the Executor (see ``Executor``).

    Attributes:
        maps: ExpertMaps on the experts' device (written in place on every commit).
        counts: [L, P] int32 device buffer that ``map_and_count`` adds this step's counts to.
        layout: host ExpertLayout in force (per layer, the last committed one).
        stats: BalancerStats.
        recorder: the LoadRecorder.
        comm: the Communicator.
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
        *,
        communicator: Communicator | None = None,
        fault: FaultHook | None = None,
    ) -> None:
        if not isinstance(config, EplbConfig):
            raise ValueError(f"config must be an EplbConfig, got {type(config).__name__}")
        if not isinstance(layout, ExpertLayout):
            raise ValueError(f"layout must be an ExpertLayout, got {type(layout).__name__}")
        layout.validate()
        topology = layout.topology
        redundant = layout.num_slots - layout.num_experts
        if redundant != config.num_redundant_experts:
            raise ValueError(
                f"config.num_redundant_experts={config.num_redundant_experts} but the layout "
                f"has {layout.num_slots} slots for {layout.num_experts} experts ({redundant})"
            )
        if (config.num_nodes, config.num_groups) != (topology.num_nodes, topology.num_groups):
            raise ValueError(
                f"config has num_nodes={config.num_nodes}, num_groups={config.num_groups} but "
                f"the layout's topology has {topology.num_nodes}, {topology.num_groups}"
            )
        if len(expert_tensors) != layout.num_layers:
            raise ValueError(
                f"expert_tensors has {len(expert_tensors)} layers, the layout {layout.num_layers}"
            )
        self.config = config
        self.comm = communicator or make_communicator(config.communicator, group, config.timeout_s)
        for name, want, got in (
            ("rank", rank, self.comm.rank),
            ("world_size", world_size, self.comm.world_size),
        ):
            if want is not None and want != got:
                raise ValueError(f"{name}={want} but the process group says {got}")
        if self.comm.world_size != topology.num_gpus:
            raise ValueError(
                f"the layout's topology has num_gpus={topology.num_gpus} but there are "
                f"{self.comm.world_size} EP ranks"
            )
        self.topology = topology
        self.rank = self.comm.rank
        self.device = expert_tensors[0][0].device if expert_tensors[0] else torch.device("cpu")
        self.executor = Executor(
            expert_tensors,
            topology,
            self.comm,
            staging_bytes=config.staging_bytes,
            bytes_per_slot=bytes_per_slot,
            fault=fault,
        )
        self.bytes_per_slot = self.executor.bytes_per_slot
        self.layout = layout
        L, P, E = layout.num_layers, layout.num_slots, layout.num_experts
        self.maps = ExpertMaps.of(layout, self.device)
        self.router = Router(config.dispatch, self.comm)
        self.recorder = LoadRecorder(
            L, P, E, config.window, layout.phy2log,
            device=self.device, predictor=config.predictor, ema_decay=config.ema_decay,
            comm=self.comm,
        )  # fmt: skip
        self.counts = self.recorder.counts
        self.stats = BalancerStats()
        self.steps = 0
        self._due = config.interval
        self._collect_at: int | None = None
        self._future: Future | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._plan: TransferPlan | None = None
        self._target: ExpertLayout | None = None
        self._chunks: list[list[int]] = []
        self._prepared: Future | None = None  # -> (TransferPlan, chunks, arena)
        self._move_at: int | None = None
        self.disabled_reason: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ routing helper
    def route(
        self,
        topk_ids: torch.Tensor,
        layer: int,
        num_valid: torch.Tensor | int | None = None,
        *,
        seed: torch.Tensor | int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logical ``topk_ids`` [N, K] -> physical slots [N, K], counting into ``counts``.

        The :class:`~eplb_plugin.routing.Router` of ``config.dispatch`` over this balancer's
        maps; ``global`` dispatch all-reduces the layer's per-expert counts over the ranks
        (one small collective per layer: every rank must route every layer).
        """
        return self.router(
            topk_ids, self.maps, self.counts, layer, num_valid, seed=seed, out=out
        )

    # ------------------------------------------------------------------ the step
    def step(self) -> StepReport | None:
        """Call once per engine step, after the forward pass, on every EP rank.

        Records this step's counts (no host sync), and when due: snapshots and all-reduces
        the load, starts the plan in the background, collects it ``plan_delay`` steps later,
        then moves and commits one chunk of ``layers_per_step`` layers per step.

        Returns:
            A StepReport when something happened, else None.
        """
        if self._closed or not self.config.enable:
            return None
        start = time.perf_counter()
        self.steps += 1
        self.recorder.record()
        if self.disabled_reason is not None:
            return None
        try:
            report = self._advance()
        except InconsistentWeightsError:
            raise  # serving on would give wrong tokens
        except CommError as exc:
            report = self._disable(f"rank {self.rank}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a balancer bug must not take serving down
            log.exception("rank %d: balancer step %d failed", self.rank, self.steps)
            report = self._disable(f"rank {self.rank}: {type(exc).__name__}: {exc}")
        if report is not None:
            report.pause_s = time.perf_counter() - start
            self.stats.longest_pause_s = max(self.stats.longest_pause_s, report.pause_s)
        return report

    def request_rebalance(self) -> None:
        """Make the plan due at the next step (call on every rank in the same step)."""
        if not self._busy():
            self._due = self.steps + 1

    def _busy(self) -> bool:
        return bool(self._chunks) or self._collect_at is not None or self._move_at is not None

    def _advance(self) -> StepReport | None:
        while self._busy() and self.steps >= self._due:  # due mid-rebalance: skipped
            self._due += self.config.interval
        if self._chunks:
            return self._run_chunk()
        if self._move_at is not None and self.steps >= self._move_at:
            return self._start_moving()
        if self._collect_at is not None and self.steps >= self._collect_at:
            return self._collect()
        if self._collect_at is None and self.steps >= self._due:
            report = self._start_plan()
            if self.config.plan_delay == 0:
                return self._collect(report)
            return report
        return None

    # ------------------------------------------------------------------ planning
    def _start_plan(self) -> StepReport:
        self._due = self.steps + self.config.interval
        load = self.recorder.logical_load(reduce=True)
        self._collect_at = self.steps + self.config.plan_delay
        if self.config.plan_on == "all" or self.rank == 0:
            if self.config.plan_delay == 0:
                self._future = Future()
                self._future.set_result(self._compute_plan(load, self.layout))
            else:
                self._future = self._background(self._compute_plan, load, self.layout)
        return StepReport(step=self.steps, event="planned")

    def _compute_plan(self, load: torch.Tensor, current: ExpertLayout) -> tuple:
        """Background: (new layout or None, predicted balancedness now, with the new layout,
        prepared move or None). With ``plan_on="all"`` the move is prepared here too."""
        if float(load.sum()) <= 0:
            return None, 1.0, 1.0, None
        # the default policy places replicas for the dispatch mode that will serve them
        options = {
            **dispatch_option(self.config.policy, self.config.dispatch),
            **self.config.policy_options,
        }
        new = plan_layout(
            load.to(torch.float32), self.topology, policy=self.config.policy, previous=current,
            **options,
        )  # fmt: skip
        new = align_slots(current, new)  # experts staying on a GPU keep their slot
        before, after = self.predict(current, load), self.predict(new, load)
        prepared = None
        if self.config.plan_on == "all" and self._worth_it(new, current, before, after):
            prepared = self._prepare(current.phy2log, new)
        return new, before, after, prepared

    def _worth_it(self, new: ExpertLayout, current: ExpertLayout, before: float, after: float):
        differs = not (
            torch.equal(new.phy2log, current.phy2log)
            and torch.equal(new.replica_share, current.replica_share)
        )
        return differs and after - before >= self.config.min_gain

    def _prepare(self, phy2log: torch.Tensor, target: ExpertLayout) -> tuple:
        """Background: transfer plan, chunks and a pre-faulted staging arena for the move."""
        plan = plan_transfer(phy2log, target, self.topology, self.bytes_per_slot)
        chunks = self.executor.chunks(plan, self.config.layers_per_step)
        return plan, chunks, self.executor.new_arena(plan, chunks, touch=True)

    def predict(self, layout: ExpertLayout, load: torch.Tensor) -> float:
        """Predicted balancedness of ``layout`` under ``load`` [L, E] and the dispatch mode."""
        if self.config.dispatch == "static":
            return layout.balancedness(load)
        from .dispatch import slot_loads

        per_slot = slot_loads(layout, load, self.config.dispatch)
        return balancedness_of(per_slot.view(layout.num_layers, self.topology.num_gpus, -1).sum(-1))

    def _collect(self, report: StepReport | None = None) -> StepReport:
        self._collect_at = None
        future, self._future = self._future, None
        L, P = self.layout.num_layers, self.layout.num_slots
        header = torch.zeros(3, dtype=torch.float64)  # act (1) / skip (0) / error (-1), b, a
        phy2log = torch.empty(L, P, dtype=torch.int64)
        share = torch.empty(L, P, dtype=torch.float32)
        prepared = None
        if future is not None:
            try:
                new, before, after, prepared = future.result()
                act = new is not None and self._worth_it(new, self.layout, before, after)
                header[0] = 1.0 if act else 0.0
                header[1], header[2] = before, after
                if new is not None:
                    phy2log.copy_(new.phy2log)
                    share.copy_(new.replica_share)
            except Exception as exc:  # noqa: BLE001 - a policy error must not stop serving
                log.error("rank %d: planning failed: %s: %s", self.rank, type(exc).__name__, exc)
                header[0] = -1.0
        if self.config.plan_on == "rank0":
            self.comm.broadcast(header, 0)
            if header[0] > 0:
                self.comm.broadcast(phy2log, 0)
                self.comm.broadcast(share, 0)
        elif self.comm.world_size > 1 and not self._ranks_agree(header, phy2log, share):
            # a policy that is not deterministic across ranks would give ranks different
            # maps: tokens sent to slots that hold other experts, or a move that hangs
            log.error(
                "rank %d: ranks planned different layouts (plan_on='all' needs a policy that "
                "is deterministic across ranks; use plan_on='rank0')", self.rank,
            )  # fmt: skip
            header[0] = -1.0
        report = report or StepReport(step=self.steps, event="planned")
        report.balancedness_before = float(header[1])
        report.balancedness_after = float(header[2])
        if header[0] < 0:
            report.event, report.error = "failed", "planning failed (see the log of the planner)"
            self.stats.failures += 1
            return report
        self.stats.balancedness.append((self.steps, float(header[1]), float(header[2])))
        if header[0] == 0:
            report.event = "skipped"
            self.stats.skipped += 1
            return report
        target = ExpertLayout.from_phy2log(
            phy2log, self.topology, self.layout.num_experts, replica_share=share
        )
        self._target = target
        moving = self.layout.phy2log != target.phy2log
        # layers whose slots stay put take their new shares now: no weights to wait for
        self._switch([layer for layer in range(L) if not bool(moving[layer].any())])
        if prepared is not None:  # plan_on="all": prepared with the plan, in the background
            self._prepared = Future()
            self._prepared.set_result(prepared)
            self._move_at = self.steps
        elif self.config.plan_delay == 0:
            self._prepared = Future()
            self._prepared.set_result(self._prepare(self.layout.phy2log, target))
            self._move_at = self.steps
        else:  # rank 0's plan just arrived: every rank prepares the move in the background
            self._prepared = self._background(self._prepare, self.layout.phy2log, target)
            self._move_at = self.steps + self.config.plan_delay
        report.event = "collected"
        if self._move_at == self.steps:
            return self._start_moving(report)
        return report

    def _ranks_agree(
        self, header: torch.Tensor, phy2log: torch.Tensor, share: torch.Tensor
    ) -> bool:
        """Whether every rank computed the same decision and layout (collective).

        Args:
            header: [3] float64 (act, balancedness before, after); phy2log: [L, P] int64;
            share: [L, P] float32. Unset when this rank's plan failed or is None.
        """
        act = float(header[0])
        weights = torch.arange(1, phy2log.numel() + 1, dtype=torch.float64)
        fingerprint = torch.tensor([act, float(header[1]), float(header[2]), 0.0, 0.0])
        if act > 0:
            fingerprint[3] = (phy2log.flatten().to(torch.float64) * weights).sum()
            fingerprint[4] = (share.flatten().to(torch.float64) * weights).sum()
        low, high = fingerprint.clone(), fingerprint.clone()
        self.comm.all_reduce(low, op="min")
        self.comm.all_reduce(high, op="max")
        return torch.equal(low, high)

    def _background(self, fn, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="eplb-plan")
        return self._pool.submit(fn, *args)

    def _start_moving(self, report: StepReport | None = None) -> StepReport:
        """Join the prepared move (blocks only if it is not ready) and run its first chunk."""
        prepared, self._prepared, self._move_at = self._prepared, None, None
        self._plan, self._chunks, arena = prepared.result()
        self.executor.adopt(arena)
        report = report or StepReport(step=self.steps, event="chunk")
        if not self._chunks:
            return self._finish_rebalance(report)
        chunk_report = self._run_chunk()
        chunk_report.balancedness_before = report.balancedness_before
        chunk_report.balancedness_after = report.balancedness_after
        return chunk_report

    # ------------------------------------------------------------------ moving
    def _run_chunk(self) -> StepReport:
        layers = self._chunks.pop(0)
        result: ChunkResult = self.executor.run_chunk(self._plan, layers)
        self.stats.bytes_moved += result.bytes_sent + result.bytes_received
        report = StepReport(
            step=self.steps, event="chunk", bytes_sent=result.bytes_sent,
            bytes_received=result.bytes_received,
        )  # fmt: skip
        if not result.ok:
            self._chunks = []
            self._plan = self._target = None
            self.executor.release()
            self.stats.failures += 1
            report.event, report.error = "failed", result.error
            if result.inconsistent:
                self.disabled_reason = result.error
                raise InconsistentWeightsError(result.error)
            if result.comm_broken:
                self._disable(result.error or "communication failed")
            return report
        self._switch(layers)
        self.stats.slots_moved += result.slots_changed
        report.layers = list(layers)
        if not self._chunks:
            return self._finish_rebalance(report)
        return report

    def _finish_rebalance(self, report: StepReport) -> StepReport:
        self.stats.rebalances += 1
        self._plan = self._target = None
        self.executor.release()
        report.event = "done"
        return report

    def _switch(self, layers: list[int]) -> None:
        """Put ``layers`` of the target layout in force: host layout, device maps, recorder."""
        if not layers or self._target is None:
            return
        index = torch.tensor(layers, dtype=torch.long)
        phy2log = self.layout.phy2log.clone()
        share = self.layout.replica_share.clone()
        phy2log[index] = self._target.phy2log[index]
        share[index] = self._target.replica_share[index]
        self.layout = ExpertLayout.from_phy2log(
            phy2log, self.topology, self.layout.num_experts, replica_share=share
        )
        self.maps.write(self.layout, layers)
        self.recorder.set_layout(self.layout.phy2log)

    def _disable(self, reason: str) -> StepReport:
        self.disabled_reason = reason
        self._chunks = []
        self._prepared = self._move_at = self._collect_at = None
        self.executor.release()
        log.error("%s; rebalancing is disabled, serving continues on the layout in force", reason)
        return StepReport(step=self.steps, event="failed", error=reason)

    # ------------------------------------------------------------------ files, teardown
    def dump_load(self, path: str) -> torch.Tensor:
        """Write the recorded window as a load trace (collective; rank 0 writes)."""
        return self.recorder.dump(path)

    def load_trace(self, path: str) -> int:
        """Append a load trace to the window (call on every rank)."""
        return self.recorder.load(path)

    def close(self) -> None:
        """Stop the background planner and release the communicator; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if not isinstance(self.comm, LocalCommunicator):
            self.comm.close()


__all__ = ["Balancer", "BalancerStats", "StepReport"]
