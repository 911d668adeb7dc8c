"""The plugin balancer inside one SGLang model runner (one scheduler process, one EP rank).

SGLang already serves ``P = E + R`` physical slots (``--ep-num-redundant-experts R``) and
exposes each MoE layer's per-slot tensors as ``model.routed_experts_weights_of_layer``, so
nothing is resized: :class:`SglangEplb` takes SGLang's initial layout as its own and connects
three hooks (docs/sglang.md):

- **dispatch**: :meth:`SglangEplb.dispatch_info` answers ``ExpertLocationDispatchInfo.
  init_new`` with one-layer views of the Balancer's maps tagged with a :class:`LayerRoute`,
  which the patched ``topk_ids_logical_to_physical`` sends through the custom op;
- **counting**, where SGLang's own recorder counts: :class:`RecorderShim` adds each layer's
  tokens per slot from one source (:func:`count_source`), multiplied by a device scalar that
  is 1 only inside real forward passes (capturable in CUDA graphs);
- **the step**, once per ``ModelRunner.forward`` on every rank; when a rebalance ends,
  SGLang's expert-location metadata is rebuilt from the layout in force (``on_layout``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from eplb_plugin.config import EplbConfig
from eplb_plugin.maps import ExpertMaps

from ..common.runtime import EngineRuntime, require_enabled

logger = logging.getLogger("sglang.eplb_plugin")

COUNT_SOURCES = ("select_experts", "deepep_low_latency", "deepep_normal")


def count_source(
    moe_a2a_backend: str | None, deepep_mode: str | None, recorder_mode: str | None
) -> str:
    """Where the per-slot counts come from, by SGLang's own rule for its recorder.

    DeepEP low-latency dispatch hands over its received per-expert counts (a device tensor,
    free); DeepEP normal dispatch's host list is used only in SGLang's ``stat_approx``
    recorder mode (as SGLang does); everything else (no all-to-all, DeepEP ``auto`` or
    normal, other backends) counts the physical ids of ``select_experts``.
    """
    if moe_a2a_backend == "deepep" and deepep_mode == "low_latency":
        return "deepep_low_latency"
    if moe_a2a_backend not in (None, "none") and deepep_mode == "normal":
        if recorder_mode == "stat_approx":
            return "deepep_normal"
    return "select_experts"


class LayerRoute:
    """What the patched ``topk_ids_logical_to_physical`` needs for one layer: one-layer views
    of the Balancer's maps and a scratch count row (tensors only, no layer index, so that a
    compiled caller is not specialised per layer) and the runtime."""

    __slots__ = ("maps", "sink", "runtime")

    def __init__(self, maps: ExpertMaps, sink: torch.Tensor, runtime: SglangEplb):
        self.maps, self.sink, self.runtime = maps, sink, runtime


def route(topk_ids: torch.Tensor, layer_route: LayerRoute) -> torch.Tensor:
    """[N, K] logical ids -> [N, K] physical slots through the custom op.

    Every row is routed; the op's own count goes to a scratch buffer: the counts that feed
    the Balancer are taken where SGLang's recorder takes them (after padding rows are masked).
    """
    r = layer_route
    return r.runtime.route(topk_ids, r.maps, r.sink, 0)


class SglangEplb(EngineRuntime):
    """The EngineRuntime of one SGLang model runner, wired to its MoE layers.

    Args:
        config: the EplbConfig (``enable`` must be True).
        model_phy2log: [num_model_layers, P] int SGLang's initial ``physical_to_logical_map``
            (one row per model layer; dense layers hold a trivial row).
        num_experts: E logical experts.
        layer_ids: model layer ids of the MoE layers, ascending (the keys of
            ``routed_experts_weights_of_layer``): row ``i`` of the Balancer is layer
            ``layer_ids[i]``.
        expert_tensors: per MoE layer, this rank's tensors whose dim 0 is its local slots.
        ep_rank, ep_size: this rank and the EP size.
        source: one of COUNT_SOURCES (:func:`count_source`).
        on_layout: called with the full [num_model_layers, P] int64 map and the MoE layer
            ids when a rebalance ends (refreshes SGLang's metadata).
        options: EngineRuntime's keywords: ``num_groups`` (the model's), ``num_nodes``
            (SGLang's ``--nnodes``), ``rank_invariant`` (True without an all-to-all backend:
            every rank routes the same tokens), ``group``, ``balancer_cls``.
    """

    logger = logger
    engine_name = "sglang"

    def __init__(
        self,
        config: EplbConfig,
        model_phy2log: torch.Tensor,
        num_experts: int,
        layer_ids: list[int],
        expert_tensors: list[list[torch.Tensor]],
        ep_rank: int,
        ep_size: int,
        *,
        source: str = "select_experts",
        on_layout: Callable[[torch.Tensor, list[int]], None] | None = None,
        **options: Any,
    ) -> None:
        require_enabled(config, "SglangEplb")
        if source not in COUNT_SOURCES:
            raise ValueError(f"source={source!r} must be one of {', '.join(COUNT_SOURCES)}")
        model_phy2log = torch.as_tensor(model_phy2log).detach().cpu().to(torch.int64)
        if model_phy2log.dim() != 2:
            raise ValueError(
                f"model_phy2log must be [layers, slots], got shape {tuple(model_phy2log.shape)}"
            )
        if not layer_ids:
            raise ValueError("no MoE layer to balance (layer_ids is empty)")
        if list(layer_ids) != sorted(set(layer_ids)):
            raise ValueError(f"layer_ids must be distinct and ascending, got {layer_ids}")
        if layer_ids[0] < 0 or layer_ids[-1] >= model_phy2log.shape[0]:
            raise ValueError(
                f"layer_ids {layer_ids} do not fit the {model_phy2log.shape[0]} rows of "
                "SGLang's physical_to_logical_map"
            )
        if len(expert_tensors) != len(layer_ids):
            raise ValueError(
                f"expert_tensors has {len(expert_tensors)} layers, layer_ids {len(layer_ids)}"
            )
        redundant = model_phy2log.shape[1] - num_experts
        if redundant != config.num_redundant_experts:
            raise ValueError(
                f"SGLang serves {model_phy2log.shape[1]} slots for {num_experts} experts "
                f"({redundant} redundant, --ep-num-redundant-experts) but "
                f"--eplb-num-redundant-experts is {config.num_redundant_experts}; launch with "
                "`eplb sglang launch_server`, which passes the same value to both"
            )
        super().__init__(
            config, model_phy2log[list(layer_ids)], num_experts, expert_tensors, ep_rank,
            ep_size, **options,
        )  # fmt: skip
        self.layer_ids = list(layer_ids)
        self.rows = {layer_id: row for row, layer_id in enumerate(self.layer_ids)}
        writer = getattr(self.balancer, "load_writer", None)
        if writer is not None:  # SGLang's dumps have a row per hidden layer, dense ones too
            writer.layer_ids, writer.num_layers = self.layer_ids, model_phy2log.shape[0]
        self.model_phy2log = model_phy2log
        self.source = source
        self.on_layout = on_layout
        # Device scalar the counting adds are multiplied by: 1 only inside real forward
        # passes, so that they can be captured in CUDA graphs.
        self.gate = torch.zeros((), dtype=torch.int32, device=self.device)
        sink = torch.zeros_like(self.balancer.counts)
        maps = self.balancer.maps
        self.routes = {
            layer_id: LayerRoute(maps.rows(row), sink[row : row + 1], self)
            for layer_id, row in self.rows.items()
        }
        self._infos: dict[int, Any] = {}
        self.forwards = 0

    # ------------------------------------------------------------------ dispatch
    def dispatch_info(self, layer_id: int, info_cls: type) -> Any | None:
        """SGLang's ``ExpertLocationDispatchInfo`` for ``layer_id`` over this project's maps,
        tagged with its :class:`LayerRoute` (attribute ``eplb_plugin``); None for a layer
        this runtime does not balance (SGLang's own answer is used then). One object per
        layer, built once: its tensors are views that follow every commit."""
        info = self._infos.get(layer_id)
        if info is not None or layer_id not in self.routes:
            return info
        r = self.routes[layer_id]
        info = info_cls(
            ep_dispatch_algorithm="dynamic",
            partial_logical_to_rank_dispatch_physical_map=None,
            partial_logical_to_all_physical_map=r.maps.log2phy[0],
            partial_logical_to_all_physical_map_num_valid=r.maps.logcnt[0],
            num_physical_experts=self.topology.num_replicas,
            rank_invariant=self.rank_invariant,
        )
        info.eplb_plugin = r
        self._infos[layer_id] = info
        return info

    # ------------------------------------------------------------------ counting
    def count_select_experts(self, layer_id: int | None, topk_ids: torch.Tensor) -> None:
        """Add one layer's routed physical ids [N, K] (-1 = none) to ``counts``."""
        row = self.rows.get(layer_id) if layer_id is not None else None
        if row is None or self.source != "select_experts":
            return
        counts = self.balancer.counts
        ids = topk_ids.reshape(-1)
        known = (ids >= 0) & (ids < counts.shape[1])
        src = known.to(torch.int32) * self.gate
        counts[row].scatter_add_(0, ids.masked_fill(~known, 0).to(torch.int64), src)

    def count_local(self, layer_id: int | None, local_counts: Any, source: str) -> None:
        """Add the tokens this rank received per local slot ([slots_per_gpu], a device
        tensor or a host list, as DeepEP reports them) to its slice of ``counts``."""
        row = self.rows.get(layer_id) if layer_id is not None else None
        if row is None or self.source != source:
            return
        counts = self.balancer.counts
        local = torch.as_tensor(local_counts, device=counts.device).reshape(-1)
        n = min(local.shape[0], self.slots_per_gpu)
        start = self.ep_rank * self.slots_per_gpu
        counts[row, start : start + n] += local[:n].to(torch.int32) * self.gate

    # ------------------------------------------------------------------ per forward
    def begin_forward(self, num_tokens: int) -> None:
        """Before a forward pass that routes ``num_tokens`` of this rank's tokens."""
        self.gate.fill_(1 if num_tokens > 0 else 0)
        self.set_seed(self.forwards)

    def end_forward(self) -> None:
        """After the forward: routing outside forward passes (CUDA-graph capture, warm-up
        outside ``ModelRunner.forward``) is not load."""
        self.gate.fill_(0)
        self.forwards += 1

    def step(self) -> dict | None:
        """One Balancer step; call after every forward on every EP rank (lockstep). When a
        rebalance ends, ``on_layout`` refreshes SGLang's expert metadata."""
        report = super().step()
        if report and report.get("event") in ("done", "failed") and self.on_layout is not None:
            try:
                self.on_layout(self.full_phy2log(), list(self.layer_ids))
            except Exception as exc:  # noqa: BLE001 - keep serving on the committed layout
                logger.error("eplb-plugin: refreshing SGLang's expert metadata failed: %s", exc)
        return report

    def full_phy2log(self) -> torch.Tensor:
        """[num_model_layers, P] int64: SGLang's map with the MoE layers' rows in force."""
        full = self.model_phy2log.clone()
        full[self.layer_ids] = self.balancer.maps.phy2log.detach().cpu()
        return full

    def summary(self) -> dict:
        return {
            **super().summary(),
            "layer_ids": list(self.layer_ids),
            "count_source": self.source,
            "forwards": self.forwards,
        }


class RecorderShim:
    """SGLang's expert-distribution recorder with the plugin's counting beside it.

    Every call reaches the wrapped recorder unchanged (SGLang's recording, dumps and metrics
    keep working); the shim also tracks the current layer (``with_current_layer``) and
    passes each layer's counts to the runtime.
    """

    def __init__(self, inner: Any, runtime: SglangEplb) -> None:
        self._inner = inner
        self._runtime = runtime
        self._layer: int | None = None

    @property
    def inner(self) -> Any:
        return self._inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def recording(self) -> bool:
        return self._inner.recording

    @contextmanager
    def with_current_layer(self, layer_idx: int) -> Iterator[None]:
        previous, self._layer = self._layer, layer_idx
        try:
            with self._inner.with_current_layer(layer_idx):
                yield
        finally:
            self._layer = previous

    def on_select_experts(self, topk_ids: torch.Tensor) -> Any:
        self._runtime.count_select_experts(self._layer, topk_ids)
        return self._inner.on_select_experts(topk_ids=topk_ids)

    def on_deepep_dispatch_normal(
        self,
        local_physical_count_of_layer: list[int],
        num_tokens_per_rank: Any,
        num_tokens_per_rdma_rank: Any,
        num_tokens_per_expert: Any,
    ) -> Any:
        self._runtime.count_local(self._layer, local_physical_count_of_layer, "deepep_normal")
        return self._inner.on_deepep_dispatch_normal(
            local_physical_count_of_layer=local_physical_count_of_layer,
            num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            num_tokens_per_expert=num_tokens_per_expert,
        )

    def on_deepep_dispatch_low_latency(self, local_physical_count_of_layer: torch.Tensor) -> Any:
        self._runtime.count_local(self._layer, local_physical_count_of_layer, "deepep_low_latency")
        return self._inner.on_deepep_dispatch_low_latency(
            local_physical_count_of_layer=local_physical_count_of_layer
        )
