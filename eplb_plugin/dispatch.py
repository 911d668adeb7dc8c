"""Dispatch model: the tokens each physical slot receives in one step.

A *dispatch mode* picks, for every token routed to a logical expert, which of the expert's
replicas serves it (``docs/dispatch.md``). :func:`slot_loads` is the exact aggregate of what
the device op ``eplb_plugin.kernels.map_and_count`` does token by token (up to rounding to
whole tokens), so the simulator and the policies can reason about a mode without running it;
:func:`token_loads` counts the whole tokens as the op rounds them.

- ``static``: each expert's tokens split by ``layout.replica_share``;
- ``local``: each rank water-fills its own tokens (no communication);
- ``node``: as ``global`` within each node: the split water-filled on the node's ranks'
  summed counts, their tokens apportioned as one batch (one all-reduce of a [R_node, E + 1]
  table per layer, inside the node: NVLink only);
- ``global``: every rank uses the split water-filled on the step's all-rank counts, and the
  ranks' tokens are apportioned to whole tokens as one batch (one small all-reduce of an
  [R, E + 1] table of counts per layer).
"""

from __future__ import annotations

import torch

from .layout import ExpertLayout
from .names import DISPATCH_MODES as DISPATCH_MODES
from .names import WATERFILL_ITERS as WATERFILL_ITERS

# The counts each mode water-fills its replica shares from: None (the layout's shares as
# they are), "rank" (each rank's own counts of the step), "node" (the counts of the ranks
# on the rank's node: an all-reduce inside the node per layer) or "all" (the step's counts
# summed over the ranks: one all-reduce per layer, ``eplb_plugin.routing.Router``). A new
# mode is a name in ``names.DISPATCH_MODES``, a row here and, if it splits tokens another
# way than by shares, its device op.
WATERFILL_COUNTS = {"static": None, "local": "rank", "node": "node", "global": "all"}


def exchanges_counts(dispatch: str) -> bool:
    """Whether ``dispatch`` all-reduces the step's counts per layer (``node``, ``global``)."""
    return WATERFILL_COUNTS[check_dispatch(dispatch)] in ("node", "all")


def check_dispatch(dispatch: object) -> str:
    """Return ``dispatch`` if it names a mode, else raise ValueError."""
    if dispatch not in DISPATCH_MODES:
        raise ValueError(f"dispatch must be one of {', '.join(DISPATCH_MODES)}, got {dispatch!r}")
    return dispatch  # type: ignore[return-value]


def dispatch_shares(
    layout: ExpertLayout, counts: torch.Tensor, iters: int = WATERFILL_ITERS
) -> torch.Tensor:
    """Water-filled replica shares of ``layout`` for one or several count matrices.

    Args:
        layout: the layout in service.
        counts: [L, E] or [R, L, E] float tokens per logical expert (R ranks, each
            water-filled on its own counts).
    Returns:
        [L, P] or [R, L, P] float32 shares.
    """
    # imported here: the core does not load the kernels package unless a mode needs it
    from eplb_plugin.kernels.waterfill import waterfill_shares

    counts = counts.to(torch.float32)
    lead = counts.shape[:-2]
    rows = counts.reshape(-1, layout.num_experts)
    reps = rows.shape[0] // layout.num_layers

    def tile(t: torch.Tensor) -> torch.Tensor:
        return t.repeat((reps,) + (1,) * (t.dim() - 1))

    share = waterfill_shares(
        rows, tile(layout.phy2log), tile(layout.log2phy), tile(layout.logcnt),
        layout.topology.slots_per_gpu, tile(layout.replica_share), iters,
    )  # fmt: skip
    return share.view(*lead, layout.num_layers, layout.num_slots)


def node_of_rank(layout: ExpertLayout, ranks: int) -> torch.Tensor:
    """[R] int64 node of each of ``ranks`` EP ranks: consecutive ranks share a node, as
    consecutive GPUs do (``Topology.gpus_per_node`` of them), so rank ``r`` is on GPU ``r``."""
    return torch.arange(ranks) // layout.topology.gpus_per_node


def _node_sums(layout: ExpertLayout, counts: torch.Tensor) -> torch.Tensor:
    """[R, L, E] per-rank counts -> [nodes, L, E] each node's ranks' counts, summed."""
    node = node_of_rank(layout, counts.shape[0])
    sums = torch.zeros((int(node[-1]) + 1,) + tuple(counts.shape[1:]), dtype=counts.dtype)
    return sums.index_add_(0, node, counts)


def _check_rank_counts(layout: ExpertLayout, rank_counts: object) -> torch.Tensor:
    counts = torch.as_tensor(rank_counts)
    if counts.dim() == 2:
        counts = counts.unsqueeze(0)
    if counts.dim() != 3 or counts.shape[1:] != (layout.num_layers, layout.num_experts):
        raise ValueError(
            f"rank_counts must be [ranks, {layout.num_layers}, {layout.num_experts}], "
            f"got shape {tuple(counts.shape)}"
        )
    if counts.dtype == torch.bool or counts.is_complex():
        raise ValueError(f"rank_counts must hold real numbers, got dtype {counts.dtype}")
    counts = counts.detach().to(torch.float64).cpu()
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("rank_counts must be finite and non-negative")
    return counts


