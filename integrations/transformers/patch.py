"""``apply_eplb(model, config, group)``: shard a transformers MoE model's experts over EP ranks.

After the call, each MoE block's experts module holds only this rank's physical slots and
routes tokens through :class:`~.moe.EPExperts`; with ``config.enable`` a
:class:`eplb_plugin.balancer.Balancer` owns the maps and the per-slot counts and moves the
slot weights in place when it rebalances. Call :meth:`EplbModel.step` once per engine step
(after the forward) on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from eplb_plugin.config import EplbConfig
from eplb_plugin.dispatch import exchanges_counts
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.maps import ExpertMaps
from eplb_plugin.routing import Router

from ..common.runtime import check_slots
from .comm import make_communicator
from .models import MoEFamily, family_of, moe_layers
from .moe import EPExperts, EPRuntime, shard_experts


@dataclass
class EplbModel:
    """Handle returned by :func:`apply_eplb`.

    Attributes:
        model: the patched model (same object that was passed in).
        family: its family table.
        layer_ids: decoder layer index of each MoE layer (layout row ``l`` -> layer_ids[l]).
        runtime: the EPRuntime shared by the EP layers.
        balancer: the Balancer, or None when EPLB is off.
        initial_layout: the layout the experts were sharded with.
    """

    model: torch.nn.Module
    family: MoEFamily
    layer_ids: list[int]
    runtime: EPRuntime
    balancer: object | None
    initial_layout: ExpertLayout
    routers: list[torch.nn.Module] = field(default_factory=list)

    @property
    def layout(self) -> ExpertLayout:
        """Host layout in force."""
        return self.balancer.layout if self.balancer is not None else self.initial_layout

    @property
    def maps(self):
        return self.runtime.maps

    @property
    def counts(self) -> torch.Tensor:
        """[L, P] int32 per-slot counts of this rank's tokens since the last step."""
        return self.runtime.counts

    def step(self):
        """End of an engine step on every rank: the Balancer records, plans, moves (or not).

        Returns the Balancer's StepReport (None when nothing happened or EPLB is off).
        """
        self.runtime.step += 1
        if self.balancer is None:
            self.runtime.counts.zero_()
            return None
        return self.balancer.step()

    def close(self) -> None:
        if self.balancer is not None:
            self.balancer.close()


