"""EplbConfig: validation, CLI options, dict round trips."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from eplb_plugin.config import EplbConfig, add_cli_options, cli_flag


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_cli_options(p)
    return p


def test_defaults_are_valid_and_documented():
    config = EplbConfig()
    assert config.enable and config.policy == "default" and config.dispatch == "static"
    assert config.layers_per_step >= 0 and config.staging_bytes > 0
    help_text = parser().format_help()
    for name in EplbConfig.field_names():
        if name != "enable":
            assert cli_flag(name) in help_text
    assert "--enable-eplb" in help_text


@pytest.mark.parametrize(
    "field,value",
    [
        ("enable", 1),
        ("num_redundant_experts", -1),
        ("num_redundant_experts", 1.5),
        ("window", 0),
        ("interval", True),
        ("predictor", "median"),
        ("ema_decay", 1.0),
        ("ema_decay", float("nan")),
        ("policy", "no-such-policy"),
        ("policy_options", "max_moved=1"),
        ("policy_options", {1: 2}),
        ("dispatch", "random"),
        ("waterfill_iters", 0),
        ("waterfill_iters", 129),
        ("waterfill_iters", True),
        ("min_gain", -0.1),
        ("min_gain", 2.0),
        ("layers_per_step", -1),
        ("staging_bytes", 0),
        ("communicator", "mpi"),
        ("plan_on", "rank1"),
        ("plan_delay", -2),
        ("timeout_s", 0),
        ("num_groups", 0),
        ("num_nodes", 0),
        ("seed", -1),
    ],
)
def test_bad_values_name_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        EplbConfig(**{field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_cli_round_trip():
    args = parser().parse_args(
        [
            "--enable-eplb",
            "--eplb-num-redundant-experts", "8",
            "--eplb-window", "50",
            "--eplb-predictor", "ema",
            "--eplb-ema-decay", "0.9",
            "--eplb-min-gain", "0.05",
            "--eplb-layers-per-step", "0",
            "--eplb-plan-on", "all",
            "--eplb-timeout-s", "5",
            "--eplb-policy-options", '{"max_moved": 0.25}',
        ]
    )  # fmt: skip
    config = EplbConfig.from_cli(args)
    assert config.enable and config.num_redundant_experts == 8 and config.window == 50
    assert config.predictor == "ema" and config.ema_decay == 0.9 and config.min_gain == 0.05
    assert config.layers_per_step == 0 and config.plan_on == "all" and config.timeout_s == 5.0
    assert config.policy_options == {"max_moved": 0.25}
    assert config.interval == EplbConfig().interval  # untouched options keep the default
    again = EplbConfig.from_cli(parser().parse_args(config.to_cli()))
    assert again == config


def test_cli_enable_is_opt_in_and_validated():
    assert EplbConfig.from_cli(parser().parse_args([])).enable is False
    with pytest.raises(ValueError, match="policy"):
        EplbConfig.from_cli(parser().parse_args(["--eplb-policy", "nope"]))
    with pytest.raises(SystemExit):
        parser().parse_args(["--eplb-dispatch", "random"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--eplb-policy-options", "[1, 2]"])
    with pytest.raises(SystemExit):  # argparse's error, not a RecursionError traceback
        parser().parse_args(["--eplb-policy-options", "[" * 100_000 + "]" * 100_000])


def test_dict_round_trip_and_unknown_keys():
    config = EplbConfig(window=7, dispatch="local")
    assert EplbConfig.from_dict(config.to_dict()) == config
    assert set(config.to_dict()) == {f.name for f in dataclasses.fields(EplbConfig)}
    with pytest.raises(ValueError, match="window_size"):
        EplbConfig.from_dict({"window_size": 3})
