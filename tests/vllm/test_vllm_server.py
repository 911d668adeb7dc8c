"""``eplb vllm serve`` starts vLLM's OpenAI-compatible server with the plugin balancer on.

The launcher runs in a subprocess on 127.0.0.1 with a free port; vLLM starts its engine core
and worker processes, which load the plugin through the ``vllm.general_plugins`` entry point
and read the config from the environment. The test polls ``/health`` with a deadline, sends
completions until a rebalance shows in the server log, then stops the server (SIGINT, then
SIGKILL of its process group after a grace period).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

# `tests/` is on sys.path during the test run, which makes this folder importable as a
# namespace package named "vllm": only a spec with a file is the real vLLM.
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    pytest.skip("vLLM is not installed (these tests run in .venv-vllm: .ci/vllm.sh)",
                allow_module_level=True)  # fmt: skip
pytest.importorskip("vllm")

START_S = 240.0
REQUESTS = 6


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200
        return json.loads(response.read())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the engine core and worker, if still there
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_launcher_serves_completions_with_eplb(tiny_model, tmp_path):
    from importlib.metadata import entry_points

    from eplb_plugin.integrations.vllm.launcher import ENTRY_GROUP, ENTRY_VALUE

    if not any(ep.value == ENTRY_VALUE for ep in entry_points(group=ENTRY_GROUP)):
        pytest.fail(
            f"the {ENTRY_GROUP} entry point {ENTRY_VALUE} is not installed in this "
            "environment: pip install -e . (setup.py declares it), or run .ci/vllm.sh"
        )
    model = str(tiny_model("deepseek_v3"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    for key in ("TRITON_INTERPRET", "EPLB_VLLM_CONFIG", "EPLB_VLLM_POLICY", "VLLM_PLUGINS"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "2"
    cmd = [
        sys.executable, "-m", "eplb_plugin.cli.main", "vllm", "serve", model,
        "--host", "127.0.0.1", "--port", str(port),
        # vLLM's own EPLB flags as a vLLM user writes them (the plugin's fields in the same
        # JSON, and vLLM's dotted form)
        "--enable-eplb", "--eplb-config", '{"num_redundant_experts": 4, "window_size": 4, '
        '"step_interval": 4, "use_async": false, "plan_delay": 0, "log_balancedness": true, '
        '"log_balancedness_interval": 4}', "--eplb-config.min_gain", "0",
        # CPU_MLA: vLLM's AMX MLA backend, its choice on CPUs with AMX, refuses fp32 weights
        "--dtype", "float32", "--attention-backend", "CPU_MLA", "--enforce-eager",
        "--max-model-len", "128",
        "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(64 << 20),
    ]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"server exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}"
                )
            try:
                if get(f"{base}/health") == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server not up within {START_S:.0f} s:\n{log_path.read_text()[-6000:]}"
                )
            time.sleep(2)

        texts = []
        for i in range(REQUESTS):
            body = {"model": model, "prompt": f"t{5 + i} t6 t7 t8", "max_tokens": 8,
                    "temperature": 0.0, "ignore_eos": True}  # fmt: skip
            answer = post(f"{base}/v1/completions", body)
            assert answer["usage"]["completion_tokens"] == 8
            texts.append(answer["choices"][0]["text"])
            if "rebalance done" in log_path.read_text():
                break
        assert all(isinstance(t, str) and t.strip() for t in texts)
        # the worker's balancer series reach the API server's /metrics (the launcher runs
        # vLLM with prometheus_client's multiprocess mode)
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
            metrics = response.read().decode()
        log_text = log_path.read_text()
    finally:
        stop(proc)
    series = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith("eplb_")}  # fmt: skip
    labels = '{engine="vllm",rank="0"}'
    assert series.get(f"eplb_rebalances_total{labels}", 0) > 0, sorted(series)
    assert 0 < series[f"eplb_balancedness{labels}"] <= 1
    assert series[f"eplb_rebalance_pause_seconds_count{labels}"] > 0
    assert "vllm:" in metrics  # vLLM's own series are still there
    # the Balancer's own lines in vLLM's log: one per rebalance, and log_balancedness
    assert "EPLB rebalance done at step" in log_text and "balancedness=" in log_text
    # the balancer ran inside vLLM's worker process, not only in the launcher's
    assert "eplb-plugin: balancer attached on EP rank 0/1" in log_text
    assert "16 experts on 20 physical slots" in log_text
    assert "rebalance done" in log_text, log_text[-6000:]
    assert "Traceback" not in log_text
