"""The ``vllm.general_plugins`` entry point and the process-wide switch of the integration.

vLLM calls every general plugin in every process it starts (API server, engine core, each
worker, a model-registry subprocess), possibly several times, and a plugin that raises stops
that process. So :func:`register` is cheap, idempotent, imports no vLLM module itself, does
nothing at all unless one of the two environment variables below is set, and says in the log
what it turned on, once per process.

Environment (read here and in the launcher only; the rest of the code gets an EplbConfig):

- ``EPLB_VLLM_CONFIG``: JSON object of EplbConfig fields (``EplbConfig.to_dict()``) with
  ``"enable": true``: run this project's Balancer inside vLLM's workers.
- ``EPLB_VLLM_POLICY``: a policy name (``eplb_plugin.available_policies()``): keep vLLM's own
  EPLB and only replace its placement policy; ``EPLB_VLLM_POLICY_OPTIONS``: a JSON object of
  keyword options for that policy (``--eplb-policy-options``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from eplb_plugin.config import EplbConfig

ENV_CONFIG = "EPLB_VLLM_CONFIG"
ENV_POLICY = "EPLB_VLLM_POLICY"
ENV_POLICY_OPTIONS = "EPLB_VLLM_POLICY_OPTIONS"
# vLLM's switch between its V1 and V2 model runners; the balancer hooks the V1 ones
ENV_V2_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"

# A child of vLLM's "vllm" logger, so that our lines carry vLLM's format and handlers.
logger = logging.getLogger("vllm.eplb_plugin")

_ACTIVE: dict[str, object] = {"config": None, "policy": None}


def _use_vllm_logging() -> None:
    """Make sure vLLM's logging is configured, so that our INFO lines show in every process
    (``import vllm`` alone does not configure it; the modules vLLM runs do)."""
    try:
        import vllm.logger  # noqa: F401
    except ImportError:
        pass


def config_from_env(environ: Mapping[str, str]) -> EplbConfig | None:
    """The EplbConfig in ``EPLB_VLLM_CONFIG``, or None when unset, empty or not enabled.

    Raises:
        ValueError: the variable is not a JSON object of valid EplbConfig fields.
    """
    raw = environ.get(ENV_CONFIG, "").strip()
    if not raw:
        return None
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_CONFIG}={raw!r} is not valid JSON: {exc}") from exc
    config = EplbConfig.from_dict(values)
    return config if config.enable else None


def policy_from_env(environ: Mapping[str, str]) -> str | None:
    """The policy name in ``EPLB_VLLM_POLICY``, or None when unset or empty.

    Raises:
        ValueError: the name is not a registered policy.
    """
    name = environ.get(ENV_POLICY, "").strip()
    if not name:
        return None
    from eplb_plugin.policies import available_policies

    if name not in available_policies():
        raise ValueError(
            f"{ENV_POLICY}={name!r} is not a policy; available: {', '.join(available_policies())}"
        )
    return name


def policy_options_from_env(environ: Mapping[str, str]) -> dict:
    """The policy options in ``EPLB_VLLM_POLICY_OPTIONS`` ({} when unset or empty).

    Raises:
        ValueError: the variable is not a JSON object.
    """
    raw = environ.get(ENV_POLICY_OPTIONS, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_POLICY_OPTIONS}={raw!r} is not valid JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise ValueError(f"{ENV_POLICY_OPTIONS}={raw!r} must be a JSON object")
    return options


def check_v1_runner(environ: Mapping[str, str]) -> None:
    """ValueError when ``environ`` asks vLLM for its V2 model runner, which is not hooked."""
    value = environ.get(ENV_V2_RUNNER, "")
    if value.strip().lower() in ("1", "true"):
        raise ValueError(
            f"{ENV_V2_RUNNER}={value}: the plugin balancer runs in vLLM's V1 model runner; unset it"
        )


def config_to_env(config: EplbConfig) -> str:
    """The value of ``EPLB_VLLM_CONFIG`` that rebuilds ``config``."""
    return json.dumps(config.to_dict(), sort_keys=True)


def register() -> None:
    """``vllm.general_plugins`` entry point: turn on what the environment asks for.

    Raises (stopping the vLLM process, on purpose) when the environment is invalid, both
    modes are asked for, or the installed vLLM is not a version the patches were written for.
    """
    config = config_from_env(os.environ)
    policy = policy_from_env(os.environ)
    if config is None and policy is None:
        return
    if config is not None and policy is not None:
        raise ValueError(
            f"{ENV_CONFIG} and {ENV_POLICY} are both set: the plugin balancer and the swap of "
            "vLLM's built-in EPLB policy exclude each other; set one"
        )
    if config is not None:
        enable(config)
    else:
        enable_policy_swap(policy, policy_options_from_env(os.environ))


def enable(config: EplbConfig) -> None:
    """Run this project's Balancer in every vLLM model runner loaded from now on (this process).

    Idempotent for the same config; a different config replaces the previous one for runners
    loaded afterwards.
    """
    if not isinstance(config, EplbConfig):
        raise ValueError(f"config must be an EplbConfig, got {type(config).__name__}")
    if not config.enable:
        raise ValueError("config.enable is False: call disable() to turn the plugin off")
    from . import patches

    version = patches.check_version()
    if _ACTIVE["policy"] is not None:
        raise ValueError(
            f"the swap of vLLM's EPLB policy ({active_policy()!r}) is active in this "
            "process; the plugin balancer cannot run beside vLLM's own EPLB"
        )
    if _ACTIVE["config"] == config:
        return
    check_v1_runner(os.environ)
    # vLLM reads it when it builds its config, after plugins load; children inherit it
    os.environ[ENV_V2_RUNNER] = "0"
    _ACTIVE["config"] = config
    patches.install()
    _use_vllm_logging()
    logger.info(
        "eplb-plugin: balancer ENABLED in pid %d (vLLM %s): %s; vLLM's own EPLB must stay off",
        os.getpid(),
        version,
        ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "enable"),
    )


def enable_policy_swap(policy: str = "default", options: dict | None = None) -> None:
    """Make vLLM's built-in EPLB place experts with this project's policy ``policy``
    (called with keyword ``options``)."""
    from . import patches

    version = patches.check_version()
    if _ACTIVE["config"] is not None:
        raise ValueError(
            "the plugin balancer is active in this process; it cannot be combined with the "
            "swap of vLLM's built-in EPLB policy"
        )
    options = dict(options or {})
    if _ACTIVE["policy"] == (policy, options):
        return
    from eplb_plugin.policies import get_policy

    get_policy(policy)  # ValueError naming the policy when it is unknown
    patches.swap_policy(policy, options)
    _ACTIVE["policy"] = (policy, options)
    _use_vllm_logging()
    logger.info(
        "eplb-plugin: vLLM's built-in EPLB policy 'default' now runs eplb-plugin policy %r "
        "(options %s) in pid %d (vLLM %s)",
        policy,
        options,
        os.getpid(),
        version,
    )


def disable() -> None:
    """Model runners loaded from now on run without the plugin balancer (this process).

    Runners already loaded keep their balancer; the policy swap, if any, is undone.
    """
    if _ACTIVE["policy"] is not None:
        from . import patches

        patches.restore_policy()
    _ACTIVE["config"] = None
    _ACTIVE["policy"] = None


def active_config() -> EplbConfig | None:
    """The EplbConfig new model runners get, or None when the plugin balancer is off."""
    return _ACTIVE["config"]  # type: ignore[return-value]


def active_policy() -> str | None:
    """The policy swapped into vLLM's built-in EPLB, or None."""
    active = _ACTIVE["policy"]
    return None if active is None else active[0]  # type: ignore[index]
