"""How SGLang reaches the integration: its plugin loader and the launcher module (.venv-sglang)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("sglang.srt.eplb")

from eplb_plugin.config import EplbConfig  # noqa: E402
from eplb_plugin.integrations.sglang import ENV_CONFIG, ENV_POLICY, disable, plugin  # noqa: E402

LAUNCH = "eplb_plugin.integrations.sglang.launch"


def test_sglang_plugin_loader_finds_and_runs_the_entry_point(sglang_eplb, monkeypatch):
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    found = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    if "eplb_plugin" not in found:
        pytest.fail(
            "eplb-plugin's sglang.srt.plugins entry point is not installed: pip install -e ."
        )
    register, _dist = found["eplb_plugin"]
    algorithms = sglang_eplb.algorithms
    original = algorithms.rebalance_experts
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    monkeypatch.setenv(ENV_POLICY, "deepseek")
    try:
        register()
        assert plugin.active_policy() == "deepseek"
        assert algorithms.rebalance_experts.__wrapped__ is original
    finally:
        disable()
    assert algorithms.rebalance_experts is original


def _launch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in (ENV_CONFIG, ENV_POLICY)}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", LAUNCH, *args], env=full, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip


def test_launch_module_refuses_bad_settings_before_sglang_starts():
    result = _launch({ENV_POLICY: "no-such-policy"}, "--help")
    assert result.returncode != 0
    assert "is not a policy" in result.stderr


def test_launch_module_hands_over_to_sglang_server_args():
    """The module applies the settings (balancer mode), then SGLang's own argument parser
    runs (here only as far as --help)."""
    config = EplbConfig(num_redundant_experts=4)
    result = _launch({ENV_CONFIG: plugin.config_to_env(config)}, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--init-expert-location" in result.stdout
    assert "--ep-num-redundant-experts" in result.stdout
