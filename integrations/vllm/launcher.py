"""``eplb vllm ...``: run vLLM's own CLI with the balancer switched on in every vLLM process.

The launcher is an edge: ``eplb vllm`` turns ``--enable-eplb`` / ``--eplb-config`` (vLLM's
own flags, with vLLM's EPLBConfig keys and the plugin's fields) / ``--eplb-*`` into an
EplbConfig, this module puts it in ``EPLB_VLLM_CONFIG`` (inherited by the engine core and the
workers, where the ``vllm.general_plugins`` entry point reads it) and hands every other
argument to vLLM unchanged. vLLM's built-in EPLB is never also on: its flags are consumed by
the launcher, never passed on.

With ``--eplb-policy-only`` it does the opposite: vLLM's own EPLB runs
(``--enable-eplb --eplb-config {...}`` built from the same settings) and only its
placement policy is ours (``EPLB_VLLM_POLICY``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

from eplb_plugin.config import EplbConfig

from .plugin import (
    ENV_CONFIG,
    ENV_POLICY,
    ENV_POLICY_OPTIONS,
    ENV_V2_RUNNER,
    check_v1_runner,
    config_to_env,
)

ENTRY_GROUP = "vllm.general_plugins"
ENTRY_NAME = "eplb_plugin"
ENTRY_VALUE = "eplb_plugin.integrations.vllm:register"

# vLLM's own EPLB switches (either spelling; vLLM also takes --eplb-config.<field> VALUE).
_VLLM_EPLB = ("--enable-eplb", "--enable_eplb", "--eplb-config", "--eplb_config")
# EplbConfig fields vLLM's built-in EPLB has an equivalent for (policy-only mode).
_BUILTIN_FIELDS = {"enable", "num_redundant_experts", "window", "interval", "policy",
                   "policy_options", "layers_per_step", "log_balancedness",
                   "log_balancedness_interval"}  # fmt: skip
_OUR_ENV = (ENV_CONFIG, ENV_POLICY, ENV_POLICY_OPTIONS)


def vllm_eplb_args(argv: list[str]) -> list[str]:
    """The arguments in ``argv`` that set vLLM's own EPLB."""
    found = []
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in _VLLM_EPLB or name.startswith(("--eplb-config.", "--eplb_config.")):
            found.append(arg)
    return found


def builtin_eplb_config(config: EplbConfig, vllm_keys: Mapping[str, object] | None = None) -> dict:
    """vLLM's ``--eplb-config`` equivalent of ``config`` (policy-only mode).

    ``layers_per_step`` 0 (all layers in one step) maps to vLLM's synchronous mode, 1 to its
    asynchronous mode (one layer per step); settings vLLM's EPLB has no equivalent for are a
    ValueError naming them. ``vllm_keys``: vLLM EPLBConfig keys the plugin has no field for
    (``communicator`` with a vLLM backend, ``enable_migration_batching``), passed on as given.
    """
    default = EplbConfig()
    from eplb_plugin.cli.common import FIRST_CLASS, eplb_flag

    unsupported = [
        eplb_flag(name) if name in FIRST_CLASS else f'"{name}"'
        for name in config.field_names()
        if name not in _BUILTIN_FIELDS and getattr(config, name) != getattr(default, name)
    ]
    if config.layers_per_step not in (0, 1):
        unsupported.append(f'"layers_per_step": {config.layers_per_step}')
    if unsupported:
        raise ValueError(
            f"--eplb-policy-only keeps vLLM's own EPLB, which has no equivalent of "
            f"{', '.join(unsupported)}; drop them or use the plugin balancer (no "
            "--eplb-policy-only)"
        )
    logging = {
        name: getattr(config, name)
        for name in ("log_balancedness", "log_balancedness_interval")
        if name in config.field_names() and getattr(config, name) != getattr(default, name)
    }
    return {
        "num_redundant_experts": config.num_redundant_experts,
        "window_size": config.window,
        "step_interval": config.interval,
        "use_async": config.layers_per_step == 1,
        # The name stays vLLM's "default": the plugin swaps what that name runs.
        "policy": "default",
        **logging,
        **(vllm_keys or {}),
    }


