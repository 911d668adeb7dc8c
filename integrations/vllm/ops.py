"""``torch.ops.eplb_plugin.vllm_map_and_count``: the router hook as one opaque custom op.

vLLM compiles its models with Dynamo unless ``enforce_eager`` is set, and Dynamo cannot
trace ``map_and_count``'s data-dependent code ("Could not guard on data-dependent
expression"). Behind ``torch.library.custom_op`` with a fake (shape-only) implementation the
hook is one node of the graph. The maps are passed as (read) arguments and ``counts`` as the
declared mutated argument: the op writes into the tensor it is given, so that a compiler
that functionalizes the mutation (copy in, copy back) still sees every count.

What is not a tensor (dispatch mode, slots per rank, the communicator for ``global``
dispatch) comes from the Balancer, registered here and passed by number.
"""

from __future__ import annotations

import torch

OP_NAME = "eplb_plugin::vllm_map_and_count"

_BALANCERS: dict[int, object] = {}
_OP: list = []


def register_balancer(balancer: object) -> int:
    """The number that stands for ``balancer`` in calls of the op."""
    for key, known in _BALANCERS.items():
        if known is balancer:
            return key
    key = len(_BALANCERS) + 1
    _BALANCERS[key] = balancer
    return key


def unregister_balancer(key: int) -> None:
    _BALANCERS.pop(key, None)


def map_and_count_op():
    """The registered op (registered on first use; one per process)."""
    if not _OP:
        _OP.append(_register())
    return _OP[0]


def _register():
    @torch.library.custom_op(OP_NAME, mutates_args=("counts",))
    def vllm_map_and_count(
        topk_ids: torch.Tensor,
        log2phy: torch.Tensor,
        logcnt: torch.Tensor,
        replica_share: torch.Tensor,
        phy2log: torch.Tensor,
        counts: torch.Tensor,
        num_valid: torch.Tensor,
        seed: torch.Tensor,
        layer: int,
        balancer_id: int,
    ) -> torch.Tensor:
        balancer = _BALANCERS[balancer_id]
        return route(
            balancer, topk_ids, log2phy, logcnt, replica_share, phy2log, counts, num_valid,
            seed, layer,
        )  # fmt: skip

    @vllm_map_and_count.register_fake
    def _(topk_ids, *args, **kwargs):
        return torch.empty_like(topk_ids)

    return vllm_map_and_count


def route(
    balancer,
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    replica_share: torch.Tensor,
    phy2log: torch.Tensor,
    counts: torch.Tensor,
    num_valid: torch.Tensor,
    seed: torch.Tensor,
    layer: int,
) -> torch.Tensor:
    """Map one layer's logical expert ids to physical slots and count them (eager code).

    Args:
        balancer: the Balancer (its ``config.dispatch``, ``topology``, ``comm``).
        topk_ids: [N, K] int32/int64 logical expert ids (vLLM's router output).
        log2phy: [L, E, X] int64, logcnt: [L, E] int64, replica_share: [L, P] float32,
            phy2log: [L, P] int64: the maps in force (the Balancer's ``maps``).
        counts: [L, P] int32; row ``layer`` grows by this call's per-slot token counts.
        num_valid: 0-dim int64: rows at or past it are padding (not counted); 0 outside
            real engine steps (warm-up and dummy runs are not load).
        seed: 0-dim int64 dither seed (docs/dispatch.md).
        layer: MoE layer index (row of the maps).
    Returns:
        [N, K] physical slot ids, dtype of ``topk_ids``.
    """
    from eplb_plugin.kernels.map_and_count import map_and_count

    dispatch = balancer.config.dispatch
    slots_per_gpu = balancer.topology.slots_per_gpu
    share = replica_share
    if dispatch == "global":
        share = global_shares(
            topk_ids, phy2log, log2phy, logcnt, replica_share, num_valid, layer,
            slots_per_gpu, balancer.comm,
        )  # fmt: skip
        dispatch = "static"
    return map_and_count(
        topk_ids, log2phy, logcnt, share, counts, layer, num_valid,
        dispatch=dispatch, phy2log=phy2log, slots_per_gpu=slots_per_gpu, seed=seed,
        validate=False,
    )  # fmt: skip


def global_shares(
    topk_ids: torch.Tensor,
    phy2log: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    replica_share: torch.Tensor,
    num_valid: torch.Tensor,
    layer: int,
    slots_per_gpu: int,
    comm,
) -> torch.Tensor:
    """[L, P] float32 shares whose row ``layer`` is water-filled from every rank's counts.

    Every rank calls this for every layer in the same order (the all-reduce through the
    Balancer's communicator is collective); padding rows (``>= num_valid``) are not counted.
    No host synchronisation: the count is a masked ``index_add_``.
    """
    from eplb_plugin.kernels.waterfill import waterfill_shares

    num_experts = logcnt.shape[1]
    rows = torch.arange(topk_ids.shape[0], device=topk_ids.device)
    ids = topk_ids.to(torch.int64)
    known = (rows < num_valid).unsqueeze(1) & (ids >= 0) & (ids < num_experts)
    expert_counts = torch.zeros(num_experts, dtype=torch.float32, device=topk_ids.device)
    expert_counts.index_add_(0, ids.clamp(0, num_experts - 1).reshape(-1),
                             known.reshape(-1).to(torch.float32))  # fmt: skip
    if comm is not None and comm.world_size > 1:
        comm.all_reduce(expert_counts, op="sum")
    one = slice(layer, layer + 1)
    row = waterfill_shares(
        expert_counts.unsqueeze(0), phy2log[one], log2phy[one], logcnt[one], slots_per_gpu,
        replica_share[one],
    )  # fmt: skip
    share = replica_share.clone()
    share[layer] = row[0]
    return share
