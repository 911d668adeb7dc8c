"""The ``sglang.srt.plugins`` entry point and the process-wide switch of the integration.

SGLang (>= 0.5.23) calls every general plugin of the entry-point group ``sglang.srt.plugins``
early in each of its processes (launcher, scheduler, detokenizer, data-parallel controller);
it logs and ignores a plugin that raises. The launcher module
(``python -m eplb_plugin.integrations.sglang.launch``, started by ``eplb sglang
launch_server``) also calls :func:`register` when it is imported, which includes every
process SGLang spawns from it (``multiprocessing`` re-imports the main module there), so
the integration works with or without the entry point installed, and there a bad setting
stops the process instead of being logged. :func:`register` is cheap, idempotent, imports
no SGLang module itself, and does nothing unless ``EPLB_SGLANG_CONFIG`` or
``EPLB_SGLANG_POLICY`` is set (:mod:`eplb_plugin.integrations.common.plugin`); with the
policy, ``EPLB_SGLANG_ALGORITHMS`` (comma-separated SGLang algorithm names the swap
answers) and ``EPLB_SGLANG_POLICY_OPTIONS`` (keyword options of the policy) may be set too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ..common.plugin import SWITCH_API, EngineSwitch
from ..common.plugin import config_to_env as config_to_env  # re-exported

ENV_ALGORITHMS = "EPLB_SGLANG_ALGORITHMS"

# A child of SGLang's "sglang" logger, so that our lines carry SGLang's format and handlers.
logger = logging.getLogger("sglang.eplb_plugin")


def _patches():
    from . import patches

    return patches


_SWITCH = EngineSwitch("SGLang", "EPLB_SGLANG", logger, _patches)
_ACTIVE = _SWITCH.active
ENV_CONFIG, ENV_POLICY = _SWITCH.env_config, _SWITCH.env_policy
ENV_POLICY_OPTIONS = _SWITCH.env_policy_options
enable, disable = _SWITCH.enable, _SWITCH.disable
active_config, active_policy = _SWITCH.active_config, _SWITCH.active_policy
config_from_env = _SWITCH.config_from_env


def policy_from_env(
    environ: Mapping[str, str],
) -> tuple[str, tuple[str, ...] | None, dict] | None:
    """(policy, algorithms or None, options) from ``EPLB_SGLANG_POLICY``,
    ``EPLB_SGLANG_ALGORITHMS`` and ``EPLB_SGLANG_POLICY_OPTIONS``; None without a policy.

    Raises:
        ValueError: the policy is not registered, an algorithm name is unknown, or the
            options are not a JSON object.
    """
    name = _SWITCH.policy_from_env(environ)
    if name is None:
        return None
    from .policy import KNOWN_ALGORITHMS

    options = _SWITCH.policy_options_from_env(environ)
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


def register() -> None:
    """``sglang.srt.plugins`` entry point: turn on what the environment asks for.

    Raises when the environment is invalid, both modes are asked for, or the installed
    SGLang is not a version the patches were written for.
    """
    _SWITCH.register(config_from_env(os.environ), policy_from_env(os.environ))


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
    _SWITCH.enable_policy_swap(policy, algorithms, dict(options or {}))


__all__ = [*SWITCH_API, *["ENV_ALGORITHMS"]]
