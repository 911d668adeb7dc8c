"""Token exchange between EP ranks: dispatch tokens to the ranks holding their slots, and back.

Two backends with one contract (DeepEP's normal-mode semantics):

- ``TorchAllToAll``: ``torch.distributed.all_to_all_single`` with split sizes (gloo on CPU,
  NCCL on GPU); each token is sent once to every rank that holds at least one of its slots.
- ``DeepEPAllToAll``: ``deep_ep.Buffer.dispatch`` / ``combine`` (CUDA only, imported lazily).

``dispatch`` returns, for the receiving rank, the tokens it must serve with their local slot ids
([M, K], the sentinel ``slots_per_rank`` where the slot lives elsewhere) and top-k weights (zero
at sentinels): exactly what a transformers experts module with ``_is_expert_parallel = True``
takes. ``combine`` returns each token's sum of the partial outputs it was sent for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from eplb_plugin.comm.deepep import DEEPEP_RANK_COUNTS


@dataclass
class DispatchHandle:
    """What ``combine`` needs to send outputs back: row order and split sizes of the dispatch."""

    token: torch.Tensor  # [M_send] int64 source row of every sent row
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int


def route_to_ranks(
    slot: torch.Tensor, weight: torch.Tensor, slots_per_rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Rows to send, grouped by destination rank (pure, no communication).

    Args:
        slot: [N, K] int64 physical slot of each (token, k).
        weight: [N, K] float top-k weights.
        slots_per_rank: S, slots held by each rank (slot p lives on rank p // S).
        world_size: W.
    Returns:
        token [M] int64 source row of each sent row, ordered by destination rank;
        local_ids [M, K] int64 slot ids local to the destination, S where not held there;
        local_weight [M, K] weights, 0 where not held there;
        splits: W ints, rows sent to each rank.
    """
    num_tokens = slot.shape[0]
    dest = torch.div(slot, slots_per_rank, rounding_mode="floor")  # [N, K]
    present = torch.zeros(world_size, num_tokens, dtype=torch.bool, device=slot.device)
    if num_tokens:
        ranks = torch.arange(world_size, device=slot.device).view(-1, 1, 1)
        present = (dest.unsqueeze(0) == ranks).any(-1)  # [W, N]
    pairs = present.nonzero()  # row-major: by rank, then token
    rank_of_row, token = pairs[:, 0], pairs[:, 1]
    on_dest = dest[token] == rank_of_row.unsqueeze(1)  # [M, K]
    local_ids = torch.where(
        on_dest, slot[token] - rank_of_row.unsqueeze(1) * slots_per_rank, slots_per_rank
    )
    local_weight = torch.where(on_dest, weight[token], torch.zeros_like(weight[token]))
    splits = present.sum(1).tolist()
    return token, local_ids, local_weight, splits


