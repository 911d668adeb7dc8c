"""Environment configuration and the process-wide switch of an engine integration.

Engines start several processes (API server, schedulers, workers) and call plugin entry
points in each, so the launchers pass the settings as environment variables, named by the
engine's prefix (``EPLB_VLLM``, ``EPLB_SGLANG``):

- ``<PREFIX>_CONFIG``: JSON object of EplbConfig fields (``EplbConfig.to_dict()``) with
  ``"enable": true``: run this project's Balancer in the engine (its own EPLB stays off);
- ``<PREFIX>_POLICY``: a policy name: keep the engine's own EPLB and only replace its
  placement policy; ``<PREFIX>_POLICY_OPTIONS``: a JSON object of keyword options for it.

Environment variables are read here and in the launchers only; the rest gets an EplbConfig.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from eplb_plugin.config import EplbConfig


def json_from_env(environ: Mapping[str, str], name: str) -> Any | None:
    """The JSON value of variable ``name`` (None when unset or blank); ValueError naming the
    variable when it is not valid JSON."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}={raw!r} is not valid JSON: {exc}") from exc


def config_from_env(environ: Mapping[str, str], name: str) -> EplbConfig | None:
    """The EplbConfig in variable ``name``, or None when unset, empty or not enabled.

    Raises:
        ValueError: the variable is not a JSON object of valid EplbConfig fields.
    """
    values = json_from_env(environ, name)
    if values is None:
        return None
    config = EplbConfig.from_dict(values)
    return config if config.enable else None


def options_from_env(environ: Mapping[str, str], name: str) -> dict:
    """The JSON object in variable ``name`` ({} when unset or empty); ValueError otherwise."""
    options = json_from_env(environ, name)
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"{name}={environ[name].strip()!r} must be a JSON object")
    return options


def policy_from_env(environ: Mapping[str, str], name: str) -> str | None:
    """The policy name in variable ``name``, or None when unset or empty.

    Raises:
        ValueError: the name is not a registered policy.
    """
    policy = environ.get(name, "").strip()
    if not policy:
        return None
    from eplb_plugin.policies import available_policies

    if policy not in available_policies():
        raise ValueError(
            f"{name}={policy!r} is not a policy; available: {', '.join(available_policies())}"
        )
    return policy


def config_to_env(config: EplbConfig) -> str:
    """The value of ``<PREFIX>_CONFIG`` that rebuilds ``config``."""
    return json.dumps(config.to_dict(), sort_keys=True)


# What an engine's plugin module exports from its switch (its __all__ adds the rest).
SWITCH_API = (
    "ENV_CONFIG",
    "ENV_POLICY",
    "ENV_POLICY_OPTIONS",
    "active_config",
    "active_policy",
    "config_from_env",
    "config_to_env",
    "disable",
    "enable",
    "enable_policy_swap",
    "policy_from_env",
    "register",
)


