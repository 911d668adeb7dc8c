"""The one routing path: a layer's logical ``topk_ids`` -> physical slots, counted per slot.

Every engine routes through :class:`Router` (``Balancer.route``, the vLLM and SGLang custom
ops, the transformers EP layers), so the dispatch modes (``docs/dispatch.md``) are written
once:

- ``static`` and ``local``: one call of the device op ``eplb_plugin.kernels.map_and_count``;
- ``global``: the layer's per-expert counts (a masked ``index_add_``, no host sync) are
  exchanged between the EP ranks through the Communicator (one all-reduce of an [R, E + 1]
  table holding each rank's row, ``Communicator.route_all_reduce``: in stream order on the
  byte-exchange group, no host wait), water-filled into replica shares
  from the all-rank counts, and the op splits this rank's tokens by them as a static split,
  numbering them after the lower ranks' (``offsets``/``totals``): the apportionment to whole
  tokens is then made once for all ranks, with rank 0's seed;
- ``node``: the same within each node, over a communicator of the node's ranks
  (``Communicator.split``, made when the Router is built): the all-reduce never leaves the
  node.

A Router keeps its buffers between calls (the op's workspace, grown to the largest batch
seen, and global dispatch's share rows), so steady-state routing allocates nothing.
"""

from __future__ import annotations

import torch

from .dispatch import WATERFILL_COUNTS, WATERFILL_ITERS, check_dispatch, exchanges_counts
from .maps import ExpertMaps

# Dither seeds live in [0, 2^20): exact in float32, where the op combines them.
SEED_MODULUS = 1 << 20


def dither_seed(base: int, step: int, rank: int, ranks: int) -> int:
    """The op's dither seed for ``rank`` of ``ranks`` at engine step ``step``.

    Different per rank and step so that rounding errors do not pile onto one replica; pass
    ``rank=0, ranks=1`` where every rank routes the same tokens and must agree.
    """
    return (base * 7919 + step * ranks + rank) % SEED_MODULUS


