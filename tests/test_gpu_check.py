"""benchmarks/gpu_check.py, the GPU validation kit: its CPU smoke run (Triton interpreter,
tiny sizes) must pass every check, its output must keep the documented format, a worker
dying mid-section must be recorded while the run goes on, and its oracles must reject
wrong routing (so a GPU run's "passed" means something)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_worker as worker  # noqa: E402

from eplb_plugin.dispatch import DISPATCH_MODES  # noqa: E402

CHECK_KEYS = {"section", "name", "kind", "status", "seconds"}
TOP_KEYS = {
    "schema",
    "mode",
    "command",
    "started_utc",
    "finished_utc",
    "wall_s",
    "budget_s",
    "sections",
    "complete",
    "git",
    "environment",
    "counts",
    "ok",
    "exit_code",
    "fatal",
    "notes",
    "checks",
}


def run_kit(out, *args, env=None, timeout=300):
    env = {**os.environ, **(env or {})}
    env.pop("TRITON_INTERPRET", None)  # the kit sets it itself for --cpu-smoke
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(out), "--cpu-smoke", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    path = os.path.join(out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else None
    return proc, results


def test_cpu_smoke_passes_every_check_and_keeps_the_format(tmp_path):
    sections = [s for s in gpu_check.SECTIONS if s != "e2e"]  # e2e: the slow test below
    proc, res = run_kit(tmp_path, "--sections", ",".join(sections))
    assert res is not None, proc.stderr[-3000:]
    failed = [
        (c["name"], c.get("error"))
        for c in res["checks"]
        if c["status"] != "passed" and c["status"] != "measured"
    ]
    assert not failed, failed
    assert proc.returncode == 0 and res["exit_code"] == 0 and res["ok"] and res["complete"]
    assert set(res) == TOP_KEYS
    assert res["schema"] == "eplb-gpu-check/1" and res["mode"] == "cpu-smoke"
    assert res["sections"] == sections
    assert res["environment"]["backend"] == "triton"  # the interpreter, not the torch path
    for check in res["checks"]:
        assert CHECK_KEYS <= set(check), check
    names = {c["name"] for c in res["checks"]}
    for section in sections:
        assert any(c["section"] == section for c in res["checks"]), section
    for mode in DISPATCH_MODES:  # every mode the package serves is routed and graphed
        assert f"graphs/{mode}" in names
        for dtype in ("int32", "int64"):
            assert any(
                n.startswith(f"map_and_count/{mode}/") and n.endswith(dtype) for n in names
            ), (mode, dtype)
    graphs = [c for c in res["checks"] if c["section"] == "graphs"]
    assert all(c["details"]["slots_changed"] > 0 for c in graphs)
    speed = {c["name"]: c["details"] for c in res["checks"] if c["kind"] == "speed"}
    bw = speed["memory bandwidth (device-to-device copy)"]
    assert bw["bandwidth_GBps"] > 0 and bw["median_s"] > 0
    shuffles = [d for n, d in speed.items() if n.startswith("shuffle/")]
    assert len(shuffles) == 2
    for d in shuffles:
        for label in ("shuffle, staging 1 row/tensor", "pack_slots", "unpack_slots"):
            assert d[label]["ratio_to_copy"] > 0
    summary = open(os.path.join(tmp_path, "summary.md")).read()
    assert summary.startswith("# eplb-plugin GPU check: all checks passed")
    for heading in (
        "## Checks by section",
        "## map_and_count latency",
        "## Weight moves",
        "## `global` dispatch",
    ):
        assert heading in summary


@pytest.mark.slow
def test_cpu_smoke_end_to_end_demo(tmp_path):
    proc, res = run_kit(tmp_path, "--sections", "e2e")
    assert res is not None, proc.stderr[-3000:]
    e2e = [c for c in res["checks"] if c["section"] == "e2e"]
    assert e2e and all(c["status"] == "passed" for c in e2e), e2e
    assert e2e[0]["details"]["tokens_compared"] > 0


def test_a_hung_worker_is_killed_recorded_and_the_run_goes_on(tmp_path):
    proc, res = run_kit(
        tmp_path,
        "--sections",
        "env,speed_global",
        "--stall-timeout",
        "4",
        env={"GPU_CHECK_FAULTS": "env:hang"},
    )
    assert proc.returncode == 1 and res["exit_code"] == 1 and not res["ok"]
    by_name = {c["name"]: c for c in res["checks"]}
    hung = by_name["env (worker)"]
    assert hung["status"] == "failed" and "no progress for 4 s" in hung["error"]
    assert by_name["global dispatch all-reduce"]["status"] == "measured", by_name
    assert "FAILURES" in open(os.path.join(tmp_path, "summary.md")).read()


@pytest.mark.slow
def test_a_worker_dying_mid_section_is_recorded_and_the_run_goes_on(tmp_path):
    proc, res = run_kit(
        tmp_path, "--sections", "env,speed_global", env={"GPU_CHECK_FAULTS": "env:crash"}
    )
    assert proc.returncode == 1 and res["exit_code"] == 1
    by_name = {c["name"]: c for c in res["checks"]}
    assert "exited with code 9" in by_name["env (worker)"]["error"]
    assert by_name["global dispatch all-reduce"]["status"] == "measured", by_name


def test_without_a_gpu_the_kit_refuses_cleanly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(tmp_path), "--sections", "env"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "gpu_check.py: error: no CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the oracles can fail
def routed(seed=0, num_valid=50, mode="static"):
    from eplb_plugin.kernels import map_and_count

    layout = worker.random_layout(2, 12, 20, 4, seed=seed)
    ids = worker.random_ids(60, 4, 12, seed=seed)
    counts = torch.zeros(2, 20, dtype=torch.int32)
    out = map_and_count(
        ids,
        layout.log2phy,
        layout.logcnt,
        layout.replica_share,
        counts,
        1,
        num_valid,
        dispatch=mode,
        phy2log=layout.phy2log,
        slots_per_gpu=5,
        seed=seed,
    )
    return layout, ids.numpy(), out.numpy(), counts[1].long().numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contract_oracle_equals_the_torch_reference(monkeypatch, seed):
    monkeypatch.setenv("EPLB_KERNELS", "torch")
    layout, ids, out, counts = routed(seed)
    want_out, want_counts = worker.apportion(
        ids,
        layout.log2phy[1].numpy(),
        layout.logcnt[1].numpy(),
        layout.replica_share[1].numpy(),
        50,
        seed,
    )
    assert np.array_equal(out, want_out) and np.array_equal(counts, want_counts)
    for mode in ("static", "local"):
        layout, ids, out, counts = routed(seed, mode=mode)
        worker.check_routing(ids, out, counts, layout, 1, 50, mode)


def corruptions(layout, ids, out, counts):
    """(what, out, counts) each wrong in one way the oracle must see."""
    p2l = layout.phy2log[1].numpy()
    valid = np.argwhere(ids[:50] >= 0)
    t, k = valid[0]
    wrong = out.copy()
    wrong[t, k] = int(np.flatnonzero(p2l != ids[t, k])[0])
    yield "slot of another expert", wrong, counts
    more = counts.copy()
    more[0] += 1
    yield "miscount", out, more
    minus = out.copy()
    t1, k1 = np.argwhere(ids < 0)[0]
    minus[t1, k1] = 0
    yield "-1 mapped", minus, counts
    pad = out.copy()
    t2, k2 = np.argwhere(ids[50:] >= 0)[0]
    pad[50 + t2, k2] = -1
    yield "padding not on replica 0", pad, counts
    log2phy, logcnt = layout.log2phy[1].numpy(), layout.logcnt[1].numpy()
    e = int(np.flatnonzero(logcnt > 1)[0])
    where = np.argwhere(ids[:50] == e)
    if len(where) >= 2:
        swapped = out.copy()
        (a, b), (c, d) = where[0], where[-1]
        swapped[a, b], swapped[c, d] = log2phy[e, logcnt[e] - 1], log2phy[e, 0]
        if not np.array_equal(swapped, out):
            yield "replicas out of row-major order", swapped, counts


def test_routing_oracle_rejects_wrong_results(monkeypatch):
    monkeypatch.setenv("EPLB_KERNELS", "torch")
    layout, ids, out, counts = routed(3)
    seen = 0
    for _what, bad_out, bad_counts in corruptions(layout, ids, out, counts):
        with pytest.raises(worker.CheckFailed):
            worker.check_routing(ids, bad_out, bad_counts, layout, 1, 50, "static")
        seen += 1
    assert seen >= 4
