"""Expert-parallel forward of one transformers MoE block.

The router and the shared experts are left as the model defines them; only the block's
experts module is replaced by :class:`EPExperts`, which keeps this rank's physical slots (a
transformers experts module re-laid to ``slots_per_rank`` experts) and, per call:

1. maps the router's logical choices to physical slots and counts them (``map_and_count``);
2. sends every token to the ranks holding its slots (``comm.dispatch``);
3. runs the local slots (transformers' own experts implementation, EP sentinel for slots held
   elsewhere) and sends the weighted partial outputs back (``comm.combine``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eplb_plugin.maps import ExpertMaps
from eplb_plugin.routing import Router, dither_seed


@dataclass
class EPRuntime:
    """State shared by the EP layers of one model on one rank.

    Attributes:
        rank, world_size: this EP rank and the EP size.
        slots_per_rank: S, physical slots held by each rank.
        maps: the ExpertMaps in force (a Balancer's ``maps`` when EPLB is on); read on every
            call, so in-place commits take effect at the next forward.
        counts: [L, P] int32 device buffer the routing adds its per-slot counts to.
        comm: a token-exchange communicator from :mod:`.comm`.
        router: the :class:`eplb_plugin.routing.Router` of the dispatch mode (its
            Communicator carries ``global`` dispatch's all-reduce).
        seed: dither seed base of the dispatch (combined with rank and step).
        step: engine steps completed (advanced by the caller).
        balancer: the Balancer when EPLB is on.
    """

    rank: int
    world_size: int
    slots_per_rank: int
    maps: ExpertMaps
    counts: torch.Tensor
    comm: object
    router: Router
    seed: int = 0
    step: int = 0
    balancer: object = None

    @property
    def dispatch(self) -> str:
        return self.router.dispatch

    def map_slots(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [N, K] int64 logical -> [N, K] int64 physical slots; adds to ``counts``."""
        seed = dither_seed(self.seed, self.step, self.rank, self.world_size)
        return self.router(topk_ids, self.maps, self.counts, layer, seed=seed)


class EPExperts(torch.nn.Module):
    """Drop-in for a transformers experts module: same call, experts sharded over EP ranks.

    Args:
        local: the model's experts module re-laid to hold this rank's slots (dim 0 = S).
        layer: MoE layer index (row of the layout).
        runtime: the rank's EPRuntime.
    """

    def __init__(self, local: torch.nn.Module, layer: int, runtime: EPRuntime):
        super().__init__()
        self.local = local
        self.layer = layer
        # a plain attribute, not a submodule: several layers share it
        object.__setattr__(self, "runtime", runtime)

    @property
    def num_experts(self) -> int:
        return self.local.num_experts

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [N, H], top_k_index [N, K] logical ids, top_k_weights [N, K] -> [N, H]."""
        runtime = self.runtime
        slot = runtime.map_slots(self.layer, top_k_index.to(torch.int64))
        x, ids, weights, handle = runtime.comm.dispatch(hidden_states, slot, top_k_weights)
        if x.shape[0]:
            out = self.local(x, ids, weights)
        else:
            out = x.new_zeros(0, hidden_states.shape[-1])
        return runtime.comm.combine(out, handle).to(hidden_states.dtype)


def shard_experts(
    experts: torch.nn.Module,
    param_names: tuple[str, ...],
    phy2log: torch.Tensor,
    rank: int,
    slots_per_rank: int,
) -> list[torch.Tensor]:
    """Re-lay a fused experts module into this rank's physical slots, in place.

    Args:
        experts: transformers experts module with ``param_names`` parameters of shape [E, ...].
        phy2log: [P] int64 logical expert of every physical slot of this layer.
        rank: this EP rank; it keeps slots ``rank * S .. rank * S + S - 1``.
        slots_per_rank: S.
    Returns:
        The new parameters' tensors, each [S, ...] (what the Balancer moves in place).
    """
    lo = rank * slots_per_rank
    held = phy2log[lo : lo + slots_per_rank].to(torch.int64).cpu()
    tensors = []
    for name in param_names:
        full = getattr(experts, name)
        local = full.detach()[held.to(full.device)].clone().contiguous()
        setattr(experts, name, torch.nn.Parameter(local, requires_grad=False))
        tensors.append(getattr(experts, name).data)
    experts.num_experts = slots_per_rank
    # transformers' experts implementations skip ids >= num_experts (the EP sentinel)
    experts._is_expert_parallel = True
    return tensors
