"""The ``sglang.srt.plugins`` entry point and the process-wide switch of the integration.

SGLang (>= 0.5.23) calls every general plugin of the entry-point group ``sglang.srt.plugins``
early in each of its processes (launcher, scheduler, detokenizer, data-parallel controller);
it logs and ignores a plugin that raises. The launcher module
(``python -m eplb_plugin.integrations.sglang.launch``, started by ``eplb sglang
launch_server``) also calls :func:`register` when it is imported, which includes every
process SGLang spawns from it (``multiprocessing`` re-imports the main module there), so
the integration works with or without the entry point installed, and there a bad setting
stops the process instead of being logged. :func:`register` is cheap, idempotent, imports
no SGLang module itself, and does nothing unless one of these is set:

- ``EPLB_SGLANG_CONFIG``: JSON object of EplbConfig fields (``EplbConfig.to_dict()``) with
  ``"enable": true``: run this project's Balancer in SGLang's model runners (SGLang's own
  EPLB must be off);
- ``EPLB_SGLANG_POLICY``: a policy name: keep SGLang's own EPLB and only replace its
  placement algorithm (``eplb_algorithms.rebalance_experts``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from eplb_plugin.config import EplbConfig

ENV_CONFIG = "EPLB_SGLANG_CONFIG"
ENV_POLICY = "EPLB_SGLANG_POLICY"
# Optional, with EPLB_SGLANG_POLICY: comma-separated SGLang algorithm names the swap answers,
# and a JSON object of keyword options for the policy.
ENV_ALGORITHMS = "EPLB_SGLANG_ALGORITHMS"
ENV_POLICY_OPTIONS = "EPLB_SGLANG_POLICY_OPTIONS"

# A child of SGLang's "sglang" logger, so that our lines carry SGLang's format and handlers.
logger = logging.getLogger("sglang.eplb_plugin")

_ACTIVE: dict[str, object] = {"config": None, "policy": None}


def config_from_env(environ: Mapping[str, str]) -> EplbConfig | None:
    """The EplbConfig in ``EPLB_SGLANG_CONFIG``, or None when unset, empty or not enabled.

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


def policy_from_env(
    environ: Mapping[str, str],
) -> tuple[str, tuple[str, ...] | None, dict] | None:
    """(policy, algorithms or None, options) from ``EPLB_SGLANG_POLICY``,
    ``EPLB_SGLANG_ALGORITHMS`` and ``EPLB_SGLANG_POLICY_OPTIONS``.

    Raises:
        ValueError: the policy is not registered, an algorithm name is unknown, or the
            options are not a JSON object.
    """
    name = environ.get(ENV_POLICY, "").strip()
    if not name:
        return None
    from eplb_plugin.policies import available_policies

    from .policy import KNOWN_ALGORITHMS

    if name not in available_policies():
        raise ValueError(
            f"{ENV_POLICY}={name!r} is not a policy; available: {', '.join(available_policies())}"
        )
    options = _options_from_env(environ)
    raw = environ.get(ENV_ALGORITHMS, "").strip()
    if not raw:
        return name, None, options
    algorithms = tuple(a.strip() for a in raw.split(",") if a.strip())
    unknown = [a for a in algorithms if a not in KNOWN_ALGORITHMS]
    if unknown or not algorithms:
        raise ValueError(
            f"{ENV_ALGORITHMS}={raw!r}: unknown SGLang algorithm(s) {unknown}; known: "
            f"{', '.join(KNOWN_ALGORITHMS)}"
        )
    return name, algorithms, options


def _options_from_env(environ: Mapping[str, str]) -> dict:
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


def config_to_env(config: EplbConfig) -> str:
    """The value of ``EPLB_SGLANG_CONFIG`` that rebuilds ``config``."""
    return json.dumps(config.to_dict(), sort_keys=True)


def register() -> None:
    """``sglang.srt.plugins`` entry point: turn on what the environment asks for.

    Raises when the environment is invalid, both modes are asked for, or the installed
    SGLang is not a version the patches were written for.
    """
    config = config_from_env(os.environ)
    policy = policy_from_env(os.environ)
    if config is None and policy is None:
        return
    if config is not None and policy is not None:
        raise ValueError(
            f"{ENV_CONFIG} and {ENV_POLICY} are both set: the plugin balancer and the swap of "
            "SGLang's own EPLB algorithm exclude each other; set one"
        )
    if config is not None:
        enable(config)
    else:
        enable_policy_swap(*policy)


def enable(config: EplbConfig) -> None:
    """Run this project's Balancer in every SGLang model runner initialized from now on
    (this process). Idempotent for the same config."""
    if not isinstance(config, EplbConfig):
        raise ValueError(f"config must be an EplbConfig, got {type(config).__name__}")
    if not config.enable:
        raise ValueError("config.enable is False: call disable() to turn the plugin off")
    from . import patches

    version = patches.check_version()
    if _ACTIVE["policy"] is not None:
        raise ValueError(
            f"the swap of SGLang's EPLB algorithm ({_ACTIVE['policy']!r}) is active in this "
            "process; the plugin balancer cannot run beside SGLang's own EPLB"
        )
    if _ACTIVE["config"] == config:
        return
    _ACTIVE["config"] = config
    patches.install()
    logger.info(
        "eplb-plugin: balancer ENABLED in pid %d (SGLang %s): %s; SGLang's own EPLB must stay off",
        os.getpid(),
        version,
        ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "enable"),
    )


def enable_policy_swap(
    policy: str = "default",
    algorithms: tuple[str, ...] | None = None,
    options: dict | None = None,
) -> None:
    """Make SGLang's own EPLB place experts with this project's policy ``policy``.

    Args:
        policy: a registered eplb-plugin policy.
        algorithms: SGLang algorithm names (``--eplb-algorithm``, ``auto`` resolves to one of
            them) answered by ``policy``; default: the DeepSeek ones.
        options: keyword options for the policy.
    """
    from eplb_plugin.policies import get_policy

    from . import patches

    version = patches.check_version()
    if _ACTIVE["config"] is not None:
        raise ValueError(
            "the plugin balancer is active in this process; it cannot be combined with the "
            "swap of SGLang's EPLB algorithm"
        )
    get_policy(policy)  # ValueError naming the policy when it is unknown
    options = dict(options or {})
    if _ACTIVE["policy"] == (policy, algorithms, options):
        return
    patches.swap_policy(policy, algorithms, options)
    _ACTIVE["policy"] = (policy, algorithms, options)
    logger.info(
        "eplb-plugin: SGLang's EPLB algorithms %s now run eplb-plugin policy %r in pid %d "
        "(SGLang %s)",
        ", ".join(algorithms) if algorithms else "deepseek*",
        policy,
        os.getpid(),
        version,
    )


def disable() -> None:
    """Runners initialized from now on run without the plugin balancer (this process);
    the policy swap, if any, is undone."""
    from . import patches

    if _ACTIVE["policy"] is not None:
        patches.restore_policy()
    _ACTIVE["config"] = None
    _ACTIVE["policy"] = None


def active_config() -> EplbConfig | None:
    """The EplbConfig new model runners get, or None when the plugin balancer is off."""
    return _ACTIVE["config"]  # type: ignore[return-value]


def active_policy() -> str | None:
    """The policy swapped into SGLang's own EPLB, or None."""
    active = _ACTIVE["policy"]
    return None if active is None else active[0]  # type: ignore[index]
