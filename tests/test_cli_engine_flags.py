"""The engines' own EPLB flags in `eplb vllm` / `eplb sglang`, and the shared --eplb-* options.

vLLM's `--enable-eplb --eplb-config '{...}'` (and `--eplb-config.KEY VALUE`, underscore
spellings) and SGLang's EPLB/recorder options become the plugin's EplbConfig; conflicts and
bad values end as `eplb <cmd>: error: ...` with exit code 2. Nothing here needs vLLM or SGLang.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from eplb_plugin.cli.main import build_parser, main
from eplb_plugin.config import EplbConfig

VLLM_JSON = {
    "window_size": 10,
    "step_interval": 20,
    "num_redundant_experts": 4,
    "log_balancedness": True,
    "use_async": False,
    "policy": "default",
}


def vllm_dry_run(capsys, *argv: str) -> tuple[EplbConfig | None, list[str], str]:
    """(config in EPLB_VLLM_CONFIG or None, the vLLM argv, stderr) of a dry run."""
    assert main(["vllm", *argv, "--eplb-dry-run"]) == 0
    out, err = capsys.readouterr()
    words = shlex.split(out.strip())
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "vllm"
    raw = env.get("EPLB_VLLM_CONFIG")
    return (EplbConfig.from_dict(json.loads(raw)) if raw else None), words[1:], err


def fails(capsys, command: str, *argv: str) -> str:
    """stderr of a command that must fail with exit code 2 and one error line."""
    with_dry = ["--eplb-dry-run"] if command == "vllm" else ["--dry-run"]
    assert main([command, *argv, *with_dry]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eplb {command}: error: ") or f"eplb {command}: error:" in err, err
    return err


# ---------------------------------------------------------------------- vLLM
def test_vllm_users_command_line_is_accepted_unchanged(capsys):
    config, argv, _ = vllm_dry_run(
        capsys, "serve", "MODEL", "--enable-eplb", "--eplb-config", json.dumps(VLLM_JSON),
        "--port", "8000", "--enable-expert-parallel",
    )  # fmt: skip
    assert argv == ["serve", "MODEL", "--port", "8000", "--enable-expert-parallel"]
    assert config.enable and config.window == 10 and config.interval == 20
    assert config.num_redundant_experts == 4 and config.log_balancedness is True
    assert config.layers_per_step == 0  # use_async false: every layer in one step
    assert config.policy == "default"


def test_vllm_dotted_and_underscore_forms(capsys):
    config, argv, _ = vllm_dry_run(
        capsys, "serve", "MODEL", "--enable_eplb", "--eplb-config.window_size", "7",
        "--eplb_config.step_interval=9", "--eplb-config.use_async", "true",
        "--eplb-config.policy_options.max_moved", "0.25", "--eplb-config.communicator",
        "torch_gloo", "--max-model-len", "128",
    )  # fmt: skip
    assert argv == ["serve", "MODEL", "--max-model-len", "128"]
    assert (config.window, config.interval, config.layers_per_step) == (7, 9, 1)
    assert config.policy_options == {"max_moved": 0.25}
    assert config.communicator == "torch"  # vLLM's backends: torch.distributed on the EP group


def test_vllm_json_takes_the_plugins_fields_and_first_class_options(capsys):
    config, _, _ = vllm_dry_run(
        capsys, "serve", "M", "--enable-eplb", "--eplb-dispatch", "global",
        "--eplb-num-redundant-experts", "4",
        "--eplb-config", '{"num_redundant_experts": 4, "min_gain": 0, "record_dir": "/r"}',
    )  # fmt: skip
    assert config.dispatch == "global" and config.min_gain == 0.0
    assert config.record_dir == "/r" and config.num_redundant_experts == 4


def test_vllm_ignored_key_warns(capsys):
    config, _, err = vllm_dry_run(capsys, "serve", "M", "--enable-eplb", "--eplb-config",
                                  '{"enable_migration_batching": true}')  # fmt: skip
    assert config.enable and "enable_migration_batching" in err and "ignored" in err


def test_vllm_legacy_option_is_a_hidden_alias_with_a_warning(capsys):
    config, _, err = vllm_dry_run(capsys, "serve", "M", "--enable-eplb", "--eplb-min-gain", "0")
    assert config.min_gain == 0.0
    assert "deprecated" in err and "--eplb-config '{\"min_gain\": 0.0}'" in err
    assert "--eplb-min-gain" not in build_parser().format_help()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--eplb-window", "5", "--eplb-config", '{"window_size": 6}'], "disagrees"),
        (["--eplb-config", '{"window_size": 6, "window": 7}'], "disagrees"),
        (["--eplb-config", '{"window_size": 6}', "--eplb-config.window_size", "8"], "disagrees"),
        (["--eplb-config", '{"window_sz": 6}'], "unknown key 'window_sz'"),
        (["--eplb-config", '{"use_async": "maybe"}'], "use_async must be true or false"),
        (["--eplb-config", '{"window_size": 0}'], "window_size must be an integer >= 1"),
        (["--eplb-config", '{"policy": "nope"}'], "policy"),
        (["--eplb-config", '{"communicator": "carrier-pigeon"}'], "communicator"),
        (["--eplb-config.step_interval"], "needs a value"),
    ],
)
def test_vllm_conflicts_and_bad_values_exit_2(capsys, argv, match):
    err = fails(capsys, "vllm", "serve", "M", "--enable-eplb", *argv)
    assert re.search(match, err), err


def test_vllm_settings_without_enable_and_bad_json_exit_2(capsys):
    assert "without --enable-eplb" in fails(capsys, "vllm", "serve", "M", "--eplb-config",
                                            '{"window_size": 6}')  # fmt: skip
    assert "without --enable-eplb" in fails(capsys, "vllm", "serve", "M",
                                            "--eplb-config.window_size", "6")  # fmt: skip
    with pytest.raises(SystemExit) as exc:  # argparse's own error for a non-object
        main(["vllm", "serve", "M", "--enable-eplb", "--eplb-config", "[1]"])
    assert exc.value.code == 2
    assert "expected a JSON object" in capsys.readouterr().err
    assert "exclude each other" in fails(capsys, "vllm", "serve", "M", "--enable-eplb",
                                         "--no-enable-eplb")  # fmt: skip


def test_vllm_policy_only_passes_vllms_own_keys(capsys):
    _, argv, _ = vllm_dry_run(
        capsys, "serve", "M", "--enable-expert-parallel", "--enable-eplb", "--eplb-policy-only",
        "--eplb-config", '{"window_size": 10, "step_interval": 20, "log_balancedness": true, '
        '"communicator": "torch_gloo", "enable_migration_batching": true}',
    )  # fmt: skip
    assert argv[:5] == ["serve", "M", "--enable-expert-parallel", "--enable-eplb",
                        "--eplb-config"]  # fmt: skip
    assert json.loads(argv[5]) == {
        "num_redundant_experts": 0, "window_size": 10, "step_interval": 20, "use_async": True,
        "policy": "default", "log_balancedness": True, "communicator": "torch_gloo",
        "enable_migration_batching": True,
    }  # fmt: skip
    err = fails(capsys, "vllm", "serve", "M", "-ep", "--enable-eplb", "--eplb-policy-only",
                "--eplb-config", '{"min_gain": 0}')  # fmt: skip
    assert '"min_gain"' in err


# ---------------------------------------------------------------------- help and options
def _visible_eplb_options(command: str) -> list[str]:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return sorted(o for a in sub._actions if a.help != "==SUPPRESS=="
                  for o in a.option_strings if "eplb" in o)  # fmt: skip


def test_first_class_options_are_shared_and_few():
    shared = ["--eplb-config", "--eplb-dispatch", "--eplb-interval",
              "--eplb-num-redundant-experts", "--eplb-policy", "--eplb-window"]  # fmt: skip
    assert _visible_eplb_options("demo") == shared
    assert _visible_eplb_options("vllm") == sorted(
        [*shared, "--enable-eplb", "--eplb-dry-run", "--eplb-policy-only"]
    )
    assert _visible_eplb_options("sglang") == sorted(
        [*shared, "--enable-eplb", "--eplb-policy-only", "--eplb-swap-algorithms"]
    )


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        ("demo", {"num-redundant-experts": "16", "window": "12", "interval": "12",
                  "dispatch": "'global'"}),
        ("vllm", {"num-redundant-experts": "0", "window": "1000", "interval": "3000",
                  "dispatch": "'static'"}),
        ("sglang", {"num-redundant-experts": "0", "window": "1000", "interval": "3000",
                    "dispatch": "'static'"}),
    ],
)  # fmt: skip
def test_help_shows_the_defaults_that_apply(command, defaults):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    text = " ".join(sub.format_help().split())
    for option, value in defaults.items():
        assert re.search(rf"--eplb-{option} \S+ .*?\(default {value}\)", text), (option, text)


def test_demo_config_takes_json_and_keeps_demo_defaults():
    from eplb_plugin.cli.demo import demo_config

    args, _ = build_parser().parse_known_args(
        ["demo", "--eplb-config", '{"min_gain": 0.1, "window_size": 6}', "--enable-eplb"]
    )
    config = demo_config(args)
    assert (config.num_redundant_experts, config.window, config.interval) == (16, 6, 12)
    assert config.min_gain == 0.1 and config.dispatch == "global" and config.enable


# ---------------------------------------------------------------------- SGLang
def sglang_launch(*argv: str):
    from eplb_plugin.cli.sglang import build_launch
    from eplb_plugin.integrations.sglang.plugin import ENV_CONFIG

    args, extra = build_parser().parse_known_args(["sglang", "launch_server", *argv])
    args.extra = extra
    env, sglang_argv = build_launch(args)
    raw = env.get(ENV_CONFIG)
    return (EplbConfig.from_dict(json.loads(raw)) if raw else None), sglang_argv, env


def test_sglang_own_flags_configure_the_balancer():
    config, argv, _ = sglang_launch(
        "--model-path", "m", "--enable-eplb", "--ep-num-redundant-experts", "32",
        "--eplb-rebalance-num-iterations", "500", "--eplb-rebalance-layers-per-chunk", "2",
        "--expert-distribution-recorder-mode", "stat",
        "--expert-distribution-recorder-buffer-size=100", "--eplb-algorithm", "auto",
    )  # fmt: skip
    assert config.enable and config.num_redundant_experts == 32
    assert (config.interval, config.window, config.layers_per_step) == (500, 100, 2)
    # SGLang still allocates the slots and keeps its recorder; its own EPLB stays off
    assert argv == ["--model-path", "m", "--ep-num-redundant-experts", "32",
                    "--expert-distribution-recorder-mode", "stat",
                    "--expert-distribution-recorder-buffer-size=100"]  # fmt: skip


def test_sglang_iterations_also_set_the_window_like_sglangs_buffer():
    config, _, _ = sglang_launch("--enable-eplb", "--eplb-rebalance-num-iterations", "300")
    assert (config.interval, config.window) == (300, 300)
    config, _, _ = sglang_launch("--enable-eplb", "--eplb-rebalance-num-iterations", "300",
                                 "--eplb-window", "50")  # fmt: skip
    assert (config.interval, config.window) == (300, 50)


def test_sglang_json_and_record_dir_default_to_sglangs_dump_form():
    record = '{"record_dir": "/d", "min_gain": 0}'
    config, argv, _ = sglang_launch("--enable-eplb", "--eplb-num-redundant-experts", "8",
                                    "--eplb-config", record)  # fmt: skip
    assert config.record_dir == "/d" and config.record_format == "sglang"
    assert argv == ["--ep-num-redundant-experts", "8"]
    config, _, _ = sglang_launch(
        "--enable-eplb", "--eplb-config", '{"record_dir": "/d", "record_format": "eplb"}'
    )
    assert config.record_format == "eplb"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--eplb-interval", "5", "--eplb-rebalance-num-iterations", "6"], "disagrees"),
        (["--eplb-num-redundant-experts", "8", "--ep-num-redundant-experts", "4"], "disagrees"),
        (["--expert-distribution-recorder-buffer-size", "-1"], "finite window"),
        (["--eplb-rebalance-num-iterations", "x"], "integer"),
        (["--eplb-algorithm", "deepseek"], "--eplb-policy"),
        (["--eplb-min-rebalancing-utilization-threshold", "0.5"], "min_gain"),
        (["--ep-dispatch-algorithm", "static"], "--eplb-dispatch"),
        (["--eplb-config", '{"window_size": 0}'], "window_size"),
    ],
)
def test_sglang_conflicts_and_bad_values_exit_2(capsys, argv, match):
    err = fails(capsys, "sglang", "launch_server", "--enable-eplb", *argv)
    assert re.search(match, err), err


def test_sglang_policy_only_leaves_sglangs_options_alone():
    config, argv, env = sglang_launch(
        "--eplb-policy-only", "--eplb-config", '{"policy": "deepseek"}',
        "--eplb-rebalance-num-iterations", "500", "--ep-num-redundant-experts", "32",
    )  # fmt: skip
    assert config is None
    assert argv == ["--enable-eplb", "--eplb-rebalance-num-iterations", "500",
                    "--ep-num-redundant-experts", "32"]  # fmt: skip
    with pytest.raises(ValueError, match="min_gain"):
        sglang_launch("--eplb-policy-only", "--eplb-config", '{"min_gain": 0}')
