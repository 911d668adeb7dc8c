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
- between plans, after every run of steps (the window's eighth), the run's load is summed
  over ranks and compared with the plan's forecast (:mod:`eplb_plugin.shift`): on a shift
  the plan is due at once, on the steps since the shift only, and again
  ``FOLLOW_UP_RUNS`` runs later;
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

import concurrent.futures
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .comm import Communicator, make_communicator
from .comm.base import CommError, LocalCommunicator
from .config import EplbConfig
from .executor import ChunkResult, Executor, FaultHook, InconsistentWeightsError
from .layout import ExpertLayout, balancedness_of
from .maps import ExpertMaps
from .metrics import BalancerMetrics
from .policies import dispatch_option
from .policies import plan as plan_layout
from .record import LoadWindowWriter
from .recorder import PLAN_STEPS, LoadRecorder
from .routing import Router
from .shift import FOLLOW_UP_RUNS, ShiftDetector, run_steps_of
from .transfer import TransferPlan, align_slots, plan_transfer

log = logging.getLogger("eplb_plugin.runtime")

# The plan decision every rank learns at the collect step (rank 0's broadcast header, or the
# minimum over the ranks for plan_on="all"): the smallest code wins.
_ACT, _SKIP, _FAILED, _NOT_READY = 1.0, 0.0, -1.0, -2.0
# Policy threads that may run at once on a rank (see Balancer._planners).
MAX_PLANNERS = 2


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
        engine: the ``engine`` label of this balancer's Prometheus metrics
            (:mod:`eplb_plugin.metrics`).

    Attributes:
        maps: ExpertMaps on the experts' device (written in place on every commit).
        counts: [L, P] int32 device buffer that ``map_and_count`` adds this step's counts to.
        layout: host ExpertLayout in force (per layer, the last committed one).
        stats: BalancerStats.
        recorder: the LoadRecorder.
        comm: the Communicator.
        metrics: its :class:`~eplb_plugin.metrics.BalancerMetrics`.
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
        engine: str = "unknown",
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
        self.router = Router(config.dispatch, self.comm, iters=config.waterfill_iters)
        self.recorder = LoadRecorder(
            L, P, E, config.window, layout.phy2log,
            device=self.device, predictor=config.predictor, ema_decay=config.ema_decay,
            comm=self.comm,
        )  # fmt: skip
        # record_dir: the window written periodically for `eplb export --load` (record.py)
        self.load_writer = LoadWindowWriter.from_config(config, self.recorder, self.comm)
        self.counts = self.recorder.counts
        self.stats = BalancerStats()
        self.steps = 0
        self._due = config.interval
        # a shift needs the window's runs to be seen: the ema predictor has none
        threshold = config.shift_threshold if config.predictor == "window" else 0.0
        self.shift = ShiftDetector(threshold)
        self._planned_at = 0  # step of the last plan's load snapshot
        self._shift_at: int | None = None  # last step before the shift; plans start after it
        self._shift_run = 0  # steps of the run that showed the shift (0: regular plan)
        self._collect_at: int | None = None
        self._future: Future | None = None
        # policy threads still running, collected or abandoned. A thread cannot be killed:
        # a policy that never returns keeps its thread, so at most MAX_PLANNERS run at once
        # (one abandoned beside a new one); beyond that no plan starts ("not ready").
        self._planners: list[Future] = []
        self._planner_busy = False
        self._plan: TransferPlan | None = None
        self._target: ExpertLayout | None = None
        self._chunks: list[list[int]] = []
        self._prepared: Future | None = None  # -> (TransferPlan, chunks, arena)
        self._move_at: int | None = None
        self.disabled_reason: str | None = None
        self._closed = False
        self.metrics = BalancerMetrics(self.rank, engine)
        # per-GPU load [L, G] of this rank's tokens, float64 on the experts' device: [0]
        # since the previous rebalance, [1] since the previous balancedness line
        self._gpu_load = torch.zeros(
            2, L, topology.num_gpus, dtype=torch.float64, device=self.device
        )
        self._rebalance_pause = 0.0  # longest step() of the rebalance in progress
        self._realized: float | None = None  # since the previous rebalance, taken when due
        self._moved: tuple[int, int, int] = (0, 0, 0)  # layers, slots, bytes of its plan

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
        return self.router(topk_ids, self.maps, self.counts, layer, num_valid, seed=seed, out=out)

    # ------------------------------------------------------------------ the step
    def step(self) -> StepReport | None:
        """Call once per engine step, after the forward pass, on every EP rank.

        Records this step's counts (no host sync), and when due: snapshots and all-reduces
        the load, starts the plan in the background, collects it ``plan_delay`` steps later
        (waiting at most ``plan_wait_s`` for it), then moves and commits one chunk of
        ``layers_per_step`` layers per step.

        Returns:
            A StepReport when something happened, else None.
        """
        if self._closed or not self.config.enable:
            return None
        start = time.perf_counter()
        self.steps += 1
        G = self.topology.num_gpus
        self._gpu_load += self.counts.view(self.layout.num_layers, G, -1).sum(-1)
        self.recorder.record()
        if self.disabled_reason is not None:
            return None
        try:
            if self.load_writer is not None:
                self.load_writer.maybe_write(self.steps)
            report = self._advance()
            if (
                self.config.log_balancedness
                and self.steps % self.config.log_balancedness_interval == 0
            ):
                self._log_balancedness()
        except InconsistentWeightsError:
            raise  # serving on would give wrong tokens
        except CommError as exc:
            report = self._disable(f"rank {self.rank}: {exc}", "comm")
        except Exception as exc:  # noqa: BLE001 - a balancer bug must not take serving down
            log.exception("rank %d: balancer step %d failed", self.rank, self.steps)
            report = self._disable(f"rank {self.rank}: {type(exc).__name__}: {exc}", "error")
        if report is not None:
            report.pause_s = time.perf_counter() - start
            self.stats.longest_pause_s = max(self.stats.longest_pause_s, report.pause_s)
            self.metrics.pause(report.pause_s)
            if report.event in ("collected", "chunk", "done", "failed"):
                self._rebalance_pause = max(self._rebalance_pause, report.pause_s)
            if report.event == "done":
                self._log_rebalance(report)
            if report.event in ("done", "failed", "skipped"):
                self._rebalance_pause = 0.0
        return report

    def _log_rebalance(self, report: StepReport) -> None:
        """The one INFO line of a completed rebalance (rank 0; figures over every rank)."""
        if self.rank != 0:
            return
        layers, slots, nbytes = self._moved
        before = after = float("nan")
        if self.stats.balancedness:
            _, before, after = self.stats.balancedness[-1]
        realized = self._realized
        log.info(
            "EPLB rebalance done at step %d: %d layers, %d slots moved, %.1f MiB between "
            "ranks, longest pause %.1f ms; window balancedness %.4f -> %.4f planned, "
            "realized %s since the previous rebalance",
            report.step, layers, slots, nbytes / 2**20, 1e3 * self._rebalance_pause, before,
            after, "n/a" if realized is None else f"{realized:.4f}",
        )  # fmt: skip

    def _measure(self, which: int) -> tuple[float, float, float] | None:
        """All-reduce (collective) and reset the per-GPU load accumulator ``which``.

        Returns (balancedness, avg tokens, max tokens) over it, or None if it holds no load:
        balancedness is mean/max per layer averaged over layers; the token figures are the
        sums over layers of the mean and the max per-GPU load (vLLM's log line).
        """
        loads = self._gpu_load[which].clone()
        self._gpu_load[which].zero_()
        self.comm.all_reduce(loads, op="sum")
        loads = loads.cpu()
        if float(loads.sum()) <= 0:
            return None
        value = balancedness_of(loads)
        self.stats.realized_balancedness = value
        self.metrics.balancedness(value)
        return value, float(loads.mean(-1).sum()), float(loads.amax(-1).sum())

    def _log_balancedness(self) -> None:
        """The periodic ``log_balancedness`` line (collective; rank 0 logs)."""
        measured = self._measure(1)
        if self.rank == 0 and measured is not None:
            value, avg, peak = measured
            log.info(
                "EPLB step %d: avg_tokens=%.2f, max_tokens=%d, balancedness=%.4f over the "
                "last %d steps; next plan at step %d",
                self.steps, avg, peak, value, self.config.log_balancedness_interval, self._due,
            )  # fmt: skip

    def _skip(self, report: StepReport | None, reason: str, why: str) -> StepReport | None:
        """Count and log (rank 0) a plan that is not acted on."""
        self.stats.skipped += 1
        self.stats.skip_reasons[reason] = self.stats.skip_reasons.get(reason, 0) + 1
        self.metrics.skipped(reason)
        if self.rank == 0:
            log.info("EPLB plan skipped (%s): %s; next plan at step %d", reason, why, self._due)
        if report is not None:
            report.event, report.reason = "skipped", reason
        return report

    def request_rebalance(self) -> None:
        """Make the plan due at the next step (call on every rank in the same step)."""
        if not self._busy():
            self._due = self.steps + 1

    def _busy(self) -> bool:
        return bool(self._chunks) or self._collect_at is not None or self._move_at is not None

    def _advance(self) -> StepReport | None:
        while self._busy() and self.steps >= self._due:  # due mid-rebalance: skipped
            due, self._due = self._due, self._due + self.config.interval
            self._skip(None, "busy", f"due at step {due} while the previous rebalance was "
                       f"still in progress ({len(self._chunks)} chunks left)")  # fmt: skip
        if self._chunks:
            return self._run_chunk()
        if self._move_at is not None and self.steps >= self._move_at:
            return self._start_moving()
        if self._collect_at is not None and self.steps >= self._collect_at:
            return self._collect()
        if self._collect_at is None and (self.steps >= self._due or self._shifted()):
            report = self._start_plan()
            if self.config.plan_delay == 0:
                return self._collect(report)
            return report
        return None

    # ------------------------------------------------------------------ planning
    def _shifted(self) -> bool:
        """Whether the newest run of steps shows a load shift (collective: every rank checks
        at the same steps, on the same all-reduced run, and so decides alike)."""
        run = self.shift.run_steps
        since = self.steps - self._planned_at
        if not self.shift.ready or self._busy() or since <= 0 or since % run:
            return False
        observed = self.recorder.newest_load(run, reduce=True)
        if not self.shift.shifted(observed):
            return False
        self._shift_at, self._shift_run = self.steps - run, run
        self.stats.shifts += 1
        self.metrics.shift()
        if self.rank == 0:
            log.info(
                "EPLB load shift at step %d: the last %d steps depart from the planned load "
                "%.1fx as far as a run of it would (threshold %g); re-planning on them",
                self.steps, run, self.shift.deviation_ratio(observed), self.shift.threshold,
            )  # fmt: skip
        return True

    def _start_plan(self) -> StepReport:
        shift_run, self._shift_run = self._shift_run, 0
        # after a shift, plans see only the steps since it, until the window holds no older
        last = None if self._shift_at is None else self.steps - self._shift_at
        if last is not None and last >= self.recorder.filled:
            self._shift_at = last = None
        self._due = self.steps + (FOLLOW_UP_RUNS * shift_run or self.config.interval)
        self._planned_at = self.steps
        # the window predictor's per-step runs let the policy weigh steps (recency, spread)
        steps = self.recorder.plan_steps(reduce=True, last=last)
        weight = self.recorder.logical_load(reduce=True) if steps is None else steps
        if steps is not None and self.shift.enabled:
            self.shift.calibrate(steps, run_steps_of(last or self.recorder.filled, PLAN_STEPS))
        measured = self._measure(0)  # realized balancedness since the previous rebalance
        self._realized = None if measured is None else measured[0]
        self._collect_at = self.steps + self.config.plan_delay
        self._planner_busy = False
        if self.config.plan_on == "all" or self.rank == 0:
            if self.config.plan_delay == 0:
                self._future = _run_now(self._compute_plan, weight, self.layout)
            else:
                self._planners = [f for f in self._planners if not f.done()]
                if len(self._planners) >= MAX_PLANNERS:
                    self._planner_busy = True  # abandoned plans still running: no more threads
                else:
                    self._future = _background("eplb-plan", self._compute_plan, weight, self.layout)
                    self._planners.append(self._future)
        return StepReport(step=self.steps, event="planned")

    def _compute_plan(self, weight: torch.Tensor, current: ExpertLayout) -> tuple:
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

        per_slot = slot_loads(layout, load, self.config.dispatch, self.config.waterfill_iters)
        return balancedness_of(per_slot.view(layout.num_layers, self.topology.num_gpus, -1).sum(-1))

    def _collect(self, report: StepReport | None = None) -> StepReport:
        self._collect_at = None
        future, self._future = self._future, None
        L, P = self.layout.num_layers, self.layout.num_slots
        header = torch.zeros(3, dtype=torch.float64)  # decision code, balancedness b, a
        phy2log = torch.empty(L, P, dtype=torch.int64)
        share = torch.empty(L, P, dtype=torch.float32)
        prepared = None
        if self._planner_busy:
            header[0] = _NOT_READY
        elif future is not None:
            # never block serving on the policy: wait at most plan_wait_s, else abandon it
            if not future.done() and self.config.plan_wait_s > 0:
                concurrent.futures.wait([future], timeout=self.config.plan_wait_s)
            if not future.done():
                header[0] = _NOT_READY
            else:
                try:
                    new, before, after, prepared = future.result()
                    act = new is not None and self._worth_it(new, self.layout, before, after)
                    header[0] = _ACT if act else _SKIP
                    header[1], header[2] = before, after
                    if new is not None:
                        phy2log.copy_(new.phy2log)
                        share.copy_(new.replica_share)
                except Exception as exc:  # noqa: BLE001 - a policy error must not stop serving
                    log.error(
                        "rank %d: planning failed: %s: %s", self.rank, type(exc).__name__, exc
                    )
                    header[0] = _FAILED
        if self.config.plan_on == "rank0":
            self.comm.broadcast(header, 0)
            if header[0] == _ACT:
                self.comm.broadcast(phy2log, 0)
                self.comm.broadcast(share, 0)
        elif self.comm.world_size > 1:
            header[0] = self._ranks_agree(header, phy2log, share)
        report = report or StepReport(step=self.steps, event="planned")
        report.balancedness_before = float(header[1])
        report.balancedness_after = float(header[2])
        code = float(header[0])
        if code == _NOT_READY:
            waited = f"{self.config.plan_delay} steps + {self.config.plan_wait_s:g} s"
            why = f"the policy had not finished after {waited} (or was still running from an "
            return self._skip(report, "not ready", why + "earlier interval); abandoned")
        if code < 0:
            report.event, report.error = "failed", "planning failed (see the log of the planner)"
            self.stats.failures += 1
            self.metrics.failure("plan")
            if self.rank == 0:
                log.warning("EPLB plan failed; next plan at step %d", self._due)
            return report
        before, after = float(header[1]), float(header[2])
        self.stats.balancedness.append((self.steps, before, after))
        if code == _SKIP:
            if after - before < self.config.min_gain:
                why = f"predicted balancedness {before:.4f} -> {after:.4f}, gain below "
                return self._skip(report, "no gain", why + f"min_gain {self.config.min_gain:g}")
            return self._skip(report, "unchanged", "the policy kept the layout in force")
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
            self._prepared = _run_now(self._prepare, self.layout.phy2log, target)
            self._move_at = self.steps
        else:  # rank 0's plan just arrived: every rank prepares the move in the background
            self._prepared = _background("eplb-prepare", self._prepare, self.layout.phy2log,
                                         target)  # fmt: skip
            self._move_at = self.steps + self.config.plan_delay
        report.event = "collected"
        if self._move_at == self.steps:
            return self._start_moving(report)
        return report

    def _ranks_agree(
        self, header: torch.Tensor, phy2log: torch.Tensor, share: torch.Tensor
    ) -> float:
        """The decision every rank takes for ``plan_on="all"`` (collective).

        The lowest code of any rank wins (not ready, then failed); otherwise every rank must
        have computed the same decision and layout, else the plan is dropped as failed.

        Args:
            header: [3] float64 (code, balancedness before, after); phy2log: [L, P] int64;
            share: [L, P] float32. Unset when this rank's plan failed, is None or not ready.
        """
        code = float(header[0])
        weights = torch.arange(1, phy2log.numel() + 1, dtype=torch.float64)
        fingerprint = torch.tensor([code, float(header[1]), float(header[2]), 0.0, 0.0])
        if code == _ACT:
            fingerprint[3] = (phy2log.flatten().to(torch.float64) * weights).sum()
            fingerprint[4] = (share.flatten().to(torch.float64) * weights).sum()
        low, high = fingerprint.clone(), fingerprint.clone()
        self.comm.all_reduce(low, op="min")
        self.comm.all_reduce(high, op="max")
        if float(low[0]) < 0:
            return float(low[0])
        if not torch.equal(low, high):
            # a policy that is not deterministic across ranks would give ranks different
            # maps: tokens sent to slots that hold other experts, or a move that hangs
            log.error(
                "rank %d: ranks planned different layouts (plan_on='all' needs a policy that "
                "is deterministic across ranks; use plan_on='rank0')", self.rank,
            )  # fmt: skip
            return _FAILED
        return code

    def _start_moving(self, report: StepReport | None = None) -> StepReport:
        """Join the prepared move (blocks only if it is not ready) and run its first chunk.

        Every rank votes that its preparation succeeded (one all-reduce), so that a rank
        whose transfer plan or arena failed does not leave its peers waiting in a chunk.
        """
        prepared, self._prepared, self._move_at = self._prepared, None, None
        report = report or StepReport(step=self.steps, event="chunk")
        ok = True
        try:
            self._plan, self._chunks, arena = prepared.result()
        except Exception as exc:  # noqa: BLE001 - told to the peers by the vote below
            log.error("rank %d: preparing the move failed: %s: %s", self.rank,
                      type(exc).__name__, exc)  # fmt: skip
            ok = False
        if self.comm.world_size > 1:
            ok = self.comm.agree(ok)
        if not ok:
            self._plan, self._target, self._chunks = None, None, []
            self.executor.release()
            self.stats.failures += 1
            self.metrics.failure("prepare")
            report.event = "failed"
            report.error = "preparing the move failed on a rank; keeping the old layout"
            if self.rank == 0:
                log.warning("EPLB %s; next plan at step %d", report.error, self._due)
            return report
        self.executor.adopt(arena)
        plan = self._plan
        self._moved = (len(plan.layers), int(plan.slots_changed.sum()), plan.total_bytes)
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
        self.metrics.moved(0, result.bytes_sent + result.bytes_received)
        if not result.ok:
            self._chunks = []
            self._plan = self._target = None
            self.executor.release()
            self.stats.failures += 1
            self.metrics.failure("comm" if result.comm_broken else "chunk")
            report.event, report.error = "failed", result.error
            if self.rank == 0 and not (result.inconsistent or result.comm_broken):
                log.warning(
                    "EPLB rebalance abandoned at step %d: layers %s failed (%s); every rank "
                    "keeps the old layout for them; next plan at step %d",
                    self.steps, layers, result.error, self._due,
                )  # fmt: skip
            if result.inconsistent:
                self.disabled_reason = result.error
                raise InconsistentWeightsError(result.error)
            if result.comm_broken:
                self._disable(result.error or "communication failed", None)
            return report
        self._switch(layers)
        self.stats.slots_moved += result.slots_changed
        self.metrics.moved(result.slots_changed, 0)
        report.layers = list(layers)
        if not self._chunks:
            return self._finish_rebalance(report)
        return report

    def _finish_rebalance(self, report: StepReport) -> StepReport:
        self.stats.rebalances += 1
        self.metrics.rebalanced()
        self._gpu_load[0].zero_()  # realized balancedness restarts with the new layout
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

    def _disable(self, reason: str, kind: str | None) -> StepReport:
        """Stop rebalancing for good; ``kind`` labels the failure (None: already counted)."""
        if kind is not None:
            self.stats.failures += 1
            self.metrics.failure(kind)
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

    def close(self) -> None:
        """Stop the background planner and release the communicator; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.load_writer is not None:
            self.load_writer.close()
        # a policy thread still running is a daemon: it neither blocks this nor the exit
        self._future = self._prepared = None
        self._planners = []
        if not isinstance(self.comm, LocalCommunicator):
            self.comm.close()


def _background(name: str, fn, *args) -> Future:
    """Run ``fn(*args)`` in a new daemon thread; its Future.

    Daemon threads, not a ThreadPoolExecutor: the pool's workers are joined when the
    interpreter exits, so a policy that never returns would hang the engine's shutdown.
    """
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever collects it
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _run_now(fn, *args) -> Future:
    """``fn(*args)`` run here, its result or exception in a done Future."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 - collected (and counted) like a background one
        future.set_exception(exc)
    return future


__all__ = ["Balancer", "BalancerStats", "StepReport"]