def build_launch(
    config: EplbConfig, vllm_args: list[str], environ: Mapping[str, str], *,
    policy_only: bool = False, vllm_keys: Mapping[str, object] | None = None,
) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """The vLLM CLI arguments and the environment of ``eplb vllm``.

    Args:
        config: from ``--enable-eplb`` / ``--eplb-*`` (``EplbConfig.from_cli``).
        vllm_args: every other argument, e.g. ``["serve", "MODEL", "--port", "8000"]``.
        environ: the environment to start from.
        policy_only: keep vLLM's EPLB and only swap its policy.
        vllm_keys: vLLM EPLBConfig keys without a plugin field, for the policy swap.
    Returns:
        (argv for vLLM's CLI without the program name, environment).
    Raises:
        ValueError: no vLLM command, vLLM's own EPLB options next to the plugin's,
            ``--eplb-*`` options without ``--enable-eplb``, or options the mode cannot honour.
    """
    if not vllm_args or vllm_args[0].startswith("-"):
        raise ValueError("give a vLLM command and its arguments, e.g. `eplb vllm serve MODEL`")
    env = {k: v for k, v in environ.items() if k not in _OUR_ENV}
    argv = list(vllm_args)
    own = vllm_eplb_args(argv)
    if not config.enable:
        if policy_only:
            raise ValueError("--eplb-policy-only needs --enable-eplb")
        if config != EplbConfig(enable=False):
            raise ValueError(
                "EPLB settings (--eplb-config, --eplb-*) were given without --enable-eplb"
            )
        return argv, env
    if own:
        raise ValueError(
            f"vLLM's own EPLB option(s) {' '.join(own)} were left for vLLM next to the launcher's "
            "--enable-eplb/--eplb-* options; use only the latter"
        )
    if policy_only:
        if "--enable-expert-parallel" not in argv and "-ep" not in argv:
            raise ValueError(
                "vLLM's built-in EPLB needs expert parallelism: add --enable-expert-parallel"
            )
        builtin = builtin_eplb_config(config, vllm_keys)
        argv += ["--enable-eplb", "--eplb-config", json.dumps(builtin)]
        env[ENV_POLICY] = config.policy
        if config.policy_options:
            env[ENV_POLICY_OPTIONS] = json.dumps(config.policy_options, sort_keys=True)
    else:
        check_v1_runner(env)
        from eplb_plugin.record import check_initial_layout_path

        check_initial_layout_path(config.initial_layout)
        env[ENV_CONFIG] = config_to_env(config)
        env[ENV_V2_RUNNER] = "0"
    return argv, env


def check_entry_point(environ: Mapping[str, str]) -> None:
    """ValueError unless vLLM will load the plugin in the processes it starts."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_GROUP) if ep.value == ENTRY_VALUE]
    if not found:
        raise ValueError(
            f"the {ENTRY_GROUP} entry point {ENTRY_NAME} = {ENTRY_VALUE} is not installed, so "
            "vLLM's engine and worker processes would run without the balancer; reinstall "
            "eplb-plugin (pip install -e .) in this environment"
        )
    allowed = environ.get("VLLM_PLUGINS")
    names = {ep.name for ep in found}
    if allowed is not None and not names & {n.strip() for n in allowed.split(",")}:
        raise ValueError(
            f"VLLM_PLUGINS={allowed!r} does not list {sorted(names)[0]!r}: vLLM would not load "
            "the plugin; add it or unset VLLM_PLUGINS"
        )


def describe(argv: list[str], env: Mapping[str, str]) -> str:
    """A shell-like line of what the launcher runs (for --eplb-dry-run and logs)."""
    import shlex

    prefix = [f"{k}={shlex.quote(env[k])}" for k in (*_OUR_ENV, ENV_V2_RUNNER) if k in env]
    return " ".join(prefix + ["vllm"] + [shlex.quote(a) for a in argv])


def run_vllm(argv: list[str], env: Mapping[str, str]) -> int:
    """Run vLLM's CLI in this process with ``env`` as the environment; returns its exit code.

    The plugin is registered here too, so that the API server process and any process
    vLLM forks carry the patches even before vLLM loads its plugins.
    """
    metrics_dir = None
    if ENV_CONFIG in env and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # the balancer runs in vLLM's worker processes; /metrics is served by this one: make
        # vLLM aggregate every process's series (what it does itself for --api-server-count
        # > 1), before anything imports prometheus_client
        import tempfile

        metrics_dir = tempfile.mkdtemp(prefix="eplb-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from .patches import check_version, cli_version_workaround
    from .plugin import register

    if ENV_CONFIG in env or ENV_POLICY in env:
        check_version()
        check_entry_point(env)
    for key in _OUR_ENV:
        os.environ.pop(key, None)
    os.environ.update(env)
    register()
    cli_version_workaround()
    from vllm.entrypoints.cli.main import main as vllm_main

    saved = sys.argv
    sys.argv = ["vllm", *argv]
    try:
        vllm_main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:
        # raised inside vLLM, not by the launcher's checks of our own input: shown with vLLM's
        # traceback, as `vllm` shows it, not as a one-line `eplb vllm: error:`
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