class Router:
    """Maps and counts one layer's routing for a fixed dispatch mode.

    Args:
        dispatch: ``static``, ``local``, ``node`` or ``global``.
        comm: the EP ranks' Communicator (``global`` dispatch all-reduces through it,
            ``node`` through its split into nodes; None or a one-rank communicator means a
            single rank).
        validate: passed to ``map_and_count`` (``None``: check id values on CPU tensors).
        iters: water-fill sweeps of ``local``/``node``/``global`` dispatch
            (``EplbConfig.waterfill_iters``).
        rank_invariant: every rank routes the same tokens (and passes the same seed), so
            they must map them alike: ``global`` dispatch then sums the ranks' counts and
            each rank apportions its tokens alone, instead of numbering them after the lower
            ranks'.
        gpus_per_node: EP ranks per node (``Topology.gpus_per_node``; consecutive ranks
            share a node); ``node`` dispatch needs it when ``comm`` has several ranks.
            Building a ``node`` Router is then collective: every rank builds it, in the same
            order.
    """

    def __init__(
        self,
        dispatch: str,
        comm: object | None = None,
        *,
        validate: bool | None = None,
        rank_invariant: bool = False,
        iters: int = WATERFILL_ITERS,
        gpus_per_node: int | None = None,
    ):
        self.dispatch = check_dispatch(dispatch)
        if WATERFILL_COUNTS[self.dispatch] == "node" and comm is not None and comm.world_size > 1:
            if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int):
                raise ValueError(
                    f"node dispatch needs gpus_per_node (EP ranks per node), got {gpus_per_node!r}"
                )
            comm = comm.split(gpus_per_node)
        self.comm = comm
        self.validate = validate
        self.rank_invariant = rank_invariant
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be a positive integer, got {iters!r}")
        self.iters = iters
        # Workspaces are only ever added: a CUDA graph captured with an older (smaller) one
        # keeps its pointer, so it must stay allocated.
        self._workspaces: list[torch.Tensor] = []
        self._shares: dict[tuple, torch.Tensor] = {}

    def __call__(
        self,
        topk_ids: torch.Tensor,
        maps: ExpertMaps,
        counts: torch.Tensor,
        layer: int,
        num_valid: torch.Tensor | int | None = None,
        *,
        seed: torch.Tensor | int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logical ``topk_ids`` [N, K] -> physical slots [N, K] (dtype of ``topk_ids``).

        Args:
            topk_ids: [N, K] int32/int64 logical expert ids; -1 passes through uncounted.
            maps: the maps in force (whole model, or a one-layer view with ``layer=0``).
            counts: [L, P] int32; row ``layer`` grows by this call's per-slot counts.
            layer: row of ``maps`` and ``counts``.
            num_valid: 0-dim integer device tensor or int; rows at or past it are padding
                (mapped, not counted). None: every row counts.
            seed: dither seed (0-dim int64 device tensor, int, or None = 0).
            out: [N, K] like ``topk_ids`` to write into.
        """
        from eplb_plugin.kernels import map_and_count

        if num_valid is None:
            num_valid = topk_ids.shape[0]
        share, dispatch = maps.replica_share, self.dispatch
        offsets = totals = None
        if exchanges_counts(dispatch):  # the op splits by the shares it is given
            share, offsets, totals, seed = self._global_split(
                topk_ids, maps, layer, num_valid, seed
            )
            dispatch = "static"
        return map_and_count(
            topk_ids, maps.log2phy, maps.logcnt, share, counts, layer, num_valid,
            dispatch=dispatch, phy2log=maps.phy2log, slots_per_gpu=maps.slots_per_gpu,
            seed=seed, out=out, workspace=self._workspace(topk_ids, maps.num_experts),
            waterfill_iters=self.iters, validate=self.validate, offsets=offsets,
            totals=totals,
        )  # fmt: skip

    def _workspace(self, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
        from eplb_plugin.kernels import map_and_count_workspace_size

        needed = map_and_count_workspace_size(*topk_ids.shape, num_experts)
        ws = self._workspaces[-1] if self._workspaces else None
        if ws is None or ws.numel() < needed or ws.device != topk_ids.device:
            ws = torch.empty(needed, dtype=torch.int32, device=topk_ids.device)
            self._workspaces.append(ws)
        return ws

    def _global_split(
        self,
        topk_ids: torch.Tensor,
        maps: ExpertMaps,
        layer: int,
        num_valid: torch.Tensor | int,
        seed: torch.Tensor | int | None,
    ) -> tuple:
        """What the op needs to split this rank's tokens as one batch of all ranks' (of
        the node's, ``node`` dispatch: ``self.comm`` is then the node's communicator).

        Returns ``(share, offsets, totals, seed)``: [L, P] float32 shares whose row
        ``layer`` is water-filled from every rank's counts of this layer (other rows are
        stale: the op reads only row ``layer``); [E] int64 valid entries of the lower ranks
        and of all ranks per expert, and rank 0's seed (0-dim int64), or None, None and
        ``seed`` on one rank.

        Collective: every rank must route every layer, in the same order.
        """
        # the fused Triton water-fill where Triton runs, the torch reference otherwise
        from eplb_plugin.kernels.waterfill_fused import waterfill

        num_experts = maps.num_experts
        ids = topk_ids.to(torch.int64)
        rows = torch.arange(ids.shape[0], device=ids.device)
        known = (rows < num_valid).unsqueeze(1) & (ids >= 0) & (ids < num_experts)
        expert_counts = torch.zeros(num_experts, dtype=torch.float32, device=ids.device)
        expert_counts.index_add_(
            0, ids.clamp(0, num_experts - 1).reshape(-1), known.reshape(-1).to(torch.float32)
        )
        offsets = totals = None
        if self.comm is not None and self.comm.world_size > 1 and self.rank_invariant:
            self.comm.route_all_reduce(expert_counts)
        elif self.comm is not None and self.comm.world_size > 1:
            # one row per rank: counts, then the seed (exact in float32 below 2^24)
            rank, ranks = self.comm.rank, self.comm.world_size
            table = torch.zeros(ranks, num_experts + 1, dtype=torch.float32, device=ids.device)
            table[rank, :num_experts] = expert_counts
            if isinstance(seed, torch.Tensor):
                table[rank, num_experts] = seed.to(device=ids.device, dtype=torch.float32)
            elif seed is not None:
                table[rank, num_experts] = float(seed)
            self.comm.route_all_reduce(table)
            expert_counts = table[:, :num_experts].sum(0)
            offsets = table[:rank, :num_experts].sum(0).to(torch.int64)
            totals = expert_counts.to(torch.int64)
            seed = table[0, num_experts].to(torch.int64)
        one = slice(layer, layer + 1)
        water = waterfill(
            expert_counts.unsqueeze(0).to(maps.device), maps.phy2log[one], maps.log2phy[one],
            maps.logcnt[one], maps.slots_per_gpu, maps.replica_share[one], self.iters,
        )  # fmt: skip
        key = (tuple(maps.replica_share.shape), maps.device)
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = maps.replica_share.clone()
        share[layer] = water[0]
        return share, offsets, totals, seed


__all__ = ["Router", "SEED_MODULUS", "dither_seed"]
