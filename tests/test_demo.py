"""``eplb demo``: end to end on CPU ranks, figures, PNG report, bad input."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from eplb_plugin.cli.main import main  # noqa: E402
from eplb_plugin.integrations.transformers import engine as engine_mod  # noqa: E402

SMALL = ["--ranks", "2", "--steps", "9", "--prompts", "6", "--prompt-len", "4"]
FAST_EPLB = ["--eplb-window", "3", "--eplb-interval", "3", "--eplb-plan-delay", "0"]


@pytest.fixture
def torch_kernels(monkeypatch):
    # the demo forwards EPLB_KERNELS to its ranks; the Triton interpreter would take minutes
    monkeypatch.setenv("EPLB_KERNELS", "torch")


def test_demo_json_figures_and_report(tmp_path, capsys, torch_kernels):
    report = tmp_path / "report.png"
    code = main(["demo", *SMALL, *FAST_EPLB, "--report", str(report), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["tokens_identical"] is True and out["tokens_compared"] == 6 * 9
    assert out["family"] == "deepseek_v3" and out["routing"] == "trace"
    assert out["rebalances"] >= 1 and out["slots_moved"] > 0 and out["bytes_moved"] > 0
    assert out["longest_pause_s"] > 0
    for run in ("off", "on"):
        assert 0 < out[run]["balancedness"] <= 1
        assert out[run]["max_over_mean"] >= 1
        assert len(out[run]["gpu_share"]) == 2
        # the report's bars and the table's max/mean are the same figure
        assert out[run]["busiest_share"][0] == pytest.approx(out[run]["max_over_mean"])
        assert sum(out[run]["busiest_share"]) == pytest.approx(2)
    assert out["eplb"]["window"] == 3 and out["eplb"]["enable"] is True
    assert out["eplb"]["num_redundant_experts"] == 16  # the demo's default
    data = report.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_demo_table_and_skewed_routing(tmp_path, capsys, torch_kernels):
    code = main(["demo", *SMALL, *FAST_EPLB, "--routing", "skewed", "--no-report",
                 "--eplb-dispatch", "static", "--enable-eplb"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "balancedness (mean/max GPU load)" in out and "slots moved" in out
    assert "routing: skewed" in out and "dispatch static" in out
    assert "generated tokens with EPLB on vs off: identical (6 sequences x 9 tokens)" in out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ranks", "3"], "EP size 3 does not divide the 64 physical slots"),
        (["--ranks", "8", "--eplb-num-redundant-experts", "4"], "does not divide the 68"),
        (["--ranks", "4", "--prompts", "2"], "--prompts=2 must be >= --ranks=4"),
        (["--model", "/nonexistent"], "is not a folder"),
        (["--report", "out.jpg"], "must end with .png"),
        (["--eplb-window", "0"], "EplbConfig.window=0"),
        (["--routing", "model", "--trace", "x.npz"], "--trace is only used with --routing"),
        (["--trace", "/nope.npz"], "routing trace '/nope.npz' not found"),
    ],
)
def test_demo_bad_input_fails_before_any_process(argv, message, monkeypatch, capsys):
    def no_processes(mp):
        raise AssertionError("a process was about to start")

    monkeypatch.setattr(engine_mod, "_context", no_processes)
    assert main(["demo", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "ranks;" not in captured.out  # failed before announcing the run


def test_demo_refuses_unsupported_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine_mod, "_context", lambda mp: pytest.fail("process started"))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "model_type='llama'" in capsys.readouterr().err


def test_demo_on_a_local_checkpoint_with_its_own_router(tmp_path, capsys, torch_kernels):
    from eplb_plugin.integrations.transformers.tiny import save_tiny_model

    path = save_tiny_model("qwen3_moe", str(tmp_path / "qwen3"), seed=4)
    code = main(["demo", "--model", path, *SMALL, *FAST_EPLB, "--no-report", "--json",
                 "--eplb-num-redundant-experts", "4"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["family"] == "qwen3_moe" and out["routing"] == "model"
    assert out["model"] == path and out["tokens_identical"] is True
    assert len(out["on"]["gpu_share"]) == 2