class TorchAllToAll:
    """Dispatch/combine with ``all_to_all_single`` and uneven split sizes."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, slots_per_rank: int):
        self.group = group
        self.world_size = world_size
        self.slots_per_rank = slots_per_rank

    def dispatch(self, hidden: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor):
        """Send tokens to the ranks holding their slots.

        Args:
            hidden: [N, H] this rank's tokens.
            slot: [N, K] int64 physical slots.
            weight: [N, K] top-k weights.
        Returns:
            (x [M, H], local ids [M, K] int64, weights [M, K], handle) of the received rows.
        """
        token, ids, w, send = route_to_ranks(slot, weight, self.slots_per_rank, self.world_size)
        send_t = torch.tensor(send, dtype=torch.int64, device=hidden.device)
        recv_t = torch.empty_like(send_t)
        dist.all_to_all_single(recv_t, send_t, group=self.group)
        recv = recv_t.tolist()
        total = sum(recv)
        recv_x = self._exchange(hidden[token], total, recv, send)
        recv_ids = self._exchange(ids, total, recv, send)
        recv_w = self._exchange(w, total, recv, send)
        return recv_x, recv_ids, recv_w, DispatchHandle(token, send, recv, hidden.shape[0])

    def combine(self, out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """out [M_recv, H] partial outputs -> [N, H] per-token sums of partials."""
        back = self._exchange(out, len(handle.token), handle.send_splits, handle.recv_splits)
        result = torch.zeros(handle.num_tokens, out.shape[1], dtype=out.dtype, device=out.device)
        return result.index_add_(0, handle.token, back)

    def _exchange(self, x: torch.Tensor, total: int, out_splits: list[int], in_splits: list[int]):
        out = torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        return out


class LocalExchange:
    """One rank and no process group: dispatch and combine without communication."""

    name = "local"

    def __init__(self, slots_per_rank: int):
        self.slots_per_rank = slots_per_rank

    def dispatch(self, hidden: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor):
        token, ids, w, splits = route_to_ranks(slot, weight, self.slots_per_rank, 1)
        return hidden[token], ids, w, DispatchHandle(token, splits, splits, hidden.shape[0])

    def combine(self, out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        result = torch.zeros(handle.num_tokens, out.shape[1], dtype=out.dtype, device=out.device)
        return result.index_add_(0, handle.token, out)


class DeepEPAllToAll:
    """Dispatch/combine through DeepEP's normal mode (CUDA + NVSHMEM; imported lazily).

    Expert ids passed to DeepEP are physical slots: the logical->physical mapping is done
    before dispatch, as DeepEP expects. Its calls are checked against DeepEP's sources
    (tests/test_deepep_conformance.py) and run on a CPU stand-in of ``deep_ep``; not on GPUs.
    """

    name = "deepep"

    def __init__(
        self, group: dist.ProcessGroup, world_size: int, slots_per_rank: int, hidden_bytes: int
    ):
        from deep_ep import Buffer  # optional, CUDA only

        self.world_size = world_size
        self.slots_per_rank = slots_per_rank
        self.num_slots = slots_per_rank * world_size
        # DeepEP's own sizing rule: the larger of the dispatch and combine hints
        nvl, rdma = 0, 0
        for config in (
            Buffer.get_dispatch_config(world_size),
            Buffer.get_combine_config(world_size),
        ):
            nvl = max(nvl, config.get_nvl_buffer_size_hint(hidden_bytes, world_size))
            rdma = max(rdma, config.get_rdma_buffer_size_hint(hidden_bytes, world_size))
        self.buffer = Buffer(group, nvl, rdma)

    def dispatch(self, hidden: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor):
        """Same contract as ``TorchAllToAll.dispatch``; rows travel in bf16 (DeepEP's
        normal-mode dtype), so float32 activations are rounded on the way."""
        self.dtype = hidden.dtype
        hidden = hidden.to(torch.bfloat16)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(
            slot, self.num_slots
        )
        recv_x, recv_idx, recv_w, _, handle, _ = self.buffer.dispatch(
            hidden,
            topk_idx=slot,
            topk_weights=weight.float(),
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
        )
        # DeepEP marks slots held elsewhere with -1; transformers' EP sentinel is S
        sentinel = recv_idx < 0
        recv_idx = torch.where(sentinel, self.slots_per_rank, recv_idx)
        recv_w = torch.where(sentinel, torch.zeros_like(recv_w), recv_w).to(weight.dtype)
        return recv_x.to(self.dtype), recv_idx, recv_w, handle

    def combine(self, out: torch.Tensor, handle) -> torch.Tensor:
        combined, _, _ = self.buffer.combine(out.to(torch.bfloat16), handle)
        return combined.to(self.dtype)


def make_communicator(
    backend: str,
    group: dist.ProcessGroup | None,
    world_size: int,
    slots_per_rank: int,
    hidden: int,
    device: torch.device,
):
    """``backend``: "torch", "deepep", or "auto" (DeepEP when on CUDA, importable, and the EP
    size is one DeepEP has a config for: ``DEEPEP_RANK_COUNTS``).

    An explicit "deepep" is taken on any device (DeepEP itself refuses what it cannot run;
    the tests use a CPU stand-in of ``deep_ep``).

    A single rank without an initialized process group exchanges nothing (``LocalExchange``).
    """
    if backend not in ("auto", "torch", "deepep"):
        raise ValueError(f"comm backend={backend!r} must be one of auto, torch, deepep")
    if world_size == 1 and not (dist.is_available() and dist.is_initialized()):
        if backend == "deepep":
            raise ValueError("comm backend='deepep' needs an initialized process group")
        return LocalExchange(slots_per_rank)
    if backend == "auto":
        usable = device.type == "cuda" and world_size in DEEPEP_RANK_COUNTS
        backend = "deepep" if usable and _deep_ep_available() else "torch"
    if backend == "deepep":
        if group is None:
            group = dist.group.WORLD
        if world_size not in DEEPEP_RANK_COUNTS:
            raise ValueError(
                f"comm backend='deepep': DeepEP has no dispatch config for {world_size} ranks "
                f"(it has for {', '.join(map(str, DEEPEP_RANK_COUNTS))}); use 'torch'"
            )
        # rows travel in bf16 whatever the activations' dtype: 2 bytes per hidden element
        return DeepEPAllToAll(group, world_size, slots_per_rank, hidden * 2)
    return TorchAllToAll(group, world_size, slots_per_rank)


def _deep_ep_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deep_ep") is not None
