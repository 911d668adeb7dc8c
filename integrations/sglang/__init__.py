"""SGLang integration of eplb-plugin, installed as ``eplb_plugin.integrations.sglang``.

Two ways to use it, both switched on by environment variables that the launcher
(``eplb sglang launch_server --model-path M ...``) sets, so that every SGLang process sees
the same settings (docs/sglang.md):

- the **plugin balancer** (``--enable-eplb`` + ``--eplb-*``): this project's Balancer runs
  in each SGLang model runner: routing goes through ``map_and_count``, counts come from
  SGLang's recorder hooks (``select_experts`` or DeepEP's received counts), weights move in
  place; SGLang's own EPLB stays off;
- the **policy swap** (``--eplb-policy-only``): SGLang's own EPLB runs as usual and only
  its placement algorithm is replaced by :func:`eplb_plugin.rebalance_experts`'s planner.

:func:`register` is the ``sglang.srt.plugins`` entry point. Nothing here imports SGLang at
module import time; the one module that patches SGLang internals is :mod:`.patches`.
Layout and statistics files in SGLang's forms are read and written by
:mod:`eplb_plugin.formats`.
"""

from .plugin import (
    ENV_ALGORITHMS,
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
    "ENV_ALGORITHMS",
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
