"""Communicators: how the balancer's collectives and weight bytes travel between EP ranks.

``torch`` (``TorchCommunicator``, torch.distributed: gloo on CPU, NCCL on GPU), ``deepep``
(``DeepEPCommunicator``, lazy import of DeepEP), and ``LocalCommunicator`` for one process.
"""

from __future__ import annotations

from .base import CommError, CommTimeout, Communicator, LocalCommunicator


def make_communicator(
    name: str, group: object | None = None, timeout_s: float = 60.0, **options: object
) -> Communicator:
    """Build a communicator by config name (``"torch"`` or ``"deepep"``).

    With no group and torch.distributed not initialized, returns a LocalCommunicator (one
    rank), whatever the name.
    """
    import torch.distributed as dist

    if name not in ("torch", "deepep"):
        raise ValueError(f"communicator must be 'torch' or 'deepep', got {name!r}")
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return LocalCommunicator(timeout_s)
    if name == "deepep":
        from .deepep import DeepEPCommunicator

        return DeepEPCommunicator(group, timeout_s, **options)
    from .torch_dist import TorchCommunicator

    return TorchCommunicator(group, timeout_s, **options)


__all__ = [
    "CommError",
    "CommTimeout",
    "Communicator",
    "LocalCommunicator",
    "make_communicator",
]