def slot_loads(
    layout: ExpertLayout,
    rank_counts: object,
    dispatch: str = "static",
    iters: int = WATERFILL_ITERS,
) -> torch.Tensor:
    """Tokens each physical slot receives in one step.

    Args:
        layout: the layout in service.
        rank_counts: [R, L, E] logical tokens routed by each of the R EP ranks this step
            ([L, E] is read as one rank).
        dispatch: ``static``, ``local``, ``node`` or ``global`` (``node``: rank ``r`` is
            on node ``r // layout.topology.gpus_per_node``).
        iters: water-fill sweeps (``local``/``node``/``global``), as the device op uses.
    Returns:
        [L, P] float64: ``sum_r rank_counts[r, l, phy2log[l, p]] * share_r[l, p]``.
    """
    check_dispatch(dispatch)
    counts = _check_rank_counts(layout, rank_counts)
    index = layout.phy2log.unsqueeze(0).expand(counts.shape[0], -1, -1)
    per_rank = counts.gather(2, index)  # [R, L, P]
    source = WATERFILL_COUNTS[dispatch]
    if source is None:
        share = layout.replica_share.double()
    elif source == "node":
        node = node_of_rank(layout, counts.shape[0])
        share = dispatch_shares(layout, _node_sums(layout, counts), iters).double()[node]
    else:
        share = dispatch_shares(layout, counts.sum(0) if source == "all" else counts, iters)
        share = share.double()
    return (per_rank * share).sum(0)


def token_loads(
    layout: ExpertLayout,
    rank_counts: object,
    dispatch: str = "static",
    seeds: object = None,
    iters: int = WATERFILL_ITERS,
) -> torch.Tensor:
    """Whole tokens each physical slot receives in one step: the device op's own counts.

    :func:`slot_loads` splits every rank's tokens in fractions; the op rounds them to whole
    tokens with a dither (``docs/dispatch.md``, apportionment), within one token per slot of
    the fractions. ``static`` and ``local`` round rank by rank, and over R ranks these
    roundings add up, about ``sqrt(R)`` tokens per slot, as much as the imbalance being
    removed at decode batch sizes; ``global`` rounds all ranks' tokens as one batch. This
    model applies the op's arithmetic the same way, so it equals the sum of the ranks'
    ``map_and_count`` counts (float32 shares computed in one batch, as here, can differ from
    the op's in the last bit; a boundary then moves by one token).

    Args:
        layout: the layout in service.
        rank_counts: [R, L, E] whole tokens routed by each rank ([L, E]: one rank).
        dispatch: ``static``, ``local``, ``node`` or ``global`` (global: the shares
            water-filled on the all-rank counts and the whole tokens apportioned once over
            all ranks' tokens, numbered rank after rank, with rank 0's seed, as the Router
            does; node: the same within each node, with the node's first rank's seed).
        seeds: [R] integer dither seed of each rank's op (``routing.dither_seed``);
            None: rank ``r`` uses seed ``r``.
        iters: water-fill sweeps (``local``/``node``/``global``).
    Returns:
        [L, P] float64 whole numbers.
    """
    from eplb_plugin.kernels.reference import apportion, dither

    check_dispatch(dispatch)
    counts = _check_rank_counts(layout, rank_counts)
    if not torch.equal(counts, counts.round()):
        raise ValueError("rank_counts must be whole numbers of tokens")
    ranks = counts.shape[0]
    seeds = torch.arange(ranks) if seeds is None else torch.as_tensor(seeds)
    if seeds.shape != (ranks,) or seeds.is_floating_point() or seeds.dtype == torch.bool:
        raise ValueError(f"seeds must be {ranks} integers, one per rank, got {seeds!r}")
    source = WATERFILL_COUNTS[dispatch]
    if source is None:
        share = layout.replica_share.to(torch.float32).expand(ranks, -1, -1)
    elif source == "all":  # one batch of all ranks' tokens
        counts, seeds, ranks = counts.sum(0, keepdim=True), seeds[:1], 1
        share = dispatch_shares(layout, counts, iters)
    elif source == "node":  # one batch per node, with its first rank's seed
        node = node_of_rank(layout, ranks)
        first = torch.cat([torch.ones(1, dtype=torch.bool), node[1:] != node[:-1]])
        counts, seeds = _node_sums(layout, counts), seeds[first]
        ranks = counts.shape[0]
        share = dispatch_shares(layout, counts, iters)
    else:
        share = dispatch_shares(layout, counts, iters)
    experts = layout.num_experts
    u = torch.stack([dither(experts, int(seed), torch.device("cpu")) for seed in seeds])
    lead = (ranks, layout.num_layers)
    bounds = apportion(
        counts.to(torch.int64), layout.log2phy.expand(*lead, -1, -1),
        layout.logcnt.expand(*lead, -1), share.contiguous(), u.unsqueeze(1).expand(*lead, -1),
    )  # fmt: skip  # [R, L, E, X]
    per_replica = bounds - torch.nn.functional.pad(bounds[..., :-1], (1, 0))
    in_use = torch.arange(bounds.shape[-1]) < layout.logcnt.unsqueeze(-1)  # [L, E, X]
    per_replica = torch.where(in_use, per_replica, 0).sum(0).flatten(1).double()
    loads = torch.zeros(layout.num_layers, layout.num_slots, dtype=torch.float64)
    return loads.scatter_add_(1, layout.log2phy.clamp(min=0).flatten(1), per_replica)


def gpu_loads_of(layout: ExpertLayout, loads: torch.Tensor) -> torch.Tensor:
    """[..., L, P] slot loads -> [..., L, G] load per GPU."""
    return loads.unflatten(-1, (layout.topology.num_gpus, layout.topology.slots_per_gpu)).sum(-1)
