"""``TorchCommunicator``: collectives over a ``torch.distributed`` process group.

Bytes move with one ``all_to_all_single`` per round (uneven split sizes; gloo on CPU and
NCCL on GPU both take them), so a round is one bounded collective rather than a burst of
point-to-point calls. Every call is issued with ``async_op=True`` and waited on with the
communicator's timeout: a rank that never answers raises :class:`CommTimeout` instead of
hanging. Control collectives (votes, plans, load counts) may run on a separate group, e.g. a
gloo group beside an NCCL one, so that their timeouts are handled in Python.
"""

from __future__ import annotations

import datetime

import torch

from .base import REDUCE_OPS, CommError, CommTimeout, Communicator, check_splits


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


class TorchCommunicator(Communicator):
    """Communicator over ``torch.distributed``.

    Args:
        group: process group of the EP ranks for byte exchanges (default: the world group).
        timeout_s: seconds each collective may take.
        control_group: group for all_reduce / broadcast / votes. Default: ``group``, except
            when ``group`` runs NCCL: then a gloo group of the same ranks is made (collective
            over those ranks), because NCCL's own watchdog, not ``timeout_s``, decides what a
            hung collective does (by default it ends the process).
    Raises:
        ValueError if torch.distributed is not initialized.
    """

    def __init__(
        self,
        group: object | None = None,
        timeout_s: float = 60.0,
        control_group: object | None = None,
    ) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("TorchCommunicator needs torch.distributed to be initialized")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self._dist = dist
        self.group = group if group is not None else dist.group.WORLD
        if control_group is None and str(dist.get_backend(self.group)).lower() == "nccl":
            control_group = dist.new_group(
                dist.get_process_group_ranks(self.group), backend="gloo",
                use_local_synchronization=True,
            )  # fmt: skip
        self.control_group = control_group if control_group is not None else self.group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.timeout_s = float(timeout_s)
        self.broken = False
        backend = str(dist.get_backend(self.control_group)).lower()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )

    # ------------------------------------------------------------------ helpers
    def _wait(self, work: object, what: str) -> None:
        try:
            finished = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as exc:
            self.broken = True
            if _is_timeout(exc):
                raise CommTimeout(
                    f"rank {self.rank}: {what} timed out after {self.timeout_s:g} s: {exc}"
                ) from exc
            raise CommError(f"rank {self.rank}: {what} failed: {exc}") from exc
        if finished is False:
            self.broken = True
            raise CommTimeout(f"rank {self.rank}: {what} timed out after {self.timeout_s:g} s")

    def _issue(self, what: str, fn, *args, **kwargs) -> None:
        self._check_usable()
        try:
            work = fn(*args, async_op=True, **kwargs)
        except Exception as exc:
            self.broken = True
            raise CommError(f"rank {self.rank}: {what} failed: {exc}") from exc
        self._wait(work, what)

    # ------------------------------------------------------------------ collectives
    def all_to_all(self, send, send_splits, recv, recv_splits) -> None:
        check_splits("send", send, send_splits, self.world_size)
        check_splits("recv", recv, recv_splits, self.world_size)
        self._issue(
            "all_to_all_single",
            self._dist.all_to_all_single,
            recv,
            send,
            list(recv_splits),
            list(send_splits),
            group=self.group,
        )

    def all_reduce(self, tensor, op="sum") -> None:
        if op not in REDUCE_OPS:
            raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")
        reduce_op = {
            "sum": self._dist.ReduceOp.SUM,
            "min": self._dist.ReduceOp.MIN,
            "max": self._dist.ReduceOp.MAX,
        }[op]
        work = tensor if tensor.device == self.device else tensor.to(self.device)
        self._issue(
            "all_reduce", self._dist.all_reduce, work, op=reduce_op, group=self.control_group
        )
        if work is not tensor:
            tensor.copy_(work)

    def route_all_reduce(self, tensor) -> None:
        # On the byte-exchange group (NCCL on GPUs), not the control group: the gloo control
        # group would copy the counts to the host every MoE layer, a sync that a CUDA graph
        # cannot capture. No work.wait(timeout): with a timeout NCCL blocks the host.
        self._check_usable()
        try:
            self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
        except Exception as exc:
            self.broken = True
            raise CommError(f"rank {self.rank}: routing all_reduce failed: {exc}") from exc

    def _split_group(self, size: int) -> Communicator:
        ranks = self._dist.get_process_group_ranks(self.group)
        first = self.rank // size * size
        try:
            # only the node's ranks take part in making its group (same backend as the
            # world's: NCCL on GPUs)
            group = self._dist.new_group(
                ranks[first : first + size], use_local_synchronization=True
            )
        except Exception as exc:
            raise CommError(f"rank {self.rank}: making the node group failed: {exc}") from exc
        return TorchCommunicator(group, self.timeout_s, control_group=group)

    def broadcast(self, tensor, src) -> None:
        if not 0 <= src < self.world_size:
            raise ValueError(f"src must be a rank in [0, {self.world_size}), got {src}")
        work = tensor if tensor.device == self.device else tensor.to(self.device)
        global_src = self._dist.get_global_rank(self.control_group, src)
        self._issue("broadcast", self._dist.broadcast, work, global_src, group=self.control_group)
        if work is not tensor:
            tensor.copy_(work)


__all__ = ["TorchCommunicator"]
