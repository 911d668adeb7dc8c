"""eplb-plugin: expert-parallel load balancing for Mixture-of-Experts serving.

The core needs only torch; engine glue lives in ``eplb_plugin.integrations`` and device
kernels in ``eplb_plugin.kernels``.
"""

from .dispatch import slot_loads
from .layout import ExpertLayout, Topology, balancedness_of
from .policies import available_policies, plan, rebalance_experts, register_policy

__version__ = "0.1.0"

__all__ = [
    "ExpertLayout",
    "Topology",
    "available_policies",
    "balancedness_of",
    "plan",
    "rebalance_experts",
    "register_policy",
    "slot_loads",
]
