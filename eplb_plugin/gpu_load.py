"""The realized balance: the per-GPU load the served tokens actually put on the EP ranks,
accumulated on the device every step and measured (summed over the ranks) now and then."""

from __future__ import annotations

import torch

from .comm import Communicator
from .layout import balancedness_of

# the accumulators of GpuLoadMeter.loads
SINCE_REBALANCE, SINCE_LOG = 0, 1


class GpuLoadMeter:
    """Per-GPU load of this rank's tokens since the previous rebalance and since the previous
    ``log_balancedness`` line.

    Attributes:
        loads: [2, L, G] float64 on the experts' device: [SINCE_REBALANCE], [SINCE_LOG].
    """

    def __init__(
        self, num_layers: int, num_gpus: int, device: torch.device, comm: Communicator
    ) -> None:
        self.comm = comm
        self.loads = torch.zeros(2, num_layers, num_gpus, dtype=torch.float64, device=device)

    def add(self, counts: torch.Tensor) -> None:
        """Add one step's ``counts`` [L, P] int32 (per slot; slots are grouped by GPU)."""
        L, G = self.loads.shape[1:]
        self.loads += counts.view(L, G, -1).sum(-1)

    def restart(self, which: int) -> None:
        """Zero the accumulator ``which`` (no collective)."""
        self.loads[which].zero_()

    def measure(self, which: int) -> tuple[float, float, float] | None:
        """All-reduce (collective) and reset the accumulator ``which``.

        Returns (balancedness, avg tokens, max tokens) over it, or None if it holds no load:
        balancedness is mean/max per layer averaged over layers; the token figures are the
        sums over layers of the mean and the max per-GPU load (vLLM's log line).
        """
        loads = self.loads[which].clone()
        self.loads[which].zero_()
        self.comm.all_reduce(loads, op="sum")
        loads = loads.cpu()
        if float(loads.sum()) <= 0:
            return None
        return balancedness_of(loads), float(loads.mean(-1).sum()), float(loads.amax(-1).sum())
