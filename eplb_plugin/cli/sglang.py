"""``eplb sglang launch_server ...``: SGLang's server with this project's EPLB.

Every argument this command does not know goes to SGLang's ``launch_server`` unchanged.
``--enable-eplb``, ``--eplb-config`` and the first-class ``--eplb-*`` options are this
project's (the same in ``eplb demo`` and ``eplb vllm``) and are not passed on; then

- with ``--enable-eplb``: runs the plugin balancer and keeps SGLang's own EPLB off (SGLang's
  ``--enable-eplb`` is never passed). SGLang's own EPLB and recorder options are read as
  the balancer's settings (``eplb_plugin.engine_fields.SGLANG_OPTIONS``:
  ``--ep-num-redundant-experts``, ``--eplb-rebalance-num-iterations``,
  ``--eplb-rebalance-layers-per-chunk``, ``--expert-distribution-recorder-buffer-size``, ...);
  ``--ep-num-redundant-experts R`` is passed so that SGLang allocates the physical slots;
  the EplbConfig goes in ``EPLB_SGLANG_CONFIG``;
- with ``--eplb-policy-only``: runs SGLang's own EPLB (passes ``--enable-eplb`` and SGLang's
  options unchanged) and only swaps its placement algorithm for the policy
  (``EPLB_SGLANG_POLICY``, with its options in ``EPLB_SGLANG_POLICY_OPTIONS``);

then replaces itself by ``python -m eplb_plugin.integrations.sglang.launch <SGLang args>``,
which switches the integration on in every SGLang process (docs/sglang.md). ``--dry-run``
prints the environment and command instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys

from .common import add_eplb_options, eplb_config_from_args

PROG = "eplb sglang"
LAUNCH_MODULE = "eplb_plugin.integrations.sglang.launch"
ACTIONS = ("launch_server",)
REDUNDANT_OPTION = "--ep-num-redundant-experts"
ITERATIONS_OPTION = "--eplb-rebalance-num-iterations"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sglang",
        help="launch SGLang with eplb-plugin's balancer or policy",
        description="Launch SGLang's server (`eplb sglang launch_server --model-path M "
        "--tp 8 --ep 8 ... --enable-eplb --ep-num-redundant-experts 32`). SGLang's own EPLB "
        "and recorder options configure the plugin balancer; options this command does not "
        "define go to SGLang unchanged.",
        epilog="Field table: docs/sglang.md.",
        allow_abbrev=False,
    )
    p.add_argument("action", choices=ACTIONS, help="what to launch (SGLang's launch_server)")
    add_eplb_options(p)
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


def take_sglang_options(extra: list[str]) -> tuple[list[tuple[str, str, object]], list[str], dict]:
    """SGLang's EPLB and recorder options in ``extra``, read as the balancer's settings.

    Returns:
        ([(option, EplbConfig field, value)], the arguments SGLang still gets,
        {option: value as given}).
    Raises:
        ValueError: an option the balancer cannot honour, or a bad value, named.
    """
    from ..engine_fields import SGLANG_HARMLESS, SGLANG_OPTIONS

    sources: list[tuple[str, str, object]] = []
    rest: list[str] = []
    given: dict[str, str] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        i += 1
        option, eq, value = arg.partition("=")
        entry = SGLANG_OPTIONS.get(option)
        if entry is None:
            rest.append(arg)
            continue
        if not eq:
            if i >= len(extra):
                raise ValueError(f"{option} needs a value")
            value = extra[i]
            i += 1
        given[option] = value
        if entry.refused:
            if value.strip() in SGLANG_HARMLESS.get(option, ()):
                continue  # SGLang's default, which the plugin matches
            raise ValueError(
                f"{option} {value} configures SGLang's own EPLB, which stays off under "
                f"--enable-eplb (the plugin balancer): {entry.refused}"
            )
        if entry.field is not None:
            sources.append((option, entry.field, entry.convert(value)))
        if entry.passed_on:
            rest += [arg] if eq else [option, value]
    return sources, rest, given


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

    if "--enable-eplb" in args.extra:  # parse_known_args only leaves it after '--'
        raise ValueError("--enable-eplb is this launcher's own option; give it once")
    env: dict[str, str] = {}
    if args.eplb_policy_only:
        if args.enable_eplb:
            raise ValueError(
                "--enable-eplb (the plugin balancer) and --eplb-policy-only (SGLang's own EPLB "
                "with this project's policy) exclude each other"
            )
        if args.eplb_policy is not None:
            from ..policies import get_policy

            get_policy(args.eplb_policy)  # names the policy and the known ones
        config, given = eplb_config_from_args(PROG, args, {"enable": True})
        others = sorted(given - {"policy", "policy_options", "enable"})
        if others:
            raise ValueError(
                f"{', '.join(others)}: settings of the plugin balancer have no effect with "
                "--eplb-policy-only (SGLang's own EPLB options, e.g. "
                "--eplb-rebalance-num-iterations and --ep-num-redundant-experts, apply)"
            )
        env[ENV_POLICY] = config.policy
        if config.policy_options:
            env[ENV_POLICY_OPTIONS] = json.dumps(config.policy_options, sort_keys=True)
        if args.eplb_swap_algorithms:
            env[ENV_ALGORITHMS] = args.eplb_swap_algorithms
        return env, ["--enable-eplb", *args.extra]
    if args.eplb_swap_algorithms:
        raise ValueError("--eplb-swap-algorithms applies only with --eplb-policy-only")
    if not args.enable_eplb:
        config, given = eplb_config_from_args(PROG, args)
        if given:
            raise ValueError(
                f"{sorted(given)[0]} given without --enable-eplb or --eplb-policy-only: say "
                "which EPLB to run"
            )
        return env, list(args.extra)
    sources, extra, sglang_given = take_sglang_options(list(args.extra))
    args.extra = extra
    config, given = eplb_config_from_args(PROG, args, engine_sources=sources)
    changes: dict = {}
    if ITERATIONS_OPTION in sglang_given and "window" not in given:
        changes["window"] = config.interval  # SGLang's recorder buffer defaults to it
    if config.record_dir and "record_format" not in given:
        changes["record_format"] = "sglang"  # the dump form SGLang users read
    if changes:
        config = dataclasses.replace(config, **changes)
    if config.initial_layout:
        raise ValueError(
            "initial_layout: SGLang takes the initial layout itself: pass "
            "--init-expert-location FILE (an `eplb export` folder's expert_location.json)"
        )
    extra = list(args.extra)
    if REDUNDANT_OPTION not in sglang_given and config.num_redundant_experts:
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
