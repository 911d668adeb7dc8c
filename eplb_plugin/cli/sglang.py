"""``eplb sglang launch_server ...``: SGLang's server with this project's EPLB.

Every argument this command does not know goes to SGLang's ``launch_server`` unchanged. The
``--enable-eplb`` / ``--eplb-*`` options are this project's (``eplb_plugin.config``) and are
not passed on; instead the launcher

- with ``--enable-eplb``: runs the plugin balancer and keeps SGLang's own EPLB off (SGLang's
  ``--enable-eplb`` is never passed, and SGLang's own EPLB options are refused), passes
  ``--ep-num-redundant-experts R`` (R = ``--eplb-num-redundant-experts``) so that SGLang
  allocates the physical slots, and sets ``EPLB_SGLANG_CONFIG``;
- with ``--eplb-policy-only``: runs SGLang's own EPLB (passes ``--enable-eplb``) and only
  swaps its placement algorithm for ``--eplb-policy`` (``EPLB_SGLANG_POLICY``, with
  ``--eplb-policy-options`` in ``EPLB_SGLANG_POLICY_OPTIONS``);

then replaces itself by ``python -m eplb_plugin.integrations.sglang.launch <SGLang args>``,
which switches the integration on in every SGLang process (docs/sglang.md). ``--dry-run``
prints the environment and command instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from ..config import EplbConfig, add_cli_options, cli_dest

LAUNCH_MODULE = "eplb_plugin.integrations.sglang.launch"
ACTIONS = ("launch_server",)

# SGLang's options of its own EPLB (they would configure a manager that stays off).
SGLANG_EPLB_OPTIONS = (
    "--eplb-algorithm",
    "--eplb-rebalance-num-iterations",
    "--eplb-rebalance-layers-per-chunk",
    "--eplb-min-rebalancing-utilization-threshold",
    "--ep-dispatch-algorithm",
)
REDUNDANT_OPTION = "--ep-num-redundant-experts"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sglang",
        help="launch SGLang with eplb-plugin's balancer or policy",
        description="Launch SGLang's server (`eplb sglang launch_server --model-path M "
        "--tp 8 --ep 8 ... --enable-eplb --eplb-num-redundant-experts 32`). Options this "
        "command does not define go to SGLang unchanged.",
        allow_abbrev=False,
    )
    p.add_argument("action", choices=ACTIONS, help="what to launch (SGLang's launch_server)")
    add_cli_options(p)
    p.add_argument(
        "--eplb-policy-only",
        action="store_true",
        help="keep SGLang's own EPLB (recording, weight moves) and only replace its placement "
        "algorithm by --eplb-policy",
    )
    p.add_argument(
        "--eplb-swap-algorithms",
        help="with --eplb-policy-only: comma-separated SGLang algorithm names the policy "
        "answers (default: deepseek, deepseek_hierarchical, deepseek_vec, "
        "deepseek_vec_hierarchical)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the environment and command")
    p.set_defaults(func=run, accepts_extra=True)


def _given(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in ``argv`` (``--opt V`` or ``--opt=V``), or None."""
    for i, arg in enumerate(argv):
        if arg == option:
            if i + 1 >= len(argv):
                raise ValueError(f"{option} needs a value")
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _eplb_options_given(args: argparse.Namespace) -> list[str]:
    names = [n for n in EplbConfig.field_names() if n != "enable"]
    return [n for n in names if getattr(args, cli_dest(n), None) is not None]


def build_launch(args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """(environment variables to set, SGLang argument list) for ``args``.

    Raises:
        ValueError: conflicting or missing options, named.
    """
    from ..integrations.sglang.plugin import (
        ENV_ALGORITHMS,
        ENV_CONFIG,
        ENV_POLICY,
        ENV_POLICY_OPTIONS,
    )

    extra = list(args.extra)
    if "--enable-eplb" in extra:  # parse_known_args only leaves it after '--'
        raise ValueError("--enable-eplb is this launcher's own option; give it once")
    env: dict[str, str] = {}
    if args.eplb_policy_only:
        if args.enable_eplb:
            raise ValueError(
                "--enable-eplb (the plugin balancer) and --eplb-policy-only (SGLang's own EPLB "
                "with this project's policy) exclude each other"
            )
        others = [n for n in _eplb_options_given(args) if n not in ("policy", "policy_options")]
        if others:
            flags = ", ".join("--eplb-" + n.replace("_", "-") for n in others)
            raise ValueError(
                f"{flags}: options of the plugin balancer have no effect with "
                "--eplb-policy-only (SGLang's own EPLB options, e.g. "
                "--eplb-rebalance-num-iterations and --ep-num-redundant-experts, apply)"
            )
        policy = args.eplb_policy or "default"
        from ..policies import get_policy

        get_policy(policy)
        env[ENV_POLICY] = policy
        options = getattr(args, cli_dest("policy_options"), None)
        if options:
            env[ENV_POLICY_OPTIONS] = json.dumps(options, sort_keys=True)
        if args.eplb_swap_algorithms:
            env[ENV_ALGORITHMS] = args.eplb_swap_algorithms
        return env, ["--enable-eplb", *extra]
    if args.eplb_swap_algorithms:
        raise ValueError("--eplb-swap-algorithms applies only with --eplb-policy-only")
    if not args.enable_eplb:
        given = _eplb_options_given(args)
        if given:
            raise ValueError(
                f"--eplb-{given[0].replace('_', '-')} given without --enable-eplb or "
                "--eplb-policy-only: say which EPLB to run"
            )
        return env, extra
    config = EplbConfig.from_cli(args)
    for option in SGLANG_EPLB_OPTIONS:
        if _given(extra, option) is not None or any(a == option for a in extra):
            raise ValueError(
                f"{option} configures SGLang's own EPLB, which stays off under --enable-eplb "
                "(the plugin balancer); use the --eplb-* options of `eplb sglang --help`"
            )
    redundant = _given(extra, REDUNDANT_OPTION)
    if redundant is not None:
        if redundant.strip() != str(config.num_redundant_experts):
            raise ValueError(
                f"{REDUNDANT_OPTION} {redundant} disagrees with --eplb-num-redundant-experts "
                f"{config.num_redundant_experts}; give only --eplb-num-redundant-experts"
            )
    elif config.num_redundant_experts:
        extra += [REDUNDANT_OPTION, str(config.num_redundant_experts)]
    from ..integrations.sglang.plugin import config_to_env

    env[ENV_CONFIG] = config_to_env(config)
    return env, extra


def run(args: argparse.Namespace) -> int:
    env, sglang_argv = build_launch(args)
    command = [sys.executable, "-m", LAUNCH_MODULE, *sglang_argv]
    if args.dry_run:
        print(json.dumps({"env": env, "command": command}, indent=2))
        print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                        *map(shlex.quote, command)]))  # fmt: skip
        return 0
    from ..integrations.sglang.patches import check_version

    check_version()
    os.execvpe(sys.executable, command, {**os.environ, **env})
    return 0  # not reached
