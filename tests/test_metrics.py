"""Prometheus metrics of the balancer: the series a rebalance, a failure and a skip produce,
in-process and aggregated across processes the way vLLM's API server reads its workers
(prometheus_client's multiprocess mode), and no-ops without prometheus_client."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from eplb_plugin import metrics
from eplb_plugin.balancer import Balancer
from eplb_plugin.config import EplbConfig
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.policies import register_policy

prometheus_client = pytest.importorskip("prometheus_client")

LAYERS = 3


def run_balancer(engine: str, policy: str = "default", steps: int = 4) -> Balancer:
    """One rank, 6 experts on 9 slots, skewed load, a plan every 2 steps on its own window
    (no memory of the previous one, so that the second plan moves slots too)."""
    from test_executor import make_tensors

    topo = Topology(9, num_gpus=1)
    layout = ExpertLayout.identity(LAYERS, 6, topo)
    config = EplbConfig(
        num_redundant_experts=3, window=2, interval=2, plan_delay=0, min_gain=0.0,
        layers_per_step=0, policy=policy, log_balancedness=True, memory_windows=1,
    )  # fmt: skip
    bal = Balancer(config, layout, make_tensors(layout.phy2log, 0, 9), engine=engine)
    gen = torch.Generator().manual_seed(0)
    probs = 1.0 / torch.arange(1, 7, dtype=torch.float) ** 1.5
    for _ in range(steps):
        for layer in range(LAYERS):
            ids = torch.multinomial(probs, 32, replacement=True, generator=gen).view(16, 2)
            bal.route(ids, layer)
        bal.step()
    return bal


def sample(registry, name: str, **labels: str) -> float | None:
    value = registry.get_sample_value(name, labels)
    return value


def test_a_rebalance_and_a_failure_show_in_the_registry():
    from prometheus_client import REGISTRY

    bal = run_balancer("test-rebalance")
    labels = {"engine": "test-rebalance", "rank": "0"}
    assert bal.stats.rebalances == 2 and bal.metrics.enabled
    assert sample(REGISTRY, "eplb_rebalances_total", **labels) == 2
    assert sample(REGISTRY, "eplb_slots_moved_total", **labels) == bal.stats.slots_moved > 0
    assert sample(REGISTRY, "eplb_balancedness", **labels) == 1.0  # one GPU
    assert sample(REGISTRY, "eplb_rebalance_pause_seconds_count", **labels) >= 2
    assert sample(REGISTRY, "eplb_plan_seconds_count", **labels) == 2
    assert sample(REGISTRY, "eplb_failures_total", kind="plan", **labels) == 0

    def broken(weight, topology, previous=None, **options):
        raise RuntimeError("policy bug")

    register_policy("test-metrics-broken", broken, replace=True)
    bal = run_balancer("test-failure", policy="test-metrics-broken")
    labels = {"engine": "test-failure", "rank": "0"}
    assert bal.stats.failures == 2
    assert sample(REGISTRY, "eplb_failures_total", kind="plan", **labels) == 2
    assert sample(REGISTRY, "eplb_rebalances_total", **labels) == 0


def test_without_prometheus_client_metrics_are_no_ops(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    monkeypatch.setattr(metrics, "_COLLECTORS", None)
    assert not metrics.available()
    m = metrics.BalancerMetrics(0, "x")
    assert not m.enabled
    m.rebalanced()
    m.failure("chunk")
    m.balancedness(0.5)
    m.pause(0.1)
    bal = run_balancer("test-no-prometheus")
    assert bal.stats.rebalances == 2 and not bal.metrics.enabled


def test_series_of_another_process_reach_a_multiprocess_registry(tmp_path):
    """vLLM's layout: the balancer runs in a worker process, /metrics is served by another
    process that reads PROMETHEUS_MULTIPROC_DIR with a MultiProcessCollector."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    tests = os.path.dirname(os.path.abspath(__file__))
    worker = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {tests!r})
        from test_metrics import run_balancer
        bal = run_balancer("test-multiprocess")
        assert bal.stats.rebalances == 2, bal.stats
        """
    )
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", worker], env=env, check=True, timeout=300)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    labels = {"engine": "test-multiprocess", "rank": "0"}
    assert sample(registry, "eplb_rebalances_total", **labels) == 2
    assert sample(registry, "eplb_balancedness", **labels) == 1.0
    assert sample(registry, "eplb_slots_moved_total", **labels) > 0
    assert sample(registry, "eplb_plan_seconds_count", **labels) == 2
