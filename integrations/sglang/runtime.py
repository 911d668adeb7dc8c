"""The plugin balancer inside one SGLang model runner (one scheduler process, one EP rank).

SGLang already serves ``P = E + R`` physical slots (``--ep-num-redundant-experts R``), loads
every slot from its logical expert through its expert-location metadata, and exposes each
MoE layer's per-slot tensors as ``model.routed_experts_weights_of_layer[layer_id]``. So, unlike
vLLM, nothing is resized: :class:`SglangEplb` takes SGLang's initial layout as its own, hands
those tensors to one :class:`eplb_plugin.balancer.Balancer`, and connects three hooks:

- **dispatch** (``select_experts`` path): SGLang asks ``ExpertLocationDispatchInfo.init_new
  (layer_id)`` for each MoE layer's mapping and passes it to ``topk_ids_logical_to_physical``;
  :meth:`SglangEplb.dispatch_info` answers with an info whose maps are one-layer views of
  the Balancer's device maps (so SGLang's own ``dynamic`` mapping, should any code path use
  it, still follows this project's layout), tagged with a :class:`LayerRoute` that the
  patched ``topk_ids_logical_to_physical`` sends through ``map_and_count`` (:mod:`.ops`);
- **counting**, where SGLang's own expert-distribution recorder counts: a
  :class:`RecorderShim` wraps SGLang's recorder (which keeps working: dumps, metrics) and
  adds each layer's tokens per physical slot to the Balancer's ``counts`` from one source,
  chosen like SGLang chooses its own (:func:`count_source`): the physical ids of
  ``on_select_experts`` (after SGLang masked the padded rows), or the per-expert received
  counts that DeepEP's low-latency (``on_deepep_dispatch_low_latency``, a device tensor) or
  normal (``on_deepep_dispatch_normal``, a host list) dispatch already produced. Every add
  is multiplied by a device scalar that is 1 only inside real forward passes, so the adds
  can be captured in CUDA graphs and warm-up or idle passes add nothing;
- **the step**: SGLang advances its own EPLB manager once per ``ModelRunner.forward`` on
  every rank (in lockstep, idle DP-attention passes included); :meth:`SglangEplb.step`
  steps the Balancer at the same place. When a rebalance ends, SGLang's expert-location
  metadata is rebuilt from the layout in force (``on_layout``), so SGLang code that reads
  it (weight reloading, layout logging) sees where the experts are.

Nothing here imports SGLang; :mod:`.patches` connects these methods to SGLang's code.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from eplb_plugin.config import EplbConfig
from eplb_plugin.layout import ExpertLayout, Topology

from .ops import map_and_count_op, register_runtime, unregister_runtime

logger = logging.getLogger("sglang.eplb_plugin")

COUNT_SOURCES = ("select_experts", "deepep_low_latency", "deepep_normal")
# Step reports kept for inspection (``summary()``); older ones are dropped.
REPORTS_KEPT = 256


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


def check_slots(num_experts: int, num_slots: int, ep_size: int) -> None:
    """ValueError unless the slots divide evenly over the EP ranks and hold every expert."""
    if num_slots < num_experts:
        raise ValueError(f"num_slots={num_slots} is below num_experts={num_experts}")
    if num_slots % ep_size:
        raise ValueError(
            f"EP size {ep_size} must divide the {num_slots} physical slots "
            f"({num_slots - num_experts} redundant); choose --eplb-num-redundant-experts so "
            f"that experts + redundant is a multiple of {ep_size}"
        )


class LayerRoute:
    """What the patched ``topk_ids_logical_to_physical`` needs for one layer: tensors only
    (one-layer views of the Balancer's maps) and the runtime's number, no layer index, so
    that a compiled caller is not specialised per layer."""

    __slots__ = ("log2phy", "logcnt", "replica_share", "phy2log", "sink", "seed", "runtime_id")

    def __init__(self, maps, row: int, sink: torch.Tensor, seed: torch.Tensor, runtime_id: int):
        one = slice(row, row + 1)
        self.log2phy = maps.log2phy[one]
        self.logcnt = maps.logcnt[one]
        self.replica_share = maps.replica_share[one]
        self.phy2log = maps.phy2log[one]
        self.sink = sink[one]
        self.seed = seed
        self.runtime_id = runtime_id


def route(topk_ids: torch.Tensor, layer_route: LayerRoute) -> torch.Tensor:
    """[N, K] logical ids -> [N, K] physical slots through the custom op.

    The op's own count goes to a scratch buffer: the counts that feed the Balancer are
    taken where SGLang's recorder takes them (after padding rows are masked).
    """
    r = layer_route
    return map_and_count_op()(
        topk_ids, r.log2phy, r.logcnt, r.replica_share, r.phy2log, r.sink, r.seed, r.runtime_id
    )


class SglangEplb:
    """The Balancer of one SGLang model runner, wired to its MoE layers.

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
        num_groups: the model's expert groups (used unless ``--eplb-num-groups`` is set).
        num_nodes: nodes the EP ranks span (SGLang's ``--nnodes``; used unless
            ``--eplb-num-nodes`` is set).
        rank_invariant: every EP rank routes the same tokens (SGLang without an all-to-all
            backend): the dispatch dither then must not depend on the rank.
        source: one of COUNT_SOURCES (:func:`count_source`).
        group: torch.distributed group of the EP ranks (None: the world).
        on_layout: called with the full [num_model_layers, P] int64 map and the MoE layer
            ids when a rebalance ends (refreshes SGLang's metadata).
        balancer_cls: the Balancer class (tests pass a fake).
    """

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
        num_groups: int | None = None,
        num_nodes: int | None = None,
        rank_invariant: bool = False,
        source: str = "select_experts",
        group: object | None = None,
        on_layout: Callable[[torch.Tensor, list[int]], None] | None = None,
        balancer_cls: type | None = None,
    ) -> None:
        if not isinstance(config, EplbConfig) or not config.enable:
            raise ValueError("SglangEplb needs an EplbConfig with enable=True")
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
        num_slots = model_phy2log.shape[1]
        check_slots(num_experts, num_slots, ep_size)
        redundant = num_slots - num_experts
        if redundant != config.num_redundant_experts:
            raise ValueError(
                f"SGLang serves {num_slots} slots for {num_experts} experts ({redundant} "
                f"redundant, --ep-num-redundant-experts) but --eplb-num-redundant-experts is "
                f"{config.num_redundant_experts}; launch with `eplb sglang launch_server`, "
                "which passes the same value to both"
            )
        groups = config.num_groups if config.num_groups != 1 else (num_groups or 1)
        if groups < 1 or num_experts % groups:
            groups = 1
        nodes = config.num_nodes if config.num_nodes != 1 else (num_nodes or 1)
        if nodes < 1 or ep_size % nodes:
            nodes = 1
        # The model's expert groups and SGLang's node count, unless the user set them.
        self.config = config = dataclasses.replace(config, num_groups=groups, num_nodes=nodes)
        self.topology = Topology(num_slots, groups, nodes, ep_size)
        self.layer_ids = list(layer_ids)
        self.rows = {layer_id: row for row, layer_id in enumerate(self.layer_ids)}
        self.model_phy2log = model_phy2log
        self.initial_layout = ExpertLayout.from_phy2log(
            model_phy2log[self.layer_ids], self.topology, num_experts
        )
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.slots_per_gpu = self.topology.slots_per_gpu
        self.dispatch = config.dispatch
        self.rank_invariant = rank_invariant
        self.source = source
        self.on_layout = on_layout
        if balancer_cls is None:
            from eplb_plugin.balancer import Balancer as balancer_cls
        self.balancer = balancer_cls(
            config, self.initial_layout, expert_tensors, group=group, rank=ep_rank,
            world_size=ep_size,
        )  # fmt: skip
        self.comm = getattr(self.balancer, "comm", None)
        counts = self.balancer.counts
        self.device = counts.device
        # Device scalars the hooks read, so that no step needs a host synchronisation and
        # the values can change under a captured graph.
        self.gate = torch.zeros((), dtype=torch.int32, device=self.device)
        self.seed = torch.zeros((), dtype=torch.int64, device=self.device)
        self._sink = torch.zeros_like(counts)
        # registered now, not while Dynamo traces SGLang's compiled top-k helpers
        map_and_count_op()
        self._runtime_id = register_runtime(self)
        self.routes = {
            layer_id: LayerRoute(self.balancer.maps, row, self._sink, self.seed, self._runtime_id)
            for layer_id, row in self.rows.items()
        }
        self._infos: dict[int, Any] = {}
        self.forwards = 0
        self.steps = 0
        self.reports: deque[dict] = deque(maxlen=REPORTS_KEPT)
        self._closed = False

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
            partial_logical_to_all_physical_map=r.log2phy[0],
            partial_logical_to_all_physical_map_num_valid=r.logcnt[0],
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
        rank = 0 if self.rank_invariant else self.ep_rank
        step = self.forwards * (1 if self.rank_invariant else self.ep_size)
        self.seed.fill_((self.config.seed * 7919 + step + rank) % (1 << 20))

    def end_forward(self) -> None:
        """After the forward: routing outside forward passes (CUDA-graph capture, warm-up
        outside ``ModelRunner.forward``) is not load."""
        self.gate.fill_(0)
        self.forwards += 1

    def step(self) -> dict | None:
        """One Balancer step; call after every forward on every EP rank (lockstep)."""
        if self._closed:
            return None
        self.steps += 1
        report = self.balancer.step()
        if report is None:
            return None
        report = asdict(report) if is_dataclass(report) else dict(report)
        self.reports.append(report)
        self._log(report)
        if report.get("event") in ("done", "failed") and self.on_layout is not None:
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

    def _log(self, report: dict) -> None:
        event = report.get("event")
        if event == "failed":
            logger.error(
                "eplb-plugin: rank %d step %d: rebalance failed (layers %s): %s",
                self.ep_rank, report.get("step"), report.get("layers"), report.get("error"),
            )  # fmt: skip
        elif event in ("done", "skipped"):
            logger.info(
                "eplb-plugin: rank %d step %d: %s (balancedness %s -> %s, pause %.3f s)",
                self.ep_rank, report.get("step"), event,
                _fmt(report.get("balancedness_before")), _fmt(report.get("balancedness_after")),
                report.get("pause_s") or 0.0,
            )  # fmt: skip

    # ------------------------------------------------------------------ inspection
    def summary(self) -> dict:
        """Plain-data state of this rank's balancer."""
        stats = self.balancer.stats
        return {
            "rank": self.ep_rank,
            "ep_size": self.ep_size,
            "layer_ids": list(self.layer_ids),
            "num_experts": self.initial_layout.num_experts,
            "num_slots": self.topology.num_replicas,
            "topology": self.topology.to_dict(),
            "dispatch": self.dispatch,
            "count_source": self.source,
            "forwards": self.forwards,
            "phy2log": self.balancer.maps.phy2log.detach().cpu().tolist(),
            "stats": asdict(stats) if is_dataclass(stats) else stats,
            "reports": list(self.reports),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        unregister_runtime(self._runtime_id)
        self.balancer.close()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


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


__all__ = [
    "COUNT_SOURCES",
    "LayerRoute",
    "RecorderShim",
    "SglangEplb",
    "check_slots",
    "count_source",
    "route",
]
