"""A CPU stand-in for DeepEP's ``deep_ep`` module (normal, intranode mode only), for tests.

Its signatures are DeepEP's own: ``tests/test_deepep_conformance.py`` checks every public method
here against the sources of the pinned wheel (``bash .ci/deepep_wheel.sh``; ``sgl-deep-ep``
0.1.2.post1, DeepEP 2.1.0, ``deep_ep/buffers/legacy.py`` and ``deep_ep/utils/event.py``): same
parameter names, order and defaults, same return arity. Behaviour follows what those sources
state: bf16 ``x`` of shape [num_tokens, hidden] with 16-byte rows, int64 ``topk_idx`` with -1
for no selection, layout tensors required without a handle, a recommended ``Config`` only for
DeepEP's supported rank counts, and an ``EventOverlap`` whose event is set only with
``async_finish=True`` (``current_stream_wait`` on the others fails, as DeepEP's asserts).
Underneath, tokens travel with ``torch.distributed.all_to_all_single`` on the Buffer's group,
so it runs on gloo. Received tokens come rank by rank, in token order within a rank.

Not covered: low-latency mode, internode (RDMA) mode, ``num_worst_tokens``, FP8 ``x`` tuples
(each refused with NotImplementedError); every op is synchronous. ``Config``'s size hints are
a stand-in formula, not DeepEP's (which is compiled C++).

Use: put ``tests/fakes`` first on ``sys.path`` in the process that imports ``deep_ep``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FAKE = True  # lets tests assert they run against this stand-in

# the rank counts of DeepEP's recommended configs (Buffer.get_dispatch_config's config_map)
_CONFIG_RANKS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)
_NUM_MAX_NVL_PEERS = 8


class _DoneEvent:
    """What an ``async_finish`` op's ``EventOverlap.event`` holds: here, already complete."""

    def current_stream_wait(self) -> None:
        pass


class EventOverlap:
    """DeepEP's CUDA event wrapper (``deep_ep/utils/event.py``): ``event`` is None unless the
    op ran with ``async_finish=True``, and waiting on a None event fails, as in DeepEP."""

    def __init__(self, event=None, extra_tensors=None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self, release_handle: bool = False) -> None:
        assert self.event is not None
        self.event.current_stream_wait()
        if release_handle:
            self.event = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            self.current_stream_wait()


def _check_torch_deterministic() -> None:
    # as DeepEP's dispatch and combine (deep_ep/utils/envs.py): torch.empty would launch a
    # fill kernel that can overlap DeepEP's communication stream
    assert not (
        torch.are_deterministic_algorithms_enabled()
        and torch.utils.deterministic.fill_uninitialized_memory
    )


def _event(async_finish: bool) -> EventOverlap:
    return EventOverlap(_DoneEvent() if async_finish else None)


class Config:
    """``deep_ep.Config`` (C++ in DeepEP): five positional ints, and buffer size hints."""

    def __init__(
        self,
        num_sms,
        num_max_nvl_chunked_send_tokens,
        num_max_nvl_chunked_recv_tokens,
        num_max_rdma_chunked_send_tokens,
        num_max_rdma_chunked_recv_tokens,
    ) -> None:
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        # stand-in: one chunk of rows per channel and NVLink peer (DeepEP adds metadata)
        peers = min(num_ranks, _NUM_MAX_NVL_PEERS)
        return self.num_sms // 2 * peers * self.num_max_nvl_chunked_recv_tokens * hidden_bytes

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        if num_ranks <= _NUM_MAX_NVL_PEERS:
            return 0  # intranode: no RDMA buffer
        nodes = num_ranks // _NUM_MAX_NVL_PEERS
        return self.num_sms // 2 * nodes * self.num_max_rdma_chunked_recv_tokens * hidden_bytes


class Buffer:
    """``deep_ep.Buffer`` (``deep_ep/buffers/legacy.py``), normal intranode mode."""

    num_sms: int = 20

    def __init__(
        self,
        group,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric=None,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm=None,
    ) -> None:
        if low_latency_mode:
            raise NotImplementedError("the fake deep_ep covers normal mode only")
        if group is None:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        if self.group_size > _NUM_MAX_NVL_PEERS:
            raise NotImplementedError("the fake deep_ep covers intranode mode only")
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.dispatch_calls = 0

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        assert num_ranks in _CONFIG_RANKS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        assert num_ranks in _CONFIG_RANKS, f"Unsupported number of EP ranks: {num_ranks}"
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
        event = _event(async_finish)
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, event

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
        num_worst_tokens: int = 0,
        config=None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)."""
        if isinstance(x, tuple):
            raise NotImplementedError("the fake deep_ep does not take FP8 (x, scales) tuples")
        if num_worst_tokens:
            raise NotImplementedError("the fake deep_ep does not take num_worst_tokens")
        _check_torch_deterministic()
        config = self.get_dispatch_config(self.group_size) if config is None else config
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
            return recv_x, None, None, None, None, _event(async_finish)
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
        event = _event(async_finish)
        return recv_x, recv_topk_idx, recv_topk_weights, recv_list, new_handle, event

    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: torch.Tensor | None = None,
        bias=None,
        config=None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send received rows back to their source tokens and sum them, plus ``bias`` (one
        [num_tokens, hidden] tensor or a pair): -> (combined_x, combined_topk_weights, event)."""
        _check_torch_deterministic()
        config = self.get_combine_config(self.group_size) if config is None else config
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
        for b in bias if isinstance(bias, tuple) else (bias,):
            if b is not None:
                combined += b.float()
        return combined.to(x.dtype), combined_weights, _event(async_finish)

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        raise NotImplementedError("the fake deep_ep has no registered buffer memory")
