"""SGLang's own EPLB/recorder flags, as `eplb sglang launch_server` reads them, against SGLang
0.5.23's real argument parser (.venv-sglang): every option of the mapping table is one SGLang
defines, and what the launcher hands to SGLang parses there with the values the balancer got."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("sglang.srt.server_args")

from eplb_plugin.cli.main import build_parser  # noqa: E402
from eplb_plugin.cli.sglang import build_launch  # noqa: E402
from eplb_plugin.config import EplbConfig  # noqa: E402
from eplb_plugin.engine_fields import SGLANG_OPTIONS  # noqa: E402
from eplb_plugin.integrations.sglang.plugin import ENV_CONFIG  # noqa: E402


def sglang_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    return parser


def test_every_mapped_option_is_sglangs():
    options = {o for a in sglang_parser()._actions for o in a.option_strings}
    assert set(SGLANG_OPTIONS) <= options
    assert {"--enable-eplb", "--init-expert-location"} <= options


def test_what_sglang_gets_parses_in_sglang_with_the_balancers_values():
    argv = ["sglang", "launch_server", "--model-path", "m", "--enable-eplb",
            "--ep-num-redundant-experts", "32", "--eplb-rebalance-num-iterations", "500",
            "--expert-distribution-recorder-mode", "stat",
            "--expert-distribution-recorder-buffer-size", "200"]  # fmt: skip
    args, extra = build_parser().parse_known_args(argv)
    args.extra = extra
    env, sglang_argv = build_launch(args)
    config = EplbConfig.from_dict(json.loads(env[ENV_CONFIG]))
    parsed = sglang_parser().parse_args(sglang_argv)
    assert parsed.enable_eplb is False  # SGLang's own EPLB manager stays off
    assert parsed.ep_num_redundant_experts == config.num_redundant_experts == 32
    assert parsed.expert_distribution_recorder_mode == "stat"
    assert parsed.expert_distribution_recorder_buffer_size == config.window == 200
    assert config.interval == 500
