"""``eplb vllm COMMAND ...``: vLLM's CLI with eplb-plugin's balancer behind ``--enable-eplb``.

    eplb vllm serve MODEL --enable-eplb --eplb-config '{"window_size": 1000, ...}' [vLLM options]

vLLM's own ``--enable-eplb --eplb-config '{...}'`` (and ``--eplb-config.KEY VALUE``,
underscore spellings included) is taken as it is, vLLM's ``EPLBConfig`` keys mapped onto the
plugin's fields (``eplb_plugin.engine_fields.VLLM_FIELDS``); the plugin's own fields go in the
same JSON. The first-class ``--eplb-*`` options are those of ``eplb demo`` and ``eplb
sglang``. Every other argument goes to vLLM unchanged; vLLM's built-in EPLB stays off. With
``--eplb-policy-only`` vLLM's built-in EPLB runs instead and only its placement policy is
eplb-plugin's. See docs/vllm.md.
"""

from __future__ import annotations

import argparse
import os

from .common import add_eplb_options, eplb_config_from_args

PROG = "eplb vllm"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vllm",
        help="run vLLM (e.g. `eplb vllm serve MODEL`) with eplb-plugin's balancer",
        description="Run vLLM's own CLI with eplb-plugin's expert-parallel load balancer "
        "inside every vLLM worker. vLLM's --enable-eplb --eplb-config '{...}' configure it "
        "(vLLM's EPLBConfig keys and the plugin's fields in one JSON); every other argument "
        "(the vLLM command, the model, vLLM's options) is passed to vLLM unchanged. vLLM's "
        "built-in EPLB is kept off.",
        epilog="vLLM's own options: `vllm serve --help`. Field table: docs/vllm.md.",
        allow_abbrev=False,
    )
    add_eplb_options(p)
    p.add_argument(
        "--eplb-policy-only",
        action="store_true",
        help="keep vLLM's built-in EPLB (needs --enable-expert-parallel and a GPU platform) "
        "and only replace its placement policy by --eplb-policy",
    )
    p.add_argument(
        "--eplb-dry-run",
        action="store_true",
        help="print the vLLM command and environment instead of running it",
    )
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    from eplb_plugin.integrations.vllm.launcher import build_launch, describe, run_vllm

    config, _ = eplb_config_from_args(PROG, args)
    argv, env = build_launch(
        config, list(args.extra), os.environ, policy_only=args.eplb_policy_only,
        vllm_keys=vllm_only_keys(args),
    )  # fmt: skip
    if args.eplb_dry_run:
        print(describe(argv, env))
        return 0
    return run_vllm(argv, env)


def vllm_only_keys(args: argparse.Namespace) -> dict:
    """vLLM EPLBConfig keys given that the plugin has no field for (the policy swap passes
    them to vLLM's own EPLB)."""
    from ..engine_fields import VLLM_COMMUNICATORS

    found: dict = {}
    for obj in [*(getattr(args, "eplb_config", None) or []), getattr(args, "eplb_dotted", {})]:
        for key, value in obj.items():
            if key == "enable_migration_batching" or (
                key == "communicator" and value in VLLM_COMMUNICATORS
            ):
                found[key] = value
    return found
