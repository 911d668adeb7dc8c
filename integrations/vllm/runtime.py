"""The plugin balancer inside one vLLM model runner (one worker process, one EP rank).

:func:`attach` runs right after vLLM loads the model (:mod:`.patches`). It adds the redundant
slots: this rank's ``P / ep_size`` slots hold its own loaded experts, then replicas of them
(:func:`initial_phy2log`), so no weight crosses ranks at start-up, and every per-expert tensor
(after vLLM's own post-processing, which keeps one expert per row of dim 0) is re-indexed
along dim 0 (:func:`grow_slots`). Then :class:`VllmEplb` (an EngineRuntime: one Balancer over
all layers) routes each layer's ids through the custom op in the slot vLLM's own EPLB uses
for its mapping; the runner calls ``begin_forward`` / ``end_forward`` around each forward and
``step`` after sampling (``eplb_step``).
"""

from __future__ import annotations

import logging

import torch

from eplb_plugin.config import EplbConfig

from ..common.hooks import RUNTIME_ATTR
from ..common.runtime import EngineRuntime, check_slots, forward_runtime_logs, require_enabled
from . import model

logger = logging.getLogger("vllm.eplb_plugin")


def initial_phy2log(
    num_layers: int, num_experts: int, num_slots: int, ep_size: int
) -> torch.Tensor:
    """[L, P] int64 start-up layout that needs no transfer.

    vLLM's linear placement loads experts ``[r * E/ep, (r + 1) * E/ep)`` on EP rank ``r``;
    that rank's ``P/ep`` slots hold those experts in order, then replicas of them
    round-robin. With one rank this is ``arange(P) % E``.
    """
    check_slots(num_experts, num_slots, ep_size)
    if num_experts % ep_size:
        raise ValueError(
            f"vLLM loads the {num_experts} experts evenly over the {ep_size} EP ranks; "
            f"{ep_size} does not divide them"
        )
    local = num_experts // ep_size
    per_rank = num_slots // ep_size
    rank = torch.arange(num_slots) // per_rank
    offset = torch.arange(num_slots) % per_rank
    row = rank * local + offset % local
    return row.to(torch.int64).expand(num_layers, -1).contiguous()


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


class VllmEplb(EngineRuntime):
    """The EngineRuntime of one vLLM model runner, wired to its MoE layers.

    Args:
        config: the EplbConfig (``enable`` must be True).
        layers: the runner's MoE layers (:func:`model.moe_layers`), in model order.
        balancer_cls: the Balancer class (default: eplb_plugin's).
        group: the EP process group; default ``"vllm"``: vLLM's EP group (None without
            expert parallelism). Tests pass their own.

    Attributes:
        layers; num_valid: 0-dim int64 device scalar, the rows the op counts (0 outside
        real engine steps); history: when ``keep_history`` is set, per step (step, counts
        [L, P] int32 on CPU, phy2log [L, P] in force), a host copy per step, so off by
        default.
    """

    logger = logger
    engine_name = "vllm"

    def __init__(
        self,
        config: EplbConfig,
        layers: list[model.MoELayer],
        balancer_cls=None,
        group: object = "vllm",
    ):
        require_enabled(config, "VllmEplb")
        forward_runtime_logs(logger)
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
        num_experts, ep_size, ep_rank = first.num_experts, first.ep_size, first.ep_rank
        if first.num_local * ep_size != num_experts:
            raise ValueError(
                f"layer {first.name!r} loaded {first.num_local} of {num_experts} experts on "
                f"each of {ep_size} EP ranks; expected an even split"
            )
        num_slots = num_experts + config.num_redundant_experts
        phy2log = initial_phy2log(len(layers), num_experts, num_slots, ep_size)
        if config.initial_layout:  # e.g. an `eplb export` folder: serve its layout from the start
            from eplb_plugin.record import read_initial_layout

            phy2log = read_initial_layout(
                config.initial_layout, len(layers), num_experts, num_slots, ep_size
            )
        per_rank = num_slots // ep_size
        expert_tensors = []
        for index, layer in enumerate(layers):
            rows = local_rows(phy2log[index], ep_rank, per_rank, first.num_local)
            params = model.expert_params(layer.experts, layer.num_local)
            expert_tensors.append(grow_slots(params, rows))
            model.resize_experts(layer, num_slots, per_rank)
        if group == "vllm":
            group = model.ep_group(first)
        communicator = None
        if group is None:
            # Without expert parallelism every rank (e.g. each tensor-parallel rank) holds all
            # slots and balances alone; vLLM's world group must not be taken for an EP group.
            from eplb_plugin.comm import LocalCommunicator

            communicator = LocalCommunicator(config.timeout_s)
        super().__init__(
            config, phy2log, num_experts, expert_tensors, ep_rank, ep_size,
            num_groups=first.num_groups, num_nodes=model.node_count(first), group=group,
            communicator=communicator, balancer_cls=balancer_cls,
        )  # fmt: skip
        self.layers = layers
        self.slots_per_rank = self.slots_per_gpu
        self.num_valid = torch.zeros((), dtype=torch.int64, device=self.device)
        for index, layer in enumerate(layers):
            model.set_router_mapping(layer.router, self._mapping(index))
        self._pending = False
        self.keep_history = False
        self.history: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _mapping(self, layer: int):
        maps, counts, num_valid = self.balancer.maps, self.balancer.counts, self.num_valid

        def mapping(topk_ids: torch.Tensor) -> torch.Tensor:
            return self.route(topk_ids, maps, counts, layer, num_valid)

        return mapping

    def begin_forward(self, num_tokens: int) -> None:
        """Before a forward that routes ``num_tokens`` real tokens (padding comes after)."""
        self.num_valid.fill_(num_tokens)
        self.set_seed(self.steps)
        self._pending = num_tokens > 0

    def end_forward(self) -> None:
        """After the forward: routing outside real steps (warm-up, dummy runs) is not load."""
        self.num_valid.fill_(0)

    def step(self) -> dict | None:
        """After sampling: one Balancer step when this engine step routed tokens."""
        if not self._pending:
            return None
        self._pending = False
        if self.keep_history:
            self.history.append(
                (self.steps + 1, self.balancer.counts.detach().cpu().clone(),
                 self.balancer.maps.phy2log.detach().cpu().clone())
            )  # fmt: skip
        return super().step()

    def summary(self) -> dict:
        return {**super().summary(), "layers": [layer.name for layer in self.layers]}


def attach(runner, config: EplbConfig | None) -> VllmEplb | None:
    """Give ``runner`` (a vLLM model runner whose model just loaded) the plugin balancer
    with ``config`` (the plugin switch's active config; None: the balancer is off).

    Does nothing when ``config`` is None or the runner has one.
    """
    existing = getattr(runner, RUNTIME_ATTR, None)
    if config is None or existing is not None:
        return existing
    layers = model.moe_layers(runner)
    if not layers:
        logger.warning("eplb-plugin: the model has no fused MoE layer; balancer not attached")
        return None
    runtime = VllmEplb(config, layers)
    setattr(runner, RUNTIME_ATTR, runtime)
    import eplb_plugin

    model.mark_compile_cache(
        runner, {"version": eplb_plugin.__version__, "config": runtime.config.to_dict()}
    )
    runtime.log_attached(len(layers))
    return runtime


def runtime_of(runner) -> VllmEplb | None:
    return getattr(runner, RUNTIME_ATTR, None)


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
