"""``DeepEPCommunicator``: weight bytes through DeepEP's normal-mode ``Buffer.dispatch``.

DeepEP (deepseek-ai/DeepEP) moves tokens between EP ranks over NVLink / RDMA; an engine that
already holds a ``deep_ep.Buffer`` can move expert weights through the same buffer instead
of a second communication stack. Each rank's outgoing bytes are cut into rows (``row_bytes``,
a 16-byte header naming the source rank and row, then payload) sent as bf16 "tokens" whose
single top-k "expert" is the destination rank (``num_experts = world_size``); the header makes
the receiver independent of the order in which rows arrive.

Only DeepEP's normal (high-throughput) kernels are used, never the low-latency ones, and a
buffer in low-latency mode or an ``ElasticBuffer`` is refused: docs/deepep.md gives the reasons
and why ``communicator="torch"`` (NCCL) stays the default even where the engine runs DeepEP.

``deep_ep`` is imported lazily: it needs CUDA GPUs and cannot be imported on the CPU machines
this project is tested on. The calls here are checked statically against the sources of the
pinned DeepEP wheel (``tests/test_deepep_conformance.py``), and the tests run this backend on
``tests/fakes/deep_ep.py``, a stand-in with DeepEP's signatures on top of
``torch.distributed``; it has not run on GPUs. Control collectives (votes, plans, load
counts) stay on ``torch.distributed``, as DeepEP offers none.
"""

from __future__ import annotations

import importlib

import torch

from .base import CommError, check_splits
from .torch_dist import TorchCommunicator

