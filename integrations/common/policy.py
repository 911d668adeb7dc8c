"""What the policy swaps of every engine share: the engine's layout in service, as a layout.

In a policy swap the engine's own EPLB calls its placement function with its own arguments;
the adapters (``integrations/{vllm,sglang}/policy.py``) answer with :func:`eplb_plugin.plan`
and hand migration-aware policies the layout in service through :func:`previous_layout`.
"""

from __future__ import annotations

import torch

from eplb_plugin.layout import ExpertLayout, Topology


def previous_layout(
    phy2log: torch.Tensor | None, topology: Topology, num_layers: int, num_experts: int
) -> ExpertLayout | None:
    """The engine's ``phy2log`` [L, P] in service as an ExpertLayout, or None when there is
    none or it does not describe a full layout of this shape (e.g. -1 entries while an
    elastic EP group scales, or another slot count)."""
    if phy2log is None:
        return None
    old = torch.as_tensor(phy2log).detach().cpu().to(torch.int64)
    if old.shape != (num_layers, topology.num_replicas):
        return None
    try:
        return ExpertLayout.from_phy2log(old, topology, num_experts)
    except ValueError:
        return None


__all__ = ["previous_layout"]
