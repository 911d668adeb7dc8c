"""The plugin balancer inside one vLLM model runner (one worker process, one EP rank).

:func:`attach` runs right after vLLM loads the model (see :mod:`.patches`). For every fused
MoE layer it

1. adds the redundant slots: this rank's ``P / ep_size`` slots hold its own loaded experts
   followed by replicas of them (:func:`initial_phy2log`), so no weight crosses ranks at
   start-up; every per-expert tensor (weights, biases, scales; after vLLM's own
   post-processing such as the CPU prepacking, which keeps one expert per row of dim 0) is
   re-indexed along dim 0 (:func:`grow_slots`);
2. creates one :class:`eplb_plugin.balancer.Balancer` over all layers, which owns the
   device maps and the per-slot counts and moves the rows of those tensors in place;
3. routes each layer's logical ids through ``map_and_count`` (:mod:`.ops`) in the slot
   vLLM's own EPLB uses for its mapping.

Per engine step the runner calls :meth:`VllmEplb.begin_forward` / :meth:`end_forward` around
the forward and :meth:`VllmEplb.step` after sampling (``eplb_step``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from eplb_plugin.config import EplbConfig
from eplb_plugin.layout import ExpertLayout, Topology, balancedness_of

from . import patches
from .ops import map_and_count_op, register_balancer, unregister_balancer

logger = logging.getLogger("vllm.eplb_plugin")

# Step reports kept for inspection (``summary()``); older ones are dropped.
REPORTS_KEPT = 256


def initial_phy2log(
    num_layers: int, num_experts: int, num_slots: int, ep_size: int
) -> torch.Tensor:
    """[L, P] int64 start-up layout that needs no transfer.

    vLLM's linear placement loads experts ``[r * E/ep, (r + 1) * E/ep)`` on EP rank ``r``;
    that rank's ``P/ep`` slots hold those experts in order, then replicas of them
    round-robin. With one rank this is ``arange(P) % E``.
    """
    check_slots(num_experts, num_slots, ep_size)
    local = num_experts // ep_size
    per_rank = num_slots // ep_size
    rank = torch.arange(num_slots) // per_rank
    offset = torch.arange(num_slots) % per_rank
    row = rank * local + offset % local
    return row.to(torch.int64).expand(num_layers, -1).contiguous()


def check_slots(num_experts: int, num_slots: int, ep_size: int) -> None:
    """ValueError unless experts and slots divide evenly over the EP ranks."""
    if num_slots < num_experts:
        raise ValueError(f"num_slots={num_slots} is below num_experts={num_experts}")
    if num_experts % ep_size or num_slots % ep_size:
        raise ValueError(
            f"EP size {ep_size} must divide both the {num_experts} experts and the "
            f"{num_slots} physical slots ({num_slots - num_experts} redundant); choose "
            f"--eplb-num-redundant-experts as a multiple of {ep_size}"
        )


def local_rows(phy2log_row: torch.Tensor, ep_rank: int, slots_per_rank: int,
               experts_per_rank: int) -> torch.Tensor:  # fmt: skip
    """[S] int64: for each of this rank's slots, the row of the loaded tensors holding its
    expert (the rank loaded experts ``ep_rank * experts_per_rank`` onwards)."""
    mine = phy2log_row[ep_rank * slots_per_rank : (ep_rank + 1) * slots_per_rank]
    rows = mine - ep_rank * experts_per_rank
    if bool((rows < 0).any()) or bool((rows >= experts_per_rank).any()):
        raise ValueError(f"the start-up layout puts experts on rank {ep_rank} it did not load")
    return rows.to(torch.int64)


def grow_slots(params: list[tuple[str, torch.nn.Parameter]], rows: torch.Tensor) -> list:
    """Re-index every per-expert tensor along dim 0: new row ``s`` = old row ``rows[s]``.

    The Parameter objects stay (vLLM's kernels and quant configs may hold them); their
    ``.data`` is replaced. Returns the new tensors (what the Balancer moves in place).
    """
    tensors = []
    for _, param in params:
        index = rows.to(param.device)
        param.data = param.data.index_select(0, index).contiguous()
        tensors.append(param.data)
    return tensors


def slot_balancedness(counts: torch.Tensor) -> float:
    """Mean over layers of mean/max tokens per slot, from ``counts`` [L, P] (1.0 = even).

    The balancedness of a deployment with one slot per GPU; with a single GPU (every slot
    in one process) it is the measure that replication can improve.
    """
    return float(balancedness_of(counts.to(torch.float32)))


def _as_dict(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) else obj


class VllmEplb:
    """The Balancer of one model runner, wired to its MoE layers.

    Args:
        config: the EplbConfig (``enable`` must be True).
        layers: the runner's MoE layers (:func:`patches.moe_layers`), in model order.
        balancer_cls: the Balancer class (default: eplb_plugin's).
        group: the EP process group; default ``"vllm"``: vLLM's EP group (None without
            expert parallelism). Tests pass their own.

    Attributes:
        layers, balancer, topology, initial_layout.
        steps: engine steps that routed tokens so far.
        reports: recent StepReports (as dicts) of the Balancer.
        history: when ``keep_history`` is set, per step (step, counts [L, P] int32 on CPU,
            phy2log [L, P] in force); a host copy per step, so off by default.
    """

    def __init__(
        self,
        config: EplbConfig,
        layers: list[patches.MoELayer],
        balancer_cls=None,
        group: object = "vllm",
    ):
        if not config.enable:
            raise ValueError("VllmEplb needs config.enable=True")
        if not layers:
            raise ValueError("no fused MoE layer to balance")
        first = layers[0]
        for layer in layers[1:]:
            same = (layer.num_experts, layer.num_local, layer.ep_rank, layer.ep_size)
            if same != (first.num_experts, first.num_local, first.ep_rank, first.ep_size):
                raise ValueError(
                    f"MoE layers {first.name!r} and {layer.name!r} differ in experts or EP "
                    "ranks; one balancer needs the same shape in every layer"
                )
        self.layers = layers
        num_experts, ep_size, ep_rank = first.num_experts, first.ep_size, first.ep_rank
        if first.num_local * ep_size != num_experts:
            raise ValueError(
                f"layer {first.name!r} loaded {first.num_local} of {num_experts} experts on "
                f"each of {ep_size} EP ranks; expected an even split"
            )
        num_slots = num_experts + config.num_redundant_experts
        check_slots(num_experts, num_slots, ep_size)
        groups = config.num_groups if config.num_groups != 1 else first.num_groups
        if groups < 1 or num_experts % groups:
            groups = 1
        # The model's expert groups, unless the user set --eplb-num-groups (as `eplb demo`).
        config = dataclasses.replace(config, num_groups=groups)
        self.config = config
        self.topology = Topology(num_slots, groups, config.num_nodes, ep_size)
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.slots_per_rank = self.topology.slots_per_gpu
        phy2log = initial_phy2log(len(layers), num_experts, num_slots, ep_size)
        self.initial_layout = ExpertLayout.from_phy2log(phy2log, self.topology, num_experts)

        expert_tensors = []
        for index, layer in enumerate(layers):
            rows = local_rows(phy2log[index], ep_rank, self.slots_per_rank, first.num_local)
            params = patches.expert_params(layer.experts, layer.num_local)
            expert_tensors.append(grow_slots(params, rows))
            patches.resize_experts(layer, num_slots, self.slots_per_rank)
        self.device = expert_tensors[0][0].device
        if group == "vllm":
            group = patches.ep_group(first)
        if balancer_cls is None:
            from eplb_plugin.balancer import Balancer as balancer_cls
        extra = {}
        if group is None:
            # Without expert parallelism every rank (e.g. each tensor-parallel rank) holds all
            # slots and balances alone; vLLM's world group must not be taken for an EP group.
            from eplb_plugin.comm import LocalCommunicator

            extra["communicator"] = LocalCommunicator(config.timeout_s)
        self.balancer = balancer_cls(
            config, self.initial_layout, expert_tensors, group=group, rank=ep_rank,
            world_size=ep_size, **extra,
        )  # fmt: skip
        # Device scalars the hooks read, so that the steps need no host synchronisation and
        # the values can change under a captured graph.
        self.num_valid = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seed = torch.zeros((), dtype=torch.int64, device=self.device)
        self.dispatch = config.dispatch
        self._balancer_id = register_balancer(self.balancer)
        for index, layer in enumerate(layers):
            patches.set_router_mapping(layer.router, self._mapping(index))
        self.steps = 0
        self._pending = False
        self.reports: deque[dict] = deque(maxlen=REPORTS_KEPT)
        self.keep_history = False
        self.history: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ hooks
    def _mapping(self, layer: int):
        op = map_and_count_op()
        maps, counts = self.balancer.maps, self.balancer.counts
        num_valid, seed, balancer_id = self.num_valid, self.seed, self._balancer_id

        def mapping(topk_ids: torch.Tensor) -> torch.Tensor:
            return op(
                topk_ids, maps.log2phy, maps.logcnt, maps.replica_share, maps.phy2log, counts,
                num_valid, seed, layer, balancer_id,
            )  # fmt: skip

        return mapping

    # ------------------------------------------------------------------ per step
    def begin_forward(self, num_tokens: int) -> None:
        """Before a forward that routes ``num_tokens`` real tokens (padding comes after)."""
        self.num_valid.fill_(num_tokens)
        c = self.config
        self.seed.fill_((c.seed * 7919 + self.steps * self.ep_size + self.ep_rank) % (1 << 20))
        self._pending = num_tokens > 0

    def end_forward(self) -> None:
        """After the forward: routing outside real steps (warm-up, dummy runs) is not load."""
        self.num_valid.fill_(0)

    def step(self) -> dict | None:
        """After sampling: one Balancer step when this engine step routed tokens."""
        if not self._pending:
            return None
        self._pending = False
        self.steps += 1
        if self.keep_history:
            self.history.append(
                (self.steps, self.balancer.counts.detach().cpu().clone(),
                 self.balancer.maps.phy2log.detach().cpu().clone())
            )  # fmt: skip
        report = self.balancer.step()
        if report is None:
            return None
        report = _as_dict(report)
        self.reports.append(report)
        self._log(report)
        return report

    def _log(self, report: dict) -> None:
        head = f"eplb-plugin: rank {self.ep_rank} step {report.get('step')}:"
        event = report.get("event")
        before, after = report.get("balancedness_before"), report.get("balancedness_after")
        predicted = f"predicted balancedness {_fmt(before)} -> {_fmt(after)}"
        if event == "failed":
            logger.error("%s rebalance failed, serving continues on the layout in force: %s",
                         head, report.get("error"))  # fmt: skip
        elif event == "skipped":
            logger.info("%s plan not acted on (%s)", head, predicted)
        elif event in ("chunk", "done"):
            moved = report.get("bytes_sent", 0) + report.get("bytes_received", 0)
            what = "rebalance done" if event == "done" else "rebalance chunk committed"
            extra = f", {predicted}" if before is not None else ""
            pause = report.get("pause_s") or 0.0
            logger.info(
                "%s %s: layers %s, %d bytes over the network, pause %.3f s%s",
                head, what, report.get("layers"), moved, pause, extra,
            )  # fmt: skip
        elif event == "planned":
            logger.debug("%s load snapshot taken, planning", head)

    # ------------------------------------------------------------------ inspection
    def summary(self) -> dict:
        """Plain-data state of this rank's balancer (safe to send over RPC)."""
        return {
            "rank": self.ep_rank,
            "ep_size": self.ep_size,
            "layers": [layer.name for layer in self.layers],
            "num_experts": self.initial_layout.num_experts,
            "num_slots": self.topology.num_replicas,
            "topology": self.topology.to_dict(),
            "dispatch": self.dispatch,
            "steps": self.steps,
            "initial_phy2log": self.initial_layout.phy2log.tolist(),
            "phy2log": self.balancer.maps.phy2log.detach().cpu().tolist(),
            "stats": _as_dict(self.balancer.stats),
            "reports": list(self.reports),
        }

    def close(self) -> None:
        unregister_balancer(self._balancer_id)
        self.balancer.close()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def attach(runner) -> VllmEplb | None:
    """Give ``runner`` (a vLLM model runner whose model just loaded) the plugin balancer.

    Does nothing when the plugin balancer is off in this process or the runner has one.
    """
    from .plugin import active_config

    config = active_config()
    existing = getattr(runner, patches.RUNTIME_ATTR, None)
    if config is None or existing is not None:
        return existing
    layers = patches.moe_layers(runner)
    if not layers:
        logger.warning("eplb-plugin: the model has no fused MoE layer; balancer not attached")
        return None
    runtime = VllmEplb(config, layers)
    setattr(runner, patches.RUNTIME_ATTR, runtime)
    import eplb_plugin

    patches.mark_compile_cache(
        runner, {"version": eplb_plugin.__version__, "config": runtime.config.to_dict()}
    )
    logger.info(
        "eplb-plugin: balancer attached on EP rank %d/%d: %d MoE layers, %d experts on %d "
        "physical slots (%d per rank), dispatch %s, policy %s",
        runtime.ep_rank, runtime.ep_size, len(layers), runtime.initial_layout.num_experts,
        runtime.topology.num_replicas, runtime.slots_per_rank, runtime.dispatch, config.policy,
    )  # fmt: skip
    return runtime


def runtime_of(runner) -> VllmEplb | None:
    return getattr(runner, patches.RUNTIME_ATTR, None)


# ---------------------------------------------------------------------- RPC helpers
def worker_summary(worker) -> dict | None:
    """For ``LLM.collective_rpc(worker_summary)``: this worker's balancer summary, or None."""
    runtime = runtime_of(getattr(worker, "model_runner", None))
    return None if runtime is None else runtime.summary()


def worker_keep_history(worker, keep: bool = True) -> bool:
    """For ``LLM.collective_rpc``: start/stop keeping per-step counts; True if attached."""
    runtime = runtime_of(getattr(worker, "model_runner", None))
    if runtime is None:
        return False
    runtime.keep_history = keep
    return True


def worker_history(worker) -> list | None:
    """For ``LLM.collective_rpc``: [(step, counts [L, P] list, phy2log [L, P] list)]."""
    runtime = runtime_of(getattr(worker, "model_runner", None))
    if runtime is None:
        return None
    return [(s, c.tolist(), p.tolist()) for s, c, p in runtime.history]
