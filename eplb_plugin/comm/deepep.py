"""``DeepEPCommunicator``: weight bytes through DeepEP's normal-mode ``Buffer.dispatch``.

DeepEP (deepseek-ai/DeepEP) moves tokens between EP ranks over NVLink / RDMA; an engine that
already holds a ``deep_ep.Buffer`` can move expert weights through the same buffer instead
of a second communication stack. Each rank's outgoing bytes are cut into rows (``row_bytes``,
a 16-byte header naming the source rank and row, then payload) sent as bf16 "tokens" whose
single top-k "expert" is the destination rank (``num_experts = world_size``); the header makes
the receiver independent of the order in which rows arrive.

``deep_ep`` is imported lazily: it needs CUDA GPUs and NVSHMEM and cannot be installed on the
CPU machines this project is tested on. The tests run this backend against
``tests/fakes/deep_ep.py``, a stand-in that follows DeepEP's documented ``Buffer`` API on top
of ``torch.distributed``; it has never run against the real library. Control collectives
(votes, plans, load counts) stay on ``torch.distributed``, as DeepEP offers none.
"""

from __future__ import annotations

import importlib

import torch

from .base import CommError, check_splits
from .torch_dist import TorchCommunicator

HEADER_BYTES = 16
DEFAULT_ROW_BYTES = 8192
DEFAULT_NVL_BYTES = 1 << 30


def import_deep_ep():
    """The ``deep_ep`` module, or a ValueError that says why it is missing."""
    try:
        return importlib.import_module("deep_ep")
    except ImportError as exc:
        raise ValueError(
            "communicator='deepep' needs DeepEP (`import deep_ep` failed: "
            f"{exc}); it requires CUDA GPUs and NVSHMEM. Use communicator='torch' otherwise."
        ) from exc


class DeepEPCommunicator(TorchCommunicator):
    """Communicator whose byte exchanges go through a ``deep_ep.Buffer``.

    Args:
        group: EP process group (the Buffer's group).
        timeout_s: timeout of the torch control collectives (DeepEP kernels time out on
            their own, after about 100 s, by aborting).
        buffer: an existing ``deep_ep.Buffer`` of the engine (default: a new one of
            ``num_nvl_bytes``).
        row_bytes: bytes per dispatched row, a multiple of 16 (bf16 rows of ``row_bytes/2``
            elements; DeepEP needs the hidden size's bytes to be 16-aligned).
        num_nvl_bytes: NVLink buffer size when creating the Buffer.
        control_group: group for votes and broadcasts (default: ``group``).
    """

    def __init__(
        self,
        group: object | None = None,
        timeout_s: float = 60.0,
        buffer: object | None = None,
        row_bytes: int = DEFAULT_ROW_BYTES,
        num_nvl_bytes: int = DEFAULT_NVL_BYTES,
        control_group: object | None = None,
    ) -> None:
        super().__init__(group, timeout_s, control_group)
        if row_bytes % 16 or row_bytes <= HEADER_BYTES:
            raise ValueError(
                f"row_bytes must be a multiple of 16 larger than {HEADER_BYTES}, got {row_bytes}"
            )
        deep_ep = import_deep_ep()
        self.row_bytes = row_bytes
        self.buffer = buffer if buffer is not None else deep_ep.Buffer(self.group, num_nvl_bytes)

    def all_to_all(self, send, send_splits, recv, recv_splits) -> None:
        check_splits("send", send, send_splits, self.world_size)
        check_splits("recv", recv, recv_splits, self.world_size)
        self._check_usable()
        try:
            self._exchange(send, send_splits, recv, recv_splits)
        except CommError:
            self.broken = True
            raise
        except Exception as exc:
            self.broken = True
            raise CommError(f"rank {self.rank}: DeepEP dispatch failed: {exc}") from exc

    def _exchange(self, send, send_splits, recv, recv_splits) -> None:
        payload = self.row_bytes - HEADER_BYTES
        rows_to = [-(-n // payload) for n in send_splits]
        num_rows = sum(rows_to)
        x = torch.zeros(num_rows, self.row_bytes // 2, dtype=torch.bfloat16, device=send.device)
        table = x.view(torch.uint8)
        header = torch.empty(num_rows, 2, dtype=torch.int64)
        dst = torch.empty(num_rows, 1, dtype=torch.int64)
        row, start = 0, 0
        for d, n in enumerate(send_splits):
            for i in range(rows_to[d]):
                chunk = send[start + i * payload : start + min((i + 1) * payload, n)]
                table[row, HEADER_BYTES : HEADER_BYTES + chunk.numel()].copy_(chunk)
                header[row, 0], header[row, 1] = self.rank, i
                dst[row, 0] = d
                row += 1
            start += n
        if num_rows:
            table[:, :HEADER_BYTES].copy_(header.view(torch.uint8).view(num_rows, HEADER_BYTES))
        topk_idx = dst.to(send.device)
        weights = torch.ones(num_rows, 1, dtype=torch.float32, device=send.device)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(
            topk_idx, self.world_size
        )
        recv_x, _, _, _, _, event = self.buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=weights,
        )
        if event is not None and hasattr(event, "current_stream_wait"):
            event.current_stream_wait()
        got = recv_x.view(torch.uint8).view(-1, self.row_bytes)
        heads = got[:, :HEADER_BYTES].contiguous().view(torch.int64).view(-1, 2).cpu()
        starts = [sum(recv_splits[:s]) for s in range(self.world_size)]
        for s, n in enumerate(recv_splits):
            want = -(-n // payload)
            mine = (heads[:, 0] == s).nonzero().flatten()
            order = heads[mine, 1]
            if mine.numel() != want or not torch.equal(order.sort().values, torch.arange(want)):
                raise CommError(
                    f"rank {self.rank}: expected {want} rows from rank {s}, got rows "
                    f"{order.tolist()[:8]}"
                )
            if n:
                rows = got[mine[order.argsort()].to(got.device), HEADER_BYTES:]
                recv[starts[s] : starts[s] + n].copy_(rows.reshape(-1)[:n])


__all__ = ["DeepEPCommunicator", "import_deep_ep"]
