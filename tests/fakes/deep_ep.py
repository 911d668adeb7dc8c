"""A CPU stand-in for DeepEP's ``deep_ep`` module (normal, intranode mode only), for tests.

It follows the documented Python API of ``deep_ep.Buffer`` (deepseek-ai/DeepEP,
``deep_ep/buffer.py``): the constructor, ``get_dispatch_layout``, ``dispatch`` (non-cached and
cached with a handle) and ``combine``, with the same argument names, dtypes, return tuples and
the checks the real code asserts (bf16 ``x`` of shape [num_tokens, hidden] with 16-byte rows,
int64 ``topk_idx`` with -1 for no selection, layout tensors required without a handle).
Underneath, tokens travel with ``torch.distributed.all_to_all_single`` on the Buffer's group,
so it runs on gloo. Received tokens come rank by rank, in token order within a rank.

Not covered: low-latency mode, internode (RDMA) mode, events and async finish (every op is
synchronous; the returned ``EventOverlap`` is a no-op), FP8 ``x`` tuples.

Use: put ``tests/fakes`` first on ``sys.path`` in the process that imports ``deep_ep``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FAKE = True  # lets tests assert they run against this stand-in


class EventOverlap:
    """No-op stand-in for DeepEP's CUDA event wrapper."""

    def __init__(self, event=None, extra_tensors=None) -> None:
        self.event = event

    def current_stream_wait(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class Config:
    def __init__(self, *args) -> None:
        self.args = args


class Buffer:
    """``deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, ...)``."""

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 12,
        allow_nvlink_for_low_latency_mode: bool = True,
    ) -> None:
        if low_latency_mode:
            raise NotImplementedError("the fake deep_ep covers normal mode only")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.dispatch_calls = 0

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """-> (num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32,
        is_token_in_rank [N, R] bool, event)."""
        assert topk_idx.dim() == 2 and topk_idx.dtype == torch.int64
        assert num_experts % self.group_size == 0
        per_rank_experts = num_experts // self.group_size
        valid = topk_idx >= 0
        ranks = torch.where(valid, topk_idx // per_rank_experts, -1)
        is_token_in_rank = torch.zeros(topk_idx.shape[0], self.group_size, dtype=torch.bool)
        for r in range(self.group_size):
            is_token_in_rank[:, r] = (ranks == r).any(1)
        num_tokens_per_rank = is_token_in_rank.sum(0).to(torch.int32)
        num_tokens_per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(
            torch.int32
        )
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, EventOverlap()

    # ------------------------------------------------------------------ dispatch
    def _exchange(self, rows: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list]:
        counts = torch.tensor(send_counts, dtype=torch.int64)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.tolist()
        out = torch.empty((sum(recv_counts),) + tuple(rows.shape[1:]), dtype=rows.dtype)
        self._bytes_exchange(out, rows, recv_counts, send_counts)
        return out, recv_counts

    def _bytes_exchange(self, out, rows, recv_counts, send_counts) -> None:
        row_bytes = 1
        for size in rows.shape[1:]:
            row_bytes *= size
        row_bytes *= rows.element_size()
        dist.all_to_all_single(
            out.view(torch.uint8).view(-1),
            rows.contiguous().view(torch.uint8).view(-1),
            [c * row_bytes for c in recv_counts],
            [c * row_bytes for c in send_counts],
            group=self.group,
        )

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        topk_idx=None,
        topk_weights=None,
        expert_alignment: int = 1,
        config=None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)."""
        if isinstance(x, tuple):
            raise NotImplementedError("the fake deep_ep does not take FP8 (x, scales) tuples")
        assert x.dim() == 2 and x.dtype == torch.bfloat16, "x must be [num_tokens, hidden] bf16"
        assert (x.shape[1] * x.element_size()) % 16 == 0, "hidden bytes must be 16-aligned"
        self.dispatch_calls += 1
        if handle is not None:
            assert topk_idx is None and topk_weights is None
            is_token_in_rank = handle[4]
        else:
            assert (
                num_tokens_per_rank is not None
                and is_token_in_rank is not None
                and num_tokens_per_expert is not None
            )
            assert topk_idx is not None and topk_idx.dtype == torch.int64
        order, send_counts = [], []
        for r in range(self.group_size):
            idx = is_token_in_rank[:, r].nonzero().flatten()
            order.append(idx)
            send_counts.append(idx.numel())
        order = torch.cat(order) if order else torch.empty(0, dtype=torch.int64)
        recv_x, recv_counts = self._exchange(x[order], send_counts)
        rank_prefix = torch.tensor(recv_counts).cumsum(0)
        src_idx, _ = self._exchange(order.view(-1, 1), send_counts)
        new_handle = (rank_prefix, None, None, src_idx.view(-1), is_token_in_rank, order)
        if handle is not None:
            return recv_x, None, None, None, None, EventOverlap()
        recv_topk_idx = recv_topk_weights = None
        num_local = num_tokens_per_expert.numel() // self.group_size
        recv_list = [0] * num_local
        ids, _ = self._exchange(topk_idx[order], send_counts)
        local = ids - self.rank * num_local
        ok = (ids >= 0) & (local >= 0) & (local < num_local)
        recv_topk_idx = torch.where(ok, local, torch.full_like(local, -1))
        if topk_weights is not None:
            weights, _ = self._exchange(topk_weights[order].float(), send_counts)
            recv_topk_weights = torch.where(ok, weights, torch.zeros_like(weights))
        for e in range(num_local):
            n = int((recv_topk_idx == e).any(1).sum())
            recv_list[e] = -(-n // expert_alignment) * expert_alignment
        return recv_x, recv_topk_idx, recv_topk_weights, recv_list, new_handle, EventOverlap()

    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: torch.Tensor | None = None,
        config=None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send received rows back to their source tokens and sum them:
        -> (combined_x, combined_topk_weights, event)."""
        rank_prefix, _, _, src_idx, is_token_in_rank, order = handle
        recv_counts = torch.diff(rank_prefix, prepend=torch.zeros(1, dtype=rank_prefix.dtype))
        back, _ = self._exchange(x, recv_counts.tolist())
        num_tokens = is_token_in_rank.shape[0]
        combined = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32)
        combined.index_add_(0, order, back.float())
        combined_weights = None
        if topk_weights is not None:
            w, _ = self._exchange(topk_weights, recv_counts.tolist())
            combined_weights = torch.zeros(num_tokens, w.shape[1], dtype=w.dtype)
            combined_weights.index_add_(0, order, w)
        return combined.to(x.dtype), combined_weights, EventOverlap()

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        raise NotImplementedError("the fake deep_ep has no registered buffer memory")
