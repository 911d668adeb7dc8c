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
  ``plan_on="rank0"``, on every rank for ``"all"``), on the window's runs after those of up
  to ``memory_windows - 1`` earlier plans' windows since the last shift
  (:mod:`eplb_plugin.plan_memory`);
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

import logging
import time
from concurrent.futures import Future

import torch

from .balancer_report import BalancerStats, StepReport
from .comm import Communicator, make_communicator
from .comm.base import CommError, LocalCommunicator
from .config import EplbConfig
from .executor import Executor, FaultHook, InconsistentWeightsError
from .gpu_load import SINCE_LOG, SINCE_REBALANCE, GpuLoadMeter
from .layout import ExpertLayout
from .maps import ExpertMaps
from .metrics import BalancerMetrics
from .mover import Mover, merge_layers
from .plan_decision import NOT_READY, SKIP, share_decision
from .plan_memory import PlanMemory
from .planner import MAX_PLANNERS as MAX_PLANNERS  # re-exported: tests bound threads by it
from .planner import Planner
from .record import LoadWindowWriter
from .recorder import PLAN_STEPS, LoadRecorder
from .routing import Router
from .shift import FOLLOW_UP_RUNS, ShiftDetector, run_steps_of
from .threads import background, run_now

log = logging.getLogger("eplb_plugin.runtime")


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
        self.router = Router(
            config.dispatch, self.comm, iters=config.waterfill_iters,
            gpus_per_node=topology.gpus_per_node,
        )  # fmt: skip
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
        # earlier plans' windows, back to the last shift (host tensors: no device memory)
        self.memory = PlanMemory(config.memory_windows if config.predictor == "window" else 1)
        self._planned_at = 0  # step of the last plan's load snapshot
        self._shift_at: int | None = None  # last step before the shift; plans start after it
        self._shift_run = 0  # steps of the run that showed the shift (0: regular plan)
        self._collect_at: int | None = None
        self.disabled_reason: str | None = None
        self._closed = False
        self.metrics = BalancerMetrics(self.rank, engine)
        # this rank's policy runs, and the weight move of the plan every rank accepted
        self._planner = Planner(config, topology, self.executor, self.metrics)
        self._mover = Mover(self.executor, self.comm, self.stats, self.metrics)
        self._gpu_load = GpuLoadMeter(L, topology.num_gpus, self.device, self.comm)
        self._rebalance_pause = 0.0  # longest step() of the rebalance in progress
        self._realized: float | None = None  # since the previous rebalance, taken when due

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
        self._gpu_load.add(self.counts)
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
        layers, slots, nbytes = self._mover.moved
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
        """``GpuLoadMeter.measure`` (collective), its balancedness kept in stats and metrics."""
        measured = self._gpu_load.measure(which)
        if measured is not None:
            self.stats.realized_balancedness = measured[0]
            self.metrics.balancedness(measured[0])
        return measured

    def _log_balancedness(self) -> None:
        """The periodic ``log_balancedness`` line (collective; rank 0 logs)."""
        measured = self._measure(SINCE_LOG)
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
        move = self._mover
        return bool(move.chunks) or self._collect_at is not None or move.start_at is not None

    def _advance(self) -> StepReport | None:
        while self._busy() and self.steps >= self._due:  # due mid-rebalance: skipped
            due, self._due = self._due, self._due + self.config.interval
            self._skip(None, "busy", f"due at step {due} while the previous rebalance was "
                       f"still in progress ({len(self._mover.chunks)} chunks left)")  # fmt: skip
        if self._mover.chunks:
            return self._run_chunk()
        if self._mover.start_at is not None and self.steps >= self._mover.start_at:
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
        self.memory.forget_before(self._shift_at)
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
        if steps is None:
            weight = self.recorder.logical_load(reduce=True)
        else:  # after the runs of earlier windows since the last shift
            count = last or self.recorder.filled
            weight, forecast = self.memory.extend(steps, self.steps - count, count)
            if self.shift.enabled:
                self.shift.calibrate(forecast, run_steps_of(count, PLAN_STEPS), steps)
        measured = self._measure(SINCE_REBALANCE)
        self._realized = None if measured is None else measured[0]
        self._collect_at = self.steps + self.config.plan_delay
        if self.config.plan_on == "all" or self.rank == 0:
            self._planner.start(weight, self.layout)
        return StepReport(step=self.steps, event="planned")

    def predict(self, layout: ExpertLayout, load: torch.Tensor) -> float:
        """Predicted balancedness of ``layout`` under ``load`` [L, E] and the dispatch mode."""
        return self._planner.predict(layout, load)

    def _collect(self, report: StepReport | None = None) -> StepReport:
        self._collect_at = None
        header, phy2log, share, prepared = self._planner.collect(self.layout)
        code = share_decision(self.comm, self.config.plan_on, header, phy2log, share)
        report = report or StepReport(step=self.steps, event="planned")
        report.balancedness_before = float(header[1])
        report.balancedness_after = float(header[2])
        if code == NOT_READY:
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
        if code == SKIP:
            if after - before < self.config.min_gain:
                why = f"predicted balancedness {before:.4f} -> {after:.4f}, gain below "
                return self._skip(report, "no gain", why + f"min_gain {self.config.min_gain:g}")
            return self._skip(report, "unchanged", "the policy kept the layout in force")
        target = ExpertLayout.from_phy2log(
            phy2log, self.topology, self.layout.num_experts, replica_share=share
        )
        moving = self.layout.phy2log != target.phy2log
        # layers whose slots stay put take their new shares now: no weights to wait for
        unmoved = [layer for layer in range(target.num_layers) if not bool(moving[layer].any())]
        self._switch(target, unmoved)
        if prepared is not None:  # plan_on="all": prepared with the plan, in the background
            future: Future = Future()
            future.set_result(prepared)
        elif self.config.plan_delay == 0:
            future = run_now(self._planner.prepare, self.layout.phy2log, target)
        else:  # rank 0's plan just arrived: every rank prepares the move in the background
            future = background("eplb-prepare", self._planner.prepare, self.layout.phy2log, target)
        # a move prepared with the plan starts now, else plan_delay steps later
        start_at = self.steps if prepared is not None else self.steps + self.config.plan_delay
        self._mover.begin(target, future, start_at)
        report.event = "collected"
        if self._mover.start_at == self.steps:
            return self._start_moving(report)
        return report

    # ------------------------------------------------------------------ moving
    def _start_moving(self, report: StepReport | None = None) -> StepReport:
        """Join the prepared move (every rank votes it is ready) and run its first chunk."""
        report = report or StepReport(step=self.steps, event="chunk")
        if not self._mover.join():
            report.event = "failed"
            report.error = "preparing the move failed on a rank; keeping the old layout"
            if self.rank == 0:
                log.warning("EPLB %s; next plan at step %d", report.error, self._due)
            return report
        if not self._mover.chunks:
            return self._finish_rebalance(report)
        chunk_report = self._run_chunk()
        chunk_report.balancedness_before = report.balancedness_before
        chunk_report.balancedness_after = report.balancedness_after
        return chunk_report

    def _run_chunk(self) -> StepReport:
        target = self._mover.target
        layers, result = self._mover.run_chunk()
        report = StepReport(
            step=self.steps, event="chunk", bytes_sent=result.bytes_sent,
            bytes_received=result.bytes_received,
        )  # fmt: skip
        if not result.ok:
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
        self._switch(target, layers)
        report.layers = list(layers)
        if not self._mover.chunks:
            return self._finish_rebalance(report)
        return report

    def _finish_rebalance(self, report: StepReport) -> StepReport:
        self._mover.finish()
        self._gpu_load.restart(SINCE_REBALANCE)  # realized balance restarts with the layout
        report.event = "done"
        return report

    def _switch(self, target: ExpertLayout | None, layers: list[int]) -> None:
        """Put ``layers`` of ``target`` in force: host layout, device maps, recorder."""
        if not layers or target is None:
            return
        self.layout = merge_layers(self.layout, target, layers)
        self.maps.write(self.layout, layers)
        self.recorder.set_layout(self.layout.phy2log)

    def _disable(self, reason: str, kind: str | None) -> StepReport:
        """Stop rebalancing for good; ``kind`` labels the failure (None: already counted)."""
        if kind is not None:
            self.stats.failures += 1
            self.metrics.failure(kind)
        self.disabled_reason = reason
        self._collect_at = None
        self._mover.abandon()
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
        self._planner.forget()
        self._mover.prepared = None
        if not isinstance(self.comm, LocalCommunicator):
            self.comm.close()


__all__ = ["Balancer", "BalancerStats", "StepReport"]
