"""``torch.ops.eplb_plugin.map_and_count``: an engine's router hook as one opaque custom op.

Engines compile their models (vLLM with Dynamo unless ``enforce_eager``; SGLang's top-k
helpers are ``@torch.compile``'d), and Dynamo cannot trace the routing's data-dependent
code. Behind ``torch.library.custom_op`` with a shape-only fake the hook is one graph node.
The maps are passed as (read) arguments and ``counts`` as the declared mutated argument:
the op routes with the tensors it is given and writes into the ``counts`` it is given, so
a compiler that functionalizes the mutation (copy in, copy back) still sees every count.

What is not a tensor (the :class:`eplb_plugin.routing.Router`: dispatch mode and the
communicator of ``global`` dispatch) is registered here and passed by number. An adapter
that passes one-layer views of the maps (``layer=0``) keeps a compiled caller shared by all
layers from being specialised per layer.
"""

from __future__ import annotations

from typing import Optional

import torch

from eplb_plugin.maps import ExpertMaps

OP_NAME = "eplb_plugin::map_and_count"

_ROUTERS: dict[int, object] = {}
_OP: list = []


def register_router(router: object) -> int:
    """The number that stands for ``router`` (a callable like ``Router``) in calls of the op."""
    for key, known in _ROUTERS.items():
        if known is router:
            return key
    key = max(_ROUTERS, default=0) + 1
    _ROUTERS[key] = router
    return key


def unregister_router(key: int) -> None:
    _ROUTERS.pop(key, None)


def map_and_count_op():
    """The registered op (registered on first use; one per process)."""
    if not _OP:
        _OP.append(_register())
    return _OP[0]


def _register():
    # Optional[...] rather than "| None": the schema is inferred from these annotations
    @torch.library.custom_op(OP_NAME, mutates_args=("counts",))
    def map_and_count(
        topk_ids: torch.Tensor,
        log2phy: torch.Tensor,
        logcnt: torch.Tensor,
        replica_share: torch.Tensor,
        phy2log: torch.Tensor,
        counts: torch.Tensor,
        num_valid: Optional[torch.Tensor],  # noqa: UP045
        seed: torch.Tensor,
        layer: int,
        slots_per_gpu: int,
        router_id: int,
    ) -> torch.Tensor:
        maps = ExpertMaps(phy2log, log2phy, logcnt, replica_share, slots_per_gpu)
        return _ROUTERS[router_id](topk_ids, maps, counts, layer, num_valid, seed=seed)

    @map_and_count.register_fake
    def _(topk_ids, *args, **kwargs):
        return torch.empty_like(topk_ids)

    return map_and_count


def route_op(
    router_id: int,
    topk_ids: torch.Tensor,
    maps: ExpertMaps,
    counts: torch.Tensor,
    layer: int,
    num_valid: torch.Tensor | None,
    seed: torch.Tensor,
) -> torch.Tensor:
    """Call the op: ``Router(topk_ids, maps, counts, layer, num_valid, seed=seed)`` of the
    router registered as ``router_id``, as one graph node. Returns [N, K] physical slots."""
    return map_and_count_op()(
        topk_ids, maps.log2phy, maps.logcnt, maps.replica_share, maps.phy2log, counts,
        num_valid, seed, layer, maps.slots_per_gpu, router_id,
    )  # fmt: skip


__all__ = ["OP_NAME", "map_and_count_op", "register_router", "route_op", "unregister_router"]
