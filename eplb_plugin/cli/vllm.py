"""``eplb vllm COMMAND ...``: vLLM's CLI with eplb-plugin's balancer behind ``--enable-eplb``.

    eplb vllm serve MODEL --enable-eplb --eplb-num-redundant-experts 4 [vLLM options ...]

``--enable-eplb`` and the ``--eplb-*`` options have the names and meanings of ``eplb demo``;
every other argument goes to vLLM unchanged. vLLM's built-in EPLB stays off. With
``--eplb-policy-only`` vLLM's built-in EPLB runs instead and only its placement policy is
eplb-plugin's (``--eplb-policy``). See docs/vllm.md.
"""

from __future__ import annotations

import argparse
import os

from ..config import EplbConfig, add_cli_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vllm",
        help="run vLLM (e.g. `eplb vllm serve MODEL`) with eplb-plugin's balancer",
        description="Run vLLM's own CLI with eplb-plugin's expert-parallel load balancer "
        "inside every vLLM worker. --enable-eplb and the --eplb-* options configure it; "
        "every other argument (the vLLM command, the model, vLLM's options) is passed to "
        "vLLM unchanged. vLLM's built-in EPLB is kept off.",
        epilog="vLLM's own options: `vllm serve --help`.",
        allow_abbrev=False,
    )
    add_cli_options(p)
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

    config = EplbConfig.from_cli(args)
    argv, env = build_launch(config, list(args.extra), os.environ,
                             policy_only=args.eplb_policy_only)  # fmt: skip
    if args.eplb_dry_run:
        print(describe(argv, env))
        return 0
    return run_vllm(argv, env)
