"""vLLM integration of eplb-plugin, installed as ``eplb_plugin.integrations.vllm``.

Two ways to use it, both switched on by environment variables that the launcher
(``eplb vllm serve MODEL ...``) sets, so that every vLLM process (API server, engine core,
workers) sees the same settings:

- the **plugin balancer** (``--enable-eplb`` + ``--eplb-*``): this project's Balancer runs
  inside each vLLM worker: routing goes through ``map_and_count``, redundant slots are added
  after the model loads, weights move in place; vLLM's own EPLB stays off;
- the **policy swap** (``--eplb-policy-only``): vLLM's own EPLB runs as usual and only its
  placement policy is replaced by :func:`eplb_plugin.rebalance_experts`.

``register`` is the ``vllm.general_plugins`` entry point. Nothing here imports vLLM at module
import time; the one module that patches vLLM internals is :mod:`.patches`.
"""

from .plugin import (
    ENV_CONFIG,
    ENV_POLICY,
    ENV_POLICY_OPTIONS,
    active_config,
    active_policy,
    disable,
    enable,
    enable_policy_swap,
    register,
)

__all__ = [
    "ENV_CONFIG",
    "ENV_POLICY",
    "ENV_POLICY_OPTIONS",
    "active_config",
    "active_policy",
    "disable",
    "enable",
    "enable_policy_swap",
    "register",
]
