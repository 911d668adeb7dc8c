"""Progress bars are drawn on terminals only: a pipe or a log file gets no redraws."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_simulate_draws_no_progress_bar_into_a_pipe():
    load = ROOT / "examples" / "dsv2lite_intent_load.npy"
    cmd = [
        sys.executable,
        "-m",
        "eplb_plugin.cli.main",
        "simulate",
        "--trace",
        str(load),
        "--replicas",
        "80",
        "--gpus",
        "8",
        "--window",
        "4",
        "--interval",
        "4",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "baseline" in run.stdout
    assert run.stderr == ""