HEADER_BYTES = 16
DEFAULT_ROW_BYTES = 8192
# the EP sizes DeepEP has a recommended Config for (the keys of Buffer.get_dispatch_config's
# and get_combine_config's config_map, deep_ep/buffers/legacy.py:245, checked by the tests);
# dispatch without an explicit config asserts the size is one of them
DEEPEP_RANK_COUNTS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)


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
        buffer: an existing normal-mode ``deep_ep.Buffer`` on ``group`` (the engine's), large
            enough for rows of ``row_bytes`` (DeepEP's size hints); default: a new Buffer sized
            by those hints.
        row_bytes: bytes per dispatched row, a multiple of 16 (bf16 rows of ``row_bytes/2``
            elements; DeepEP needs the hidden size's bytes to be 16-aligned).
        num_nvl_bytes: NVLink buffer size when creating the Buffer (default: DeepEP's hint).
        control_group: group for votes and broadcasts (default: ``group``).
    Raises:
        ValueError: DeepEP missing, an EP size DeepEP has no config for, or a buffer that is
            an ``ElasticBuffer``, in low-latency mode, or too small for ``row_bytes``.
    """

    def __init__(
        self,
        group: object | None = None,
        timeout_s: float = 60.0,
        buffer: object | None = None,
        row_bytes: int = DEFAULT_ROW_BYTES,
        num_nvl_bytes: int | None = None,
        control_group: object | None = None,
    ) -> None:
        super().__init__(group, timeout_s, control_group)
        if row_bytes % 16 or row_bytes <= HEADER_BYTES:
            raise ValueError(
                f"row_bytes must be a multiple of 16 larger than {HEADER_BYTES}, got {row_bytes}"
            )
        if self.world_size not in DEEPEP_RANK_COUNTS:
            raise ValueError(
                f"communicator='deepep': DeepEP has no dispatch config for {self.world_size} "
                f"ranks (it has for {', '.join(map(str, DEEPEP_RANK_COUNTS))}); "
                "use communicator='torch'"
            )
        deep_ep = import_deep_ep()
        self.row_bytes = row_bytes
        # DeepEP's own hints for its recommended dispatch config (the rule SGLang and DeepEP's
        # tests size buffers by; only dispatch is used here, no combine)
        config = deep_ep.Buffer.get_dispatch_config(self.world_size)
        nvl = config.get_nvl_buffer_size_hint(row_bytes, self.world_size)
        rdma = config.get_rdma_buffer_size_hint(row_bytes, self.world_size)
        if buffer is None:
            buffer = deep_ep.Buffer(
                self.group, nvl if num_nvl_bytes is None else num_nvl_bytes, rdma
            )
        else:
            check_buffer(buffer, nvl, rdma, row_bytes)
        self.buffer = buffer

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
        x, topk_idx = pack_rows(send, send_splits, self.rank, self.row_bytes)
        weights = torch.ones(x.shape[0], 1, dtype=torch.float32, device=send.device)
        # synchronous (async_finish=False): the current stream waits for DeepEP's kernels
        # (legacy.py:358), and the returned EventOverlap holds no event to wait on
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(
            topk_idx, self.world_size
        )
        recv_x, _, _, _, _, _ = self.buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=weights,
        )
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


def pack_rows(
    send: torch.Tensor, send_splits: list[int], rank: int, row_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each destination's bytes into rows of ``row_bytes``: a 16-byte header (int64 source
    rank, int64 row number within that destination) and up to ``row_bytes - 16`` payload bytes,
    zero-padded.

    Args:
        send: [sum(send_splits)] uint8 bytes, grouped by destination rank.
        send_splits: bytes for each destination rank.
    Returns:
        x: [num_rows, row_bytes // 2] bfloat16 (the bytes, viewed as DeepEP's token dtype);
        topk_idx: [num_rows, 1] int64 destination rank of each row (its "expert").
    """
    payload = row_bytes - HEADER_BYTES
    rows_to = [-(-n // payload) for n in send_splits]
    num_rows = sum(rows_to)
    x = torch.zeros(num_rows, row_bytes // 2, dtype=torch.bfloat16, device=send.device)
    table = x.view(torch.uint8)
    header = torch.empty(num_rows, 2, dtype=torch.int64)
    header[:, 0] = rank
    dst = torch.empty(num_rows, 1, dtype=torch.int64)
    row, start = 0, 0
    for d, (n, r) in enumerate(zip(send_splits, rows_to)):
        full, rest = divmod(n, payload)
        block = table[row : row + r, HEADER_BYTES:]
        if full:
            block[:full].copy_(send[start : start + full * payload].view(full, payload))
        if rest:
            block[full, :rest].copy_(send[start + full * payload : start + n])
        header[row : row + r, 1] = torch.arange(r)
        dst[row : row + r] = d
        row, start = row + r, start + n
    if num_rows:
        table[:, :HEADER_BYTES].copy_(header.view(torch.uint8).view(num_rows, HEADER_BYTES))
    return x, dst.to(send.device)


def check_buffer(buffer: object, nvl_bytes: int, rdma_bytes: int, row_bytes: int) -> None:
    """Refuse a buffer this communicator must not use (ValueError saying why)."""
    name = type(buffer).__name__
    if name == "ElasticBuffer" or not hasattr(buffer, "get_dispatch_layout"):
        raise ValueError(
            f"communicator='deepep' takes a deep_ep.Buffer, not a {name}: DeepEP's "
            "ElasticBuffer (SGLang's --moe-a2a-backend deepep_v2) has another dispatch API; "
            "use communicator='torch'"
        )
    if getattr(buffer, "low_latency_mode", False):
        raise ValueError(
            "communicator='deepep' refuses a Buffer in low-latency mode: normal dispatch "
            "dirties its low-latency buffers, which the engine would then have to clean "
            "(Buffer.clean_low_latency_buffer); use communicator='torch'"
        )
    have_nvl = getattr(buffer, "num_nvl_bytes", 0)
    have_rdma = getattr(buffer, "num_rdma_bytes", 0)
    if have_nvl < nvl_bytes or have_rdma < rdma_bytes:
        raise ValueError(
            f"communicator='deepep': the Buffer has {have_nvl} NVLink / {have_rdma} RDMA bytes, "
            f"rows of {row_bytes} bytes need {nvl_bytes} / {rdma_bytes} (DeepEP's size hints); "
            "pass a smaller row_bytes or no buffer"
        )


__all__ = [
    "DEEPEP_RANK_COUNTS",
    "DeepEPCommunicator",
    "check_buffer",
    "import_deep_ep",
    "pack_rows",
]
