"""The ``Communicator`` interface the executor moves weights through.

Every method is collective over the EP ranks: all ranks call it, in the same order. Byte
exchanges carry packed slots (``uint8`` buffers); the small control collectives carry plans,
load counts and votes. A communicator turns any failure into :class:`CommError` and a
timeout into :class:`CommTimeout`; after either, ``broken`` is true and the caller must not
use it again (a timed-out collective leaves a process group in an unknown state).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

REDUCE_OPS = ("sum", "min", "max")


class CommError(RuntimeError):
    """A collective failed; the communicator is broken."""


class CommTimeout(CommError):
    """A collective did not complete within the timeout (a rank never answered)."""


def check_splits(name: str, buffer: torch.Tensor, splits: list[int], world_size: int) -> None:
    """Raise ValueError unless ``splits`` has one non-negative entry per rank summing to the
    length of the 1-D uint8 ``buffer``."""
    if buffer.dim() != 1 or buffer.dtype != torch.uint8 or not buffer.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous 1-D uint8 tensor, got {buffer.dtype} "
            f"shape {tuple(buffer.shape)}"
        )
    if len(splits) != world_size or any(s < 0 for s in splits):
        raise ValueError(f"{name} splits must be {world_size} non-negative ints, got {splits}")
    if sum(splits) != buffer.numel():
        raise ValueError(f"{name} splits sum to {sum(splits)} but the buffer has {buffer.numel()}")


class Communicator(ABC):
    """Collectives used by the balancer and the executor.

    Attributes:
        rank: this process's index in the EP group.
        world_size: EP ranks.
        timeout_s: seconds any collective may take.
        broken: set after a failure or timeout; further calls raise CommError.
        device: device of the control tensors this backend reduces and broadcasts.
    """

    rank: int
    world_size: int
    timeout_s: float
    broken: bool = False
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def all_to_all(
        self,
        send: torch.Tensor,
        send_splits: list[int],
        recv: torch.Tensor,
        recv_splits: list[int],
    ) -> None:
        """Exchange bytes: ``send`` [sum(send_splits)] uint8 holds, rank by rank, what goes
        to each rank; ``recv`` [sum(recv_splits)] uint8 receives, rank by rank, what each
        rank sent here (its own part included)."""

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """Reduce ``tensor`` (any shape and device) in place over the ranks."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """Copy rank ``src``'s ``tensor`` into every rank's ``tensor`` (in place)."""

    def route_all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` in place over the ranks on the routing path (``global`` and
        ``node`` dispatch, once per MoE layer).

        Unlike :meth:`all_reduce` it must not wait on the host: a backend issues it in
        stream order on the tensor's device, so that routing stays free of host syncs and
        capturable in a CUDA graph. The backend's own watchdog, not ``timeout_s``, then
        catches a rank that never answers. The default is :meth:`all_reduce`.
        """
        self.all_reduce(tensor, op="sum")

    def split(self, size: int) -> Communicator:
        """A communicator of this rank's block of ``size`` consecutive ranks (its node).

        Collective: every rank calls it, with the same ``size``. Only
        :meth:`route_all_reduce` is used on the result (``node`` dispatch).
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive number of ranks, got {size!r}")
        if size >= self.world_size:
            return self
        if size == 1:
            return LocalCommunicator(self.timeout_s)
        return self._split_group(size)

    def _split_group(self, size: int) -> Communicator:
        """:meth:`split` into blocks of 1 < ``size`` < world_size ranks: a backend's own."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its ranks")

    def agree(self, ok: bool) -> bool:
        """True on every rank iff every rank passed ``ok=True`` (a vote)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        self.all_reduce(flag, op="min")
        return bool(flag.item())

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release backend resources (idempotent)."""

    def _check_usable(self) -> None:
        if self.broken:
            raise CommError(
                f"rank {self.rank}: communicator is broken by an earlier failure or timeout"
            )


class LocalCommunicator(Communicator):
    """One rank, no process group: every collective is a local no-op or copy."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self.rank, self.world_size, self.timeout_s = 0, 1, timeout_s

    def all_to_all(self, send, send_splits, recv, recv_splits) -> None:
        check_splits("send", send, send_splits, 1)
        check_splits("recv", recv, recv_splits, 1)
        if send.numel() != recv.numel():
            raise ValueError(f"one rank sends {send.numel()} bytes but receives {recv.numel()}")
        recv.copy_(send)

    def all_reduce(self, tensor, op="sum") -> None:
        if op not in REDUCE_OPS:
            raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")

    def broadcast(self, tensor, src) -> None:
        if src != 0:
            raise ValueError(f"src must be 0 with one rank, got {src}")


__all__ = [
    "CommError",
    "CommTimeout",
    "Communicator",
    "LocalCommunicator",
    "REDUCE_OPS",
    "check_splits",
]