class EngineSwitch:
    """What the integration of one engine does in this process: nothing, the plugin
    balancer (``active["config"]``) or the policy swap (``active["policy"]``: the swap's
    arguments, policy name first).

    Args:
        engine: the engine's name in messages.
        prefix: the environment variables' prefix.
        logger: a child of the engine's logger (our lines carry the engine's format).
        patches: returns the adapter's patches module (``check_version``,
            ``install(active_config)``, ``swap_policy(*args)``, ``restore_policy``), imported
            only when needed.
        before_enable: called when the balancer is turned on, before the patches install.
        before_log: called before the switch logs (e.g. to configure the engine's logging).
    """

    def __init__(
        self,
        engine: str,
        prefix: str,
        logger: logging.Logger,
        patches: Callable[[], Any],
        *,
        before_enable: Callable[[], None] | None = None,
        before_log: Callable[[], None] | None = None,
    ) -> None:
        self.engine, self.logger, self._patches = engine, logger, patches
        self.env_config = f"{prefix}_CONFIG"
        self.env_policy = f"{prefix}_POLICY"
        self.env_policy_options = f"{prefix}_POLICY_OPTIONS"
        self._before_enable = before_enable or (lambda: None)
        self._before_log = before_log or (lambda: None)
        self.active: dict[str, Any] = {"config": None, "policy": None}

    def config_from_env(self, environ: Mapping[str, str]) -> EplbConfig | None:
        """The EplbConfig in ``<PREFIX>_CONFIG``, or None when unset, empty or not enabled."""
        return config_from_env(environ, self.env_config)

    def policy_from_env(self, environ: Mapping[str, str]) -> str | None:
        """The policy name in ``<PREFIX>_POLICY`` (validated), or None."""
        return policy_from_env(environ, self.env_policy)

    def policy_options_from_env(self, environ: Mapping[str, str]) -> dict:
        """The policy options in ``<PREFIX>_POLICY_OPTIONS`` ({} when unset or empty)."""
        return options_from_env(environ, self.env_policy_options)

    def register(self, config: EplbConfig | None, swap: tuple | None) -> None:
        """The entry point's decision: ``config`` (from ``<PREFIX>_CONFIG``) turns the balancer
        on, ``swap`` (arguments of the policy swap) the swap; both is an error."""
        if config is None and swap is None:
            return
        if config is not None and swap is not None:
            raise ValueError(
                f"{self.env_config} and {self.env_policy} are both set: the plugin balancer "
                f"and the swap of {self.engine}'s own EPLB policy exclude each other; set one"
            )
        if config is not None:
            self.enable(config)
        else:
            self.enable_policy_swap(*swap)

    def enable(self, config: EplbConfig) -> None:
        """Run this project's Balancer in every model runner loaded from now on (this
        process). Idempotent for the same config; a new one applies to later runners."""
        if not isinstance(config, EplbConfig):
            raise ValueError(f"config must be an EplbConfig, got {type(config).__name__}")
        if not config.enable:
            raise ValueError("config.enable is False: call disable() to turn the plugin off")
        patches = self._patches()
        version = patches.check_version()
        if self.active["policy"] is not None:
            raise ValueError(
                f"the swap of {self.engine}'s EPLB policy ({self.active['policy'][0]!r}) is "
                f"active in this process; the plugin balancer cannot run beside "
                f"{self.engine}'s own EPLB"
            )
        if self.active["config"] == config:
            return
        self._before_enable()
        self.active["config"] = config
        patches.install(self.active_config)
        self._before_log()
        self.logger.info(
            "eplb-plugin: balancer ENABLED in pid %d (%s %s): %s; %s's own EPLB must stay off",
            os.getpid(), self.engine, version,
            ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "enable"),
            self.engine,
        )  # fmt: skip

    def enable_policy_swap(self, policy: str, *args: Any) -> None:
        """Make the engine's own EPLB place experts with eplb-plugin policy ``policy``;
        ``args`` go on to the adapter's ``swap_policy`` (e.g. the policy's options)."""
        patches = self._patches()
        version = patches.check_version()
        if self.active["config"] is not None:
            raise ValueError(
                "the plugin balancer is active in this process; it cannot be combined with "
                f"the swap of {self.engine}'s built-in EPLB policy"
            )
        from eplb_plugin.policies import check_policy_options, get_policy

        get_policy(policy)  # ValueError naming the policy when it is unknown
        for arg in args:  # the policy's options: a mistyped one is refused now, not per plan
            if isinstance(arg, dict):
                check_policy_options(policy, arg)
        key = (policy, *args)
        if self.active["policy"] == key:
            return
        patches.swap_policy(*key)
        self.active["policy"] = key
        self._before_log()
        self.logger.info(
            "eplb-plugin: %s's own EPLB now places experts with eplb-plugin policy %r (%s) in "
            "pid %d (%s %s)", self.engine, policy, ", ".join(map(repr, args)), os.getpid(),
            self.engine, version,
        )  # fmt: skip

    def disable(self) -> None:
        """Runners loaded from now on run without the plugin balancer (this process); the
        policy swap, if any, is undone. Runners already loaded keep their balancer."""
        if self.active["policy"] is not None:
            self._patches().restore_policy()
        self.active["config"] = None
        self.active["policy"] = None

    def active_config(self) -> EplbConfig | None:
        """The EplbConfig new model runners get, or None when the plugin balancer is off."""
        return self.active["config"]

    def active_policy(self) -> str | None:
        """The policy swapped into the engine's own EPLB, or None."""
        active = self.active["policy"]
        return None if active is None else active[0]


__all__ = [
    "SWITCH_API",
    "EngineSwitch",
    "config_from_env",
    "config_to_env",
    "json_from_env",
    "options_from_env",
    "policy_from_env",
]
