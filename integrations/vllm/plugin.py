"""The ``vllm.general_plugins`` entry point and the process-wide switch of the integration.

vLLM calls every general plugin in every process it starts (API server, engine core, each
worker, a model-registry subprocess), possibly several times, and a plugin that raises stops
that process. So :func:`register` is cheap, idempotent, imports no vLLM module itself, does
nothing at all unless ``EPLB_VLLM_CONFIG`` or ``EPLB_VLLM_POLICY`` (with
``EPLB_VLLM_POLICY_OPTIONS``) is set (:mod:`eplb_plugin.integrations.common.plugin`), and
says in the log what it turned on, once per process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ..common.plugin import SWITCH_API, EngineSwitch
from ..common.plugin import config_to_env as config_to_env  # re-exported

# vLLM's switch between its V1 and V2 model runners; the balancer hooks the V1 ones
ENV_V2_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"

# A child of vLLM's "vllm" logger, so that our lines carry vLLM's format and handlers.
logger = logging.getLogger("vllm.eplb_plugin")


def check_v1_runner(environ: Mapping[str, str]) -> None:
    """ValueError when ``environ`` asks vLLM for its V2 model runner, which is not hooked."""
    value = environ.get(ENV_V2_RUNNER, "")
    if value.strip().lower() in ("1", "true"):
        raise ValueError(
            f"{ENV_V2_RUNNER}={value}: the plugin balancer runs in vLLM's V1 model runner; unset it"
        )


def _select_v1_runner() -> None:
    check_v1_runner(os.environ)
    # vLLM reads it when it builds its config, after plugins load; children inherit it
    os.environ[ENV_V2_RUNNER] = "0"


def _use_vllm_logging() -> None:
    """Make sure vLLM's logging is configured, so that our INFO lines show in every process
    (``import vllm`` alone does not configure it; the modules vLLM runs do)."""
    try:
        import vllm.logger  # noqa: F401
    except ImportError:
        pass


def _patches():
    from . import patches

    return patches


_SWITCH = EngineSwitch(
    "vLLM", "EPLB_VLLM", logger, _patches,
    before_enable=_select_v1_runner, before_log=_use_vllm_logging,
)  # fmt: skip
_ACTIVE = _SWITCH.active
ENV_CONFIG, ENV_POLICY = _SWITCH.env_config, _SWITCH.env_policy
ENV_POLICY_OPTIONS = _SWITCH.env_policy_options
enable, disable = _SWITCH.enable, _SWITCH.disable
active_config, active_policy = _SWITCH.active_config, _SWITCH.active_policy
config_from_env, policy_from_env = _SWITCH.config_from_env, _SWITCH.policy_from_env
policy_options_from_env = _SWITCH.policy_options_from_env


def register() -> None:
    """``vllm.general_plugins`` entry point: turn on what the environment asks for.

    Raises (stopping the vLLM process, on purpose) when the environment is invalid, both
    modes are asked for, or the installed vLLM is not a version the patches were written for.
    """
    policy = policy_from_env(os.environ)
    swap = None if policy is None else (policy, policy_options_from_env(os.environ))
    _SWITCH.register(config_from_env(os.environ), swap)


def enable_policy_swap(policy: str = "default", options: dict | None = None) -> None:
    """Make vLLM's built-in EPLB place experts with this project's policy ``policy``
    (called with keyword ``options``)."""
    _SWITCH.enable_policy_swap(policy, dict(options or {}))


__all__ = [*SWITCH_API, *["ENV_V2_RUNNER", "check_v1_runner", "policy_options_from_env"]]
