"""eplb-plugin: expert-parallel load balancing for Mixture-of-Experts serving.

The core needs only torch; engine glue lives in ``eplb_plugin.integrations`` and device
kernels in ``eplb_plugin.kernels``.
"""

from .balancer import Balancer, BalancerStats, StepReport
from .config import EplbConfig, add_cli_options
from .dispatch import slot_loads
from .executor import InconsistentWeightsError
from .layout import ExpertLayout, Topology, balancedness_of
from .policies import available_policies, plan, rebalance_experts, register_policy
from .recorder import LoadRecorder
from .transfer import plan_transfer

__version__ = "0.1.0"

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
