"""eplb-plugin: expert-parallel load balancing for Mixture-of-Experts serving.

The core needs only torch; engine glue lives in ``eplb_plugin.integrations`` and device
kernels in ``eplb_plugin.kernels``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .balancer import Balancer, BalancerStats, StepReport
    from .config import EplbConfig, add_cli_options
    from .dispatch import slot_loads
    from .executor import InconsistentWeightsError
    from .layout import ExpertLayout, Topology, balancedness_of
    from .policies import available_policies, plan, rebalance_experts, register_policy
    from .recorder import LoadRecorder
    from .transfer import plan_transfer

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first access (PEP 562): most of them
# need torch, which takes seconds to import, and `eplb --help` or a launcher that only reads
# a name or two should not pay for it.
_PUBLIC = {
    "Balancer": "balancer",
    "BalancerStats": "balancer",
    "StepReport": "balancer",
    "EplbConfig": "config",
    "add_cli_options": "config",
    "slot_loads": "dispatch",
    "InconsistentWeightsError": "executor",
    "ExpertLayout": "layout",
    "Topology": "layout",
    "balancedness_of": "layout",
    "available_policies": "policies",
    "plan": "policies",
    "rebalance_experts": "policies",
    "register_policy": "policies",
    "LoadRecorder": "recorder",
    "plan_transfer": "transfer",
}

__all__ = [
    "Balancer",
    "BalancerStats",
    "EplbConfig",
    "ExpertLayout",
    "InconsistentWeightsError",
    "LoadRecorder",
    "StepReport",
    "Topology",
    "add_cli_options",
    "available_policies",
    "balancedness_of",
    "plan",
    "plan_transfer",
    "rebalance_experts",
    "register_policy",
    "slot_loads",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
