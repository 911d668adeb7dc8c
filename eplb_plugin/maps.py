"""``ExpertMaps``: the device-side serving state of a layout, read by every router.

An :class:`~eplb_plugin.layout.ExpertLayout` is the planning and file object (host tensors,
any replica width); ``ExpertMaps`` is what the routing op reads on the device. It is
allocated once at its maximum size and only ever written in place, so that pointers captured
in CUDA graphs (or held by an engine's per-layer views) stay valid across rebalances. The
Balancer, the kernels' callers and every engine integration share this one bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import ExpertLayout


@dataclass
class ExpertMaps:
    """Maps of one model (or a one-layer view of them) on one device.

    Attributes:
        phy2log: [L, P] int64 logical expert of each slot.
        log2phy: [L, E, X] int64 slots of each expert, -1 padded; X = P - E + 1 (the most
            replicas one expert can have), fixed for the life of the maps.
        logcnt: [L, E] int64 replicas per expert.
        replica_share: [L, P] float32 share of its expert's tokens each slot receives.
        slots_per_gpu: physical slots on each EP rank (P / ranks).
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    replica_share: torch.Tensor
    slots_per_gpu: int

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_experts: int,
        num_slots: int,
        slots_per_gpu: int,
        device: torch.device | str | None = None,
    ) -> ExpertMaps:
        """Uninitialised maps of the largest width a layout of these sizes can need."""
        if num_slots < num_experts:
            raise ValueError(f"num_slots={num_slots} is below num_experts={num_experts}")
        width = num_slots - num_experts + 1
        L, E, P = num_layers, num_experts, num_slots
        return cls(
            phy2log=torch.empty(L, P, dtype=torch.int64, device=device),
            log2phy=torch.full((L, E, width), -1, dtype=torch.int64, device=device),
            logcnt=torch.empty(L, E, dtype=torch.int64, device=device),
            replica_share=torch.empty(L, P, dtype=torch.float32, device=device),
            slots_per_gpu=slots_per_gpu,
        )

    @classmethod
    def of(cls, layout: ExpertLayout, device: torch.device | str | None = None) -> ExpertMaps:
        """Maps allocated for ``layout``'s sizes and holding ``layout``."""
        maps = cls.allocate(
            layout.num_layers, layout.num_experts, layout.num_slots,
            layout.topology.slots_per_gpu, device,
        )  # fmt: skip
        maps.write(layout)
        return maps

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def device(self) -> torch.device:
        return self.phy2log.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The four device tensors (phy2log, log2phy, logcnt, replica_share)."""
        return self.phy2log, self.log2phy, self.logcnt, self.replica_share

    def write(self, layout: ExpertLayout, layers: list[int] | None = None) -> None:
        """Copy ``layers`` (default: all) of ``layout`` into the maps, in place (same storage).

        Raises:
            ValueError: ``layout`` does not fit the maps' sizes (nothing is written).
        """
        shape = (layout.num_layers, layout.num_experts, layout.num_slots)
        if shape != (self.num_layers, self.num_experts, self.num_slots):
            raise ValueError(
                f"layout of {shape} (layers, experts, slots) does not fit maps of "
                f"{(self.num_layers, self.num_experts, self.num_slots)}"
            )
        width = self.log2phy.shape[2]
        if layout.log2phy.shape[2] > width:
            raise ValueError(f"layout needs {layout.log2phy.shape[2]} replicas, maps hold {width}")
        layers = list(range(layout.num_layers)) if layers is None else list(layers)
        rows = torch.tensor(layers, dtype=torch.long)
        index = rows.to(self.device)
        log2phy = torch.full((len(layers), layout.num_experts, width), -1, dtype=torch.int64)
        log2phy[:, :, : layout.log2phy.shape[2]] = layout.log2phy[rows]
        for dst, src in (
            (self.phy2log, layout.phy2log[rows]),
            (self.log2phy, log2phy),
            (self.logcnt, layout.logcnt[rows]),
            (self.replica_share, layout.replica_share[rows]),
        ):
            dst.index_copy_(0, index, src.to(self.device))

    def rows(self, first: int, count: int = 1) -> ExpertMaps:
        """Views of layers ``first .. first + count - 1``: they follow every in-place write."""
        part = slice(first, first + count)
        return ExpertMaps(
            self.phy2log[part], self.log2phy[part], self.logcnt[part],
            self.replica_share[part], self.slots_per_gpu,
        )  # fmt: skip


__all__ = ["ExpertMaps"]
