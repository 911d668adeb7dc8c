"""``torch.ops.eplb_plugin.sglang_map_and_count``: the dispatch hook as one opaque custom op.

SGLang maps logical to physical ids inside ``@torch.compile``'d helpers of its top-k code
(``_biased_grouped_topk_postprocess``), and Dynamo cannot trace ``map_and_count``'s
data-dependent code. Behind ``torch.library.custom_op`` with a shape-only fake the hook is
one graph node. Every argument is a one-layer view of the Balancer's device tensors
(``maps.log2phy[layer:layer + 1]`` ...), so the op never receives a layer number: a compiled
helper shared by all layers sees the same argument kinds in every layer and is not
recompiled per layer, and the views follow the Balancer's in-place commits.

Every row is routed and counted: SGLang masks padded rows only after the mapping, so the
counts that feed the Balancer are taken later, where SGLang's recorder takes them
(:mod:`.runtime`); the op's own ``counts`` argument is a scratch buffer there.

What is not a tensor (dispatch mode, slots per rank, the communicator for ``global``
dispatch) comes from the runtime registered here and passed by number.
"""

from __future__ import annotations

import torch

OP_NAME = "eplb_plugin::sglang_map_and_count"

_RUNTIMES: dict[int, object] = {}
_OP: list = []


def register_runtime(runtime: object) -> int:
    """The number that stands for ``runtime`` in calls of the op."""
    for key, known in _RUNTIMES.items():
        if known is runtime:
            return key
    key = max(_RUNTIMES, default=0) + 1
    _RUNTIMES[key] = runtime
    return key


def unregister_runtime(key: int) -> None:
    _RUNTIMES.pop(key, None)


def map_and_count_op():
    """The registered op (registered on first use; one per process)."""
    if not _OP:
        _OP.append(_register())
    return _OP[0]


def _register():
    @torch.library.custom_op(OP_NAME, mutates_args=("counts",))
    def sglang_map_and_count(
        topk_ids: torch.Tensor,
        log2phy: torch.Tensor,
        logcnt: torch.Tensor,
        replica_share: torch.Tensor,
        phy2log: torch.Tensor,
        counts: torch.Tensor,
        seed: torch.Tensor,
        runtime_id: int,
    ) -> torch.Tensor:
        runtime = _RUNTIMES[runtime_id]
        return route_layer(
            topk_ids, log2phy, logcnt, replica_share, phy2log, counts, topk_ids.shape[0], seed,
            dispatch=runtime.dispatch, slots_per_gpu=runtime.slots_per_gpu, comm=runtime.comm,
        )  # fmt: skip

    @sglang_map_and_count.register_fake
    def _(topk_ids, *args, **kwargs):
        return torch.empty_like(topk_ids)

    return sglang_map_and_count


def route_layer(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    replica_share: torch.Tensor,
    phy2log: torch.Tensor,
    counts: torch.Tensor,
    num_valid: torch.Tensor | int,
    seed: torch.Tensor | int,
    *,
    dispatch: str,
    slots_per_gpu: int,
    comm: object | None = None,
) -> torch.Tensor:
    """Map one layer's logical expert ids to physical slots and count them (eager code).

    Args:
        topk_ids: [N, K] int32/int64 logical expert ids; -1 passes through uncounted.
        log2phy: [1, E, X] int64, logcnt: [1, E] int64, replica_share: [1, P] float32,
            phy2log: [1, P] int64: the layer's row of the maps in force.
        counts: [1, P] int32, grown in place by this call's per-slot token counts.
        num_valid: 0-dim int64 (or int): rows at or past it are padding, not counted.
        seed: 0-dim int64 (or int) dither seed (docs/dispatch.md).
        dispatch: ``static``, ``local`` or ``global`` (``global`` all-reduces the layer's
            expert counts over ``comm``: every rank must route every layer).
        slots_per_gpu: physical slots per EP rank.
    Returns:
        [N, K] physical slot ids, dtype of ``topk_ids``.
    """
    from eplb_plugin.kernels import map_and_count

    share = replica_share
    if dispatch == "global":
        share = global_shares(
            topk_ids, phy2log, log2phy, logcnt, replica_share, num_valid, slots_per_gpu, comm
        )
        dispatch = "static"
    return map_and_count(
        topk_ids, log2phy, logcnt, share, counts, 0, num_valid,
        dispatch=dispatch, phy2log=phy2log, slots_per_gpu=slots_per_gpu, seed=seed,
        validate=False,
    )  # fmt: skip


def global_shares(
    topk_ids: torch.Tensor,
    phy2log: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    replica_share: torch.Tensor,
    num_valid: torch.Tensor | int,
    slots_per_gpu: int,
    comm: object | None,
) -> torch.Tensor:
    """[1, P] float32 shares water-filled from this layer's expert counts over all ranks.

    No host synchronisation: the count is a masked ``index_add_``; padding rows
    (``>= num_valid``) are not counted.
    """
    from eplb_plugin.kernels.waterfill import waterfill_shares

    num_experts = logcnt.shape[1]
    rows = torch.arange(topk_ids.shape[0], device=topk_ids.device)
    ids = topk_ids.to(torch.int64)
    known = (rows < num_valid).unsqueeze(1) & (ids >= 0) & (ids < num_experts)
    expert_counts = torch.zeros(num_experts, dtype=torch.float32, device=topk_ids.device)
    expert_counts.index_add_(0, ids.clamp(0, num_experts - 1).reshape(-1),
                             known.reshape(-1).to(torch.float32))  # fmt: skip
    if comm is not None and getattr(comm, "world_size", 1) > 1:
        comm.all_reduce(expert_counts, op="sum")
    return waterfill_shares(
        expert_counts.unsqueeze(0), phy2log, log2phy, logcnt, slots_per_gpu, replica_share
    )


__all__ = ["OP_NAME", "map_and_count_op", "register_runtime", "route_layer", "unregister_runtime"]
