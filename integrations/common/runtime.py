"""``EngineRuntime``: the Balancer of one engine process (one EP rank), wired to its MoE layers.

The engine adapter finds the MoE layers, their per-slot expert tensors, the initial
``phy2log`` and the EP group, and calls its hooks; this base does the rest the same way for
every engine: the slot-count rule, the topology, the Balancer, the routing
:class:`~eplb_plugin.routing.Router` behind the custom op (:mod:`.ops`), the dither seed (a
device scalar, so no step needs a host sync and captured graphs see new values), the step
with its reports and log lines, the summary and ``close``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from eplb_plugin.config import EplbConfig
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.routing import Router, dither_seed

from .ops import map_and_count_op, register_router, route_op, unregister_router

# Step reports kept for inspection (``summary()``); older ones are dropped.
REPORTS_KEPT = 256


def check_slots(num_experts: int, num_slots: int, ep_size: int) -> None:
    """The slot-count rule of every engine: ValueError unless there is a slot for every
    expert and the slots split evenly over the EP ranks.

    The number of experts need not divide by the EP size: the Balancer places slots, not
    experts. An engine whose loader splits the experts evenly over the ranks (vLLM) checks
    that on its own, as a fact of its loading.
    """
    if num_slots < num_experts:
        raise ValueError(f"num_slots={num_slots} is below num_experts={num_experts}")
    if ep_size < 1 or num_slots % ep_size:
        raise ValueError(
            f"EP size {ep_size} does not divide the {num_slots} physical slots ({num_experts} "
            f"experts + {num_slots - num_experts} redundant); every rank holds as many slots, "
            f"so EP size {ep_size} must divide the {num_slots} physical slots: choose "
            f"--eplb-num-redundant-experts so that experts + redundant is a multiple of {ep_size}"
        )


def require_enabled(config: object, who: str) -> None:
    """ValueError unless ``config`` is an EplbConfig with ``enable`` set."""
    if not isinstance(config, EplbConfig) or not config.enable:
        raise ValueError(f"{who} needs an EplbConfig with enable=True")


def engine_topology(
    config: EplbConfig,
    num_experts: int,
    num_slots: int,
    ep_size: int,
    num_groups: int | None = None,
    num_nodes: int | None = None,
) -> tuple[EplbConfig, Topology]:
    """(config with the groups and nodes in use, Topology) of an engine deployment.

    The model's expert groups and the engine's node count apply unless the user set
    ``--eplb-num-groups`` / ``--eplb-num-nodes``; a group count that does not divide the
    experts, or an engine node count that does not divide the EP ranks, falls back to 1.
    """
    check_slots(num_experts, num_slots, ep_size)
    groups = config.num_groups if config.num_groups != 1 else (num_groups or 1)
    if groups < 1 or num_experts % groups:
        groups = 1
    nodes = config.num_nodes
    if nodes == 1 and num_nodes:
        nodes = num_nodes if num_nodes >= 1 and ep_size % num_nodes == 0 else 1
    config = dataclasses.replace(config, num_groups=groups, num_nodes=nodes)
    return config, Topology(num_slots, groups, nodes, ep_size)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def log_report(logger: logging.Logger, rank: int, report: dict) -> None:
    """One log line per Balancer event worth telling (failures as errors)."""
    head = f"eplb-plugin: rank {rank} step {report.get('step')}:"
    event = report.get("event")
    before, after = report.get("balancedness_before"), report.get("balancedness_after")
    predicted = f"predicted balancedness {_fmt(before)} -> {_fmt(after)}"
    if event == "failed":
        logger.error("%s rebalance failed (layers %s), serving continues on the layout in "
                     "force: %s", head, report.get("layers"), report.get("error"))  # fmt: skip
    elif event == "skipped":
        logger.info("%s plan not acted on (%s)", head, predicted)
    elif event in ("chunk", "done"):
        moved = report.get("bytes_sent", 0) + report.get("bytes_received", 0)
        what = "rebalance done" if event == "done" else "rebalance chunk committed"
        extra = f", {predicted}" if before is not None else ""
        logger.info(
            "%s %s: layers %s, %d bytes over the network, pause %.3f s%s",
            head, what, report.get("layers"), moved, report.get("pause_s") or 0.0, extra,
        )  # fmt: skip
    elif event == "planned":
        logger.debug("%s load snapshot taken, planning", head)


class _Forward(logging.Handler):
    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def forward_runtime_logs(target: logging.Logger) -> None:
    """Show the Balancer's own lines (logger ``eplb_plugin.runtime``: one per rebalance,
    skips, ``log_balancedness``) through ``target``'s handlers (e.g. the engine's log); once."""
    runtime = logging.getLogger("eplb_plugin.runtime")
    if not any(isinstance(h, _Forward) for h in runtime.handlers):
        runtime.addHandler(_Forward(target))
        if runtime.level == logging.NOTSET:
            runtime.setLevel(logging.INFO)


def as_dict(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) else obj


class EngineRuntime:
    """The Balancer of one engine process, wired to its MoE layers.

    Args:
        config: the EplbConfig (``enable`` must be True).
        phy2log: [L, P] int64 layout the engine serves at start (one row per MoE layer).
        num_experts: E logical experts.
        expert_tensors: per MoE layer, this rank's tensors whose dim 0 is its local slots.
        ep_rank, ep_size: this rank and the EP size.
        num_groups: the model's expert groups; num_nodes: the engine's node count.
        rank_invariant: every EP rank routes the same tokens: the dither then must not
            depend on the rank, and global dispatch apportions each rank's tokens alone
            (``Router(rank_invariant=True)``).
        group: torch.distributed group of the EP ranks (None: the world).
        communicator: a ready Communicator (overrides ``group``).
        balancer_cls: the Balancer class (tests pass a fake).

    Attributes:
        config, topology, initial_layout, balancer, router, ep_rank, ep_size, slots_per_gpu,
        dispatch, device; seed: 0-dim int64 device scalar read by the op; steps: Balancer
        steps; reports: recent StepReports as dicts.
    """

    logger = logging.getLogger("eplb_plugin.engine")
    engine_name = "unknown"  # the `engine` label of the Balancer's Prometheus metrics

    def __init__(
        self,
        config: EplbConfig,
        phy2log: torch.Tensor,
        num_experts: int,
        expert_tensors: list[list[torch.Tensor]],
        ep_rank: int,
        ep_size: int,
        *,
        num_groups: int | None = None,
        num_nodes: int | None = None,
        rank_invariant: bool = False,
        group: object | None = None,
        communicator: object | None = None,
        balancer_cls: type | None = None,
    ) -> None:
        require_enabled(config, type(self).__name__)
        self.config, self.topology = engine_topology(
            config, num_experts, phy2log.shape[1], ep_size, num_groups, num_nodes
        )
        self.initial_layout = ExpertLayout.from_phy2log(phy2log, self.topology, num_experts)
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.slots_per_gpu = self.topology.slots_per_gpu
        self.dispatch = self.config.dispatch
        self.rank_invariant = rank_invariant
        extra: dict = {} if communicator is None else {"communicator": communicator}
        if balancer_cls is None:
            from eplb_plugin.balancer import Balancer as balancer_cls

            extra["engine"] = self.engine_name
        self.balancer = balancer_cls(
            self.config, self.initial_layout, expert_tensors, group=group, rank=ep_rank,
            world_size=ep_size, **extra,
        )  # fmt: skip
        self.comm = getattr(self.balancer, "comm", None)
        self.device = self.balancer.counts.device
        self.seed = torch.zeros((), dtype=torch.int64, device=self.device)
        self.router = Router(
            self.dispatch, self.comm, validate=False, rank_invariant=rank_invariant,
            iters=self.config.waterfill_iters, gpus_per_node=self.topology.gpus_per_node,
        )  # fmt: skip
        map_and_count_op()  # registered now, not while Dynamo traces the engine's code
        self.router_id = register_router(self.router)
        self.steps = 0
        self.reports: deque[dict] = deque(maxlen=REPORTS_KEPT)
        self._closed = False

    def set_seed(self, step: int) -> None:
        """Dither seed of the routing in forward ``step`` (device write, no sync)."""
        rank, ranks = (0, 1) if self.rank_invariant else (self.ep_rank, self.ep_size)
        self.seed.fill_(dither_seed(self.config.seed, step, rank, ranks))

    def route(
        self,
        topk_ids: torch.Tensor,
        maps: Any,
        counts: torch.Tensor,
        layer: int,
        num_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N, K] logical ids -> [N, K] physical slots through the custom op (one graph node)."""
        return route_op(self.router_id, topk_ids, maps, counts, layer, num_valid, self.seed)

    def step(self) -> dict | None:
        """One Balancer step; call on every EP rank in lockstep. Returns its report as a
        dict, or None when nothing happened."""
        if self._closed:
            return None
        self.steps += 1
        report = self.balancer.step()
        if report is None:
            return None
        report = dict(as_dict(report))
        self.reports.append(report)
        log_report(self.logger, self.ep_rank, report)
        return report

    def summary(self) -> dict:
        """Plain-data state of this rank's balancer (safe to send over RPC)."""
        return {
            "rank": self.ep_rank,
            "ep_size": self.ep_size,
            "num_experts": self.initial_layout.num_experts,
            "num_slots": self.topology.num_replicas,
            "topology": self.topology.to_dict(),
            "dispatch": self.dispatch,
            "steps": self.steps,
            "initial_phy2log": self.initial_layout.phy2log.tolist(),
            "phy2log": self.balancer.maps.phy2log.detach().cpu().tolist(),
            "stats": as_dict(self.balancer.stats),
            "reports": list(self.reports),
        }

    def log_attached(self, num_layers: int, extra: str = "") -> None:
        dispatch = self.dispatch
        if dispatch == "node":  # with one node it is global: say which one the operator got
            t = self.topology
            dispatch += f" ({t.num_nodes} node(s) of {t.gpus_per_node} EP ranks)"
        self.logger.info(
            "eplb-plugin: balancer attached on EP rank %d/%d: %d MoE layers, %d experts on %d "
            "physical slots (%d per rank), dispatch %s, policy %s%s",
            self.ep_rank, self.ep_size, num_layers, self.initial_layout.num_experts,
            self.topology.num_replicas, self.slots_per_gpu, dispatch, self.config.policy,
            extra,
        )  # fmt: skip

    def close(self) -> None:
        """Release the op's registration and the Balancer; idempotent."""
        if self._closed:
            return
        self._closed = True
        unregister_router(self.router_id)
        self.balancer.close()


__all__ = [
    "EngineRuntime",
    "check_slots",
    "engine_topology",
    "forward_runtime_logs",
    "log_report",
    "require_enabled",
]