def _rank_and_size(group, rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def ep_topology(config: EplbConfig, num_experts: int, world_size: int) -> Topology:
    """The slot topology of an EP deployment; ValueError when slots do not divide over ranks.

    EPLB off serves the logical experts as they are (P = E); on, P = E + num_redundant_experts.
    Expert groups and nodes come from ``config`` (``--eplb-num-groups``, ``--eplb-num-nodes``).
    """
    slots = num_experts + (config.num_redundant_experts if config.enable else 0)
    check_slots(num_experts, slots, world_size)
    topology = Topology(slots, config.num_groups, config.num_nodes, world_size)
    topology.check_experts(num_experts)
    return topology


def _dispatch_comm(config: EplbConfig, group: object | None, world_size: int) -> object | None:
    """The Communicator of ``global``/``node`` dispatch's per-layer all-reduce with EPLB off
    (the Balancer's otherwise); None where no collective is needed."""
    if not exchanges_counts(config.dispatch) or world_size == 1:
        return None
    from eplb_plugin.comm import make_communicator as make_control

    return make_control(config.communicator, group, config.timeout_s)


def _export_layout(shard, layout: ExpertLayout | None, rank: int, world_size: int):
    """The initial layout of a model loaded from an export; ValueError where the run
    disagrees with what the model holds."""
    if world_size != shard.ep_size:
        raise ValueError(
            f"EP size {world_size} disagrees with export {shard.path!r}, written for "
            f"ep_size={shard.ep_size}"
        )
    if rank != shard.rank:
        raise ValueError(f"rank {rank} was given a model loaded for rank {shard.rank}")
    if layout is not None and not layout.equals(shard.layout):
        raise ValueError(
            "the model holds the slots of its export's layout; another initial layout "
            "would need expert weights this rank did not load (pass layout=None)"
        )
    return shard.layout


def apply_eplb(
    model: torch.nn.Module,
    config: EplbConfig,
    group: object | None = None,
    *,
    layout: ExpertLayout | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    comm: str = "auto",
    balancer_options: dict | None = None,
) -> EplbModel:
    """Shard ``model``'s routed experts over the EP ranks of ``group`` and hook routing.

    Args:
        model: a transformers 5.x DeepseekV3 / Mixtral / Qwen2-MoE / Qwen3-MoE model holding
            all experts (as loaded); patched in place.
        config: EplbConfig; ``enable`` turns the Balancer on and adds
            ``num_redundant_experts`` slots.
        group: torch.distributed process group of the EP ranks (default: the world group,
            or a single process when torch.distributed is not initialized).
        layout: initial layout (default: identity with ``num_redundant_experts`` extra slots
            round-robin when EPLB is on); its topology then fixes the slots. A model loaded
            from an export (:func:`~.loading.load_export_model`) already holds its rank's
            slots: the export's layout is the default, and the only one accepted.
        rank, world_size: override the group's (single-process tests).
        comm: token exchange backend, ``"auto"``, ``"torch"`` or ``"deepep"``.
        balancer_options: extra keyword arguments of the Balancer (e.g. its ``fault`` hook).
    Returns:
        An EplbModel handle; call its ``step()`` after every forward on every rank.
    """
    if not isinstance(config, EplbConfig):
        raise ValueError(f"config must be an EplbConfig, got {type(config).__name__}")
    family = family_of(model.config)
    blocks = moe_layers(model, family)
    if any(isinstance(getattr(b, family.experts), EPExperts) for _, b in blocks):
        raise ValueError("apply_eplb was already applied to this model")
    rank, world_size = _rank_and_size(group, rank, world_size)
    num_experts = family.num_experts(model.config)
    num_layers = len(blocks)
    shard = getattr(model, "eplb_export", None)
    if shard is not None:
        layout = _export_layout(shard, layout, rank, world_size)
    if layout is None:
        topology = ep_topology(config, num_experts, world_size)
        layout = ExpertLayout.identity(num_layers, num_experts, topology)
    else:
        topology = layout.topology
        if topology.num_gpus != world_size:
            raise ValueError(
                f"layout.topology.num_gpus={topology.num_gpus} != EP size {world_size}"
            )
        if layout.num_layers != num_layers or layout.num_experts != num_experts:
            raise ValueError(
                f"layout of {layout.num_layers} layers x {layout.num_experts} experts does not "
                f"fit {num_layers} MoE layers x {num_experts} experts"
            )
    device = getattr(getattr(blocks[0][1], family.experts), family.expert_params[0]).device
    slots = topology.slots_per_gpu
    expert_tensors = []
    locals_ = []
    for layer, (_, block) in enumerate(blocks):
        experts = getattr(block, family.experts)
        if shard is not None:  # loaded from an export: already this rank's slots
            expert_tensors.append([getattr(experts, n).data for n in family.expert_params])
        else:
            expert_tensors.append(
                shard_experts(experts, family.expert_params, layout.phy2log[layer], rank, slots)
            )
        locals_.append(experts)

    balancer = None
    if config.enable:
        from eplb_plugin.balancer import Balancer

        balancer = Balancer(
            config,
            layout,
            expert_tensors,
            group=group,
            rank=rank,
            world_size=world_size,
            **{"engine": "transformers", **(balancer_options or {})},
        )
        maps, counts, router = balancer.maps, balancer.counts, balancer.router
    else:
        maps = ExpertMaps.of(layout, device)
        counts = torch.zeros(num_layers, topology.num_replicas, dtype=torch.int32, device=device)
        router = Router(
            config.dispatch, _dispatch_comm(config, group, world_size),
            iters=config.waterfill_iters, gpus_per_node=topology.gpus_per_node,
        )  # fmt: skip
    hidden = int(model.config.hidden_size)
    communicator = make_communicator(comm, group, world_size, slots, hidden, device)
    runtime = EPRuntime(
        rank=rank, world_size=world_size, slots_per_rank=slots, maps=maps, counts=counts,
        comm=communicator, router=router, seed=config.seed, balancer=balancer,
    )  # fmt: skip
    routers = []
    for layer, (_, block) in enumerate(blocks):
        setattr(block, family.experts, EPExperts(locals_[layer], layer, runtime))
        routers.append(getattr(block, family.router))
    return EplbModel(model, family, [i for i, _ in blocks], runtime, balancer, layout, routers)
