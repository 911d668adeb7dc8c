"""Prometheus metrics of the balancer (optional: without ``prometheus_client`` they are no-ops).

Series (labels ``engine`` and ``rank``; failures also ``kind``, skips ``reason``):

- ``eplb_balancedness`` (gauge): realized balancedness (mean/max per-GPU load, averaged
  over layers) over the steps since the previous measurement;
- ``eplb_rebalances_total`` (counter): rebalances completed (every chunk committed);
- ``eplb_failures_total`` (counter): failed plans (``kind="plan"``), failed preparations
  (``"prepare"``), abandoned chunks (``"chunk"``), communication failures that disabled
  rebalancing (``"comm"``), balancer bugs that disabled it (``"error"``);
- ``eplb_skipped_total`` (counter): plans not acted on, by ``reason``;
- ``eplb_slots_moved_total``, ``eplb_bytes_moved_total`` (counters): slots whose expert
  changed on this rank; bytes this rank sent plus received;
- ``eplb_rebalance_pause_seconds`` (histogram): ``Balancer.step()`` time of each step that
  planned, collected or moved;
- ``eplb_plan_seconds`` (histogram): time the placement policy took (in the background).

The collectors are created once per process, in ``prometheus_client``'s default registry, on
first use; every Balancer of the process takes its own labelled children.

Engines that serve ``/metrics`` from another process than the one the balancer runs in (vLLM:
the API server, while the model runs in engine-core / worker processes) aggregate through
prometheus_client's multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set before
``prometheus_client`` is imported, every process writes its samples to files in that folder
and the serving process reads them with a ``MultiProcessCollector``. The gauge then uses
``multiprocess_mode="mostrecent"``: one value per label set (each rank its own), the latest.
"""

from __future__ import annotations

import threading

_PAUSE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)
_PLAN_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0)

# failure kinds: the policy raised or ranks disagreed; preparing the move failed on a rank; a
# chunk was abandoned; a communication failure or timeout (rebalancing disabled); a bug
FAILURE_KINDS = ("plan", "prepare", "chunk", "comm", "error")

_LOCK = threading.Lock()
_COLLECTORS: dict[str, object] | None = None


def available() -> bool:
    """Whether ``prometheus_client`` can be imported (else every metric is a no-op)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _collectors() -> dict[str, object] | None:
    """The process's collectors, created on first call (None without prometheus_client)."""
    global _COLLECTORS
    with _LOCK:
        if _COLLECTORS is None:
            try:
                from prometheus_client import Counter, Gauge, Histogram
            except ImportError:
                return None
            labels = ["engine", "rank"]
            _COLLECTORS = {
                "balancedness": Gauge(
                    "eplb_balancedness",
                    "Realized EPLB balancedness (mean/max per-GPU load, averaged over layers) "
                    "since the previous measurement",
                    labels,
                    multiprocess_mode="mostrecent",
                ),
                "rebalances": Counter(
                    "eplb_rebalances", "EPLB rebalances completed", labels
                ),
                "failures": Counter(
                    "eplb_failures",
                    "EPLB failures: failed plans, abandoned chunks, communication failures",
                    [*labels, "kind"],
                ),
                "skipped": Counter(
                    "eplb_skipped", "EPLB plans not acted on", [*labels, "reason"]
                ),
                "shifts": Counter(
                    "eplb_load_shifts",
                    "EPLB load shifts detected (each makes a plan due at once)",
                    labels,
                ),
                "slots": Counter(
                    "eplb_slots_moved", "Slots whose expert changed on this rank", labels
                ),
                "bytes": Counter(
                    "eplb_bytes_moved", "Bytes this rank sent plus received", labels
                ),
                "pause": Histogram(
                    "eplb_rebalance_pause_seconds",
                    "Balancer.step() time of steps that planned, collected or moved weights",
                    labels,
                    buckets=_PAUSE_BUCKETS,
                ),
                "plan": Histogram(
                    "eplb_plan_seconds",
                    "Time the EPLB placement policy took (background)",
                    labels,
                    buckets=_PLAN_BUCKETS,
                ),
            }  # fmt: skip
        return _COLLECTORS


class BalancerMetrics:
    """The metric children of one balancer; every method is a no-op without prometheus.

    Args:
        rank: the balancer's EP rank (label ``rank``).
        engine: the engine it runs in (label ``engine``, e.g. ``"vllm"``).
        enabled: False makes every method a no-op.
    """

    def __init__(self, rank: int, engine: str = "unknown", enabled: bool = True) -> None:
        self.labels = {"engine": str(engine), "rank": str(rank)}
        self._c = _collectors() if enabled else None
        self.enabled = self._c is not None
        if self._c is not None:
            # every series exists (at 0) from the start, so a scrape shows the balancer is on;
            # the gauge only once something was measured
            for name in ("rebalances", "shifts", "slots", "bytes", "pause", "plan"):
                self._child(name)
            for kind in FAILURE_KINDS:
                self._child("failures", kind=kind)

    def _child(self, name: str, **extra: str):
        return self._c[name].labels(**self.labels, **extra)

    def balancedness(self, value: float) -> None:
        if self._c is not None:
            self._child("balancedness").set(float(value))

    def rebalanced(self) -> None:
        if self._c is not None:
            self._child("rebalances").inc()

    def moved(self, slots: int, nbytes: int) -> None:
        if self._c is not None:
            if slots:
                self._child("slots").inc(int(slots))
            if nbytes:
                self._child("bytes").inc(int(nbytes))

    def failure(self, kind: str) -> None:
        if self._c is not None:
            self._child("failures", kind=kind).inc()

    def shift(self) -> None:
        if self._c is not None:
            self._child("shifts").inc()

    def skipped(self, reason: str) -> None:
        if self._c is not None:
            self._child("skipped", reason=reason).inc()

    def pause(self, seconds: float) -> None:
        if self._c is not None:
            self._child("pause").observe(float(seconds))

    def plan_time(self, seconds: float) -> None:
        if self._c is not None:
            self._child("plan").observe(float(seconds))


__all__ = ["FAILURE_KINDS", "BalancerMetrics", "available"]
