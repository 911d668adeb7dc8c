"""Faults in the runtime: a slow or hung policy, a rank whose staging raises, a rank killed or
hung, a failed commit, on gloo ranks. What must hold: no step waits on the policy or on a
peer's local error, a local error costs one chunk (retried at the next interval), only a
broken group disables rebalancing, and afterwards every slot on every surviving rank holds
its expert's weights.

``_soak`` is also what ``benchmarks/bench_faults.py`` runs for the figures of the failure
model in docs/runtime.md.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
import torch
from dist_utils import run_ranks
from test_executor import make_tensors, topology_for, wrong_slots

from eplb_plugin.balancer import MAX_PLANNERS, Balancer
from eplb_plugin.config import EplbConfig
from eplb_plugin.layout import ExpertLayout
from eplb_plugin.policies import register_policy
from eplb_plugin.policies.default import default_policy

LAYERS = 3
ENV = {"EPLB_KERNELS": "torch"}


def skewed_ids(gen: torch.Generator, experts: int, tokens: int = 16, top_k: int = 2):
    probs = 1.0 / torch.arange(1, experts + 1, dtype=torch.float) ** 1.5
    ids = torch.multinomial(probs, tokens * top_k, replacement=True, generator=gen)
    return ids.view(tokens, top_k)


# ------------------------------------------------------------------ a hung policy
def _hung_policy(rank: int, world_size: int, plan_on: str, hang_calls: list[int]) -> dict:
    """Policy calls listed in ``hang_calls`` (1-based) never return; the others are fast."""
    calls = []
    never = threading.Event()  # never set: a hung call blocks until the process exits

    def sometimes_hangs(weight, topology, previous=None, **options):
        calls.append(1)
        if len(calls) in hang_calls:
            never.wait()
        return default_policy(weight, topology, previous=previous, **options)

    register_policy("test-hangs", sometimes_hangs, replace=True)
    topo = topology_for(world_size)
    experts = topo.num_replicas - 2
    layout = ExpertLayout.identity(LAYERS, experts, topo)
    tensors = make_tensors(layout.phy2log, rank, topo.slots_per_gpu)
    config = EplbConfig(
        num_redundant_experts=2, num_nodes=topo.num_nodes, window=3, interval=3, plan_delay=1,
        layers_per_step=0, min_gain=0.0, plan_on=plan_on, policy="test-hangs", timeout_s=20,
        plan_wait_s=2.0,
    )  # fmt: skip
    threads_before = threading.active_count()
    bal = Balancer(config, layout, tensors)
    gen = torch.Generator().manual_seed(7)  # the same tokens on every rank
    events, pauses, threads = [], [], []
    for _ in range(30):
        for layer in range(LAYERS):
            bal.route(skewed_ids(gen, experts), layer)
        start = time.perf_counter()
        report = bal.step()
        pauses.append(time.perf_counter() - start)
        events.append(report and (report.event, report.reason))
        threads.append(threading.active_count() - threads_before)
    start = time.perf_counter()
    bal.close()
    return {
        "events": events, "max_pause": max(pauses), "threads": max(threads),
        "close_s": time.perf_counter() - start, "stats": bal.stats,
        "disabled": bal.disabled_reason, "wrong": wrong_slots(tensors, bal.layout.phy2log, rank),
        "phy2log": bal.layout.phy2log,
    }  # fmt: skip


@pytest.mark.parametrize("plan_on", ["rank0", "all"])
def test_a_hung_policy_never_blocks_a_step_nor_leaks_threads(plan_on):
    # call 1 never returns; call 2 is fast (a rebalance); calls 3 and later never return.
    # Before: rank 0's step waited for the policy without limit, the others timed out.
    results = run_ranks(
        _hung_policy, 3, plan_on, [1] + list(range(3, 100)), timeout=180, env=ENV
    )  # fmt: skip
    first = results[0]
    for rank, r in enumerate(results):
        assert r["events"] == first["events"], f"rank {rank} diverged"
        assert torch.equal(r["phy2log"], first["phy2log"])
        assert r["disabled"] is None and r["wrong"] == []
        # the hung policy would block forever, a step waits plan_wait_s (2 s) for it; the
        # collective timeout is 20 s
        assert r["max_pause"] < 10 and r["close_s"] < 5, r
        # hung policy threads: at most MAX_PLANNERS (plus a short-lived prepare thread),
        # however many plans fall due
        assert r["threads"] <= MAX_PLANNERS + 1, r["threads"]
    events = [e for e in first["events"] if e and e[0] not in ("planned", "collected")]
    # due at 3, 6, 9, ...; collected a step later: not ready, then a rebalance with the fast
    # call, then not ready forever after (two hung threads: no third one starts)
    assert events[0] == ("skipped", "not ready")
    assert events[1] == ("done", None)
    assert set(events[2:]) == {("skipped", "not ready")} and len(events) >= 8
    stats = first["stats"]
    assert stats.rebalances == 1 and stats.failures == 0
    assert stats.skip_reasons == {"not ready": len(events) - 1}


# ------------------------------------------------------------------ the soak
_SOAK_CALLS = []


def _soak_policy(weight, topology, previous=None, seed=0, **options):
    """A fresh random permutation of the experts over the slots (E = P): every layout is
    perfectly balanced under uniform load, so every plan moves most slots."""
    _SOAK_CALLS.append(1)
    gen = torch.Generator().manual_seed(int(seed) * 1000 + len(_SOAK_CALLS))
    L, P = weight.shape[0], topology.num_replicas
    rows = torch.stack([torch.randperm(P, generator=gen) for _ in range(L)])
    return ExpertLayout.from_phy2log(rows, topology, weight.shape[1])


def _soak(
    rank: int,
    world_size: int,
    steps: int,
    seed: int,
    rate: float,
    terminal: str | None,
    timeout_s: float,
) -> dict:
    """Serve ``steps`` steps with a rebalance every 3 steps and local faults (stage, pack,
    exchange raise on a random rank) with probability ``rate`` per step; then, in the first
    chunk from step ``steps + 1`` on, the ``terminal`` fault: ``"kill"`` (rank 3 exits),
    ``"hang"`` (rank 3 sleeps 3 x ``timeout_s``) or ``"commit"`` (rank 2 raises while
    committing), and 5 more serving steps."""
    from eplb_plugin.executor import InconsistentWeightsError

    register_policy("test-soak", _soak_policy, replace=True)
    topo = topology_for(world_size)
    P = topo.num_replicas
    layout = ExpertLayout.identity(LAYERS, P, topo)
    tensors = make_tensors(layout.phy2log, rank, topo.slots_per_gpu)
    schedule_rng = random.Random(seed)  # the same schedule on every rank
    schedule: dict[int, tuple[int, str]] = {}
    for step in range(1, steps + 1):
        if schedule_rng.random() < rate:
            schedule[step] = (schedule_rng.randrange(world_size),
                              schedule_rng.choice(("stage", "pack", "exchange")))  # fmt: skip
    last = steps + 1
    final = {"kill": (3, "kill"), "hang": (3, "hang"), "commit": (2, "commit")}.get(terminal)
    injected: list[tuple[int, str]] = []
    bal: Balancer

    def fault(point: str, index: int) -> None:
        step = bal.steps
        who, what = schedule.get(step, (None, None))
        if step >= last and final is not None and not any(s >= last for s, _ in injected):
            who, what = final
        if who != rank or (step, what) in injected:
            return
        if what == point or (what in ("kill", "hang") and point == "pack"):
            injected.append((step, what))
            if what == "kill":
                os._exit(0)
            if what == "hang":
                time.sleep(3 * timeout_s)
                return
            raise RuntimeError(f"injected {what} fault at step {step}")

    config = EplbConfig(
        num_redundant_experts=0, num_nodes=topo.num_nodes, window=2, interval=3, plan_delay=0,
        layers_per_step=1, min_gain=0.0, policy="test-soak", policy_options={"seed": seed},
        timeout_s=timeout_s, staging_bytes=1 << 16,
    )  # fmt: skip
    bal = Balancer(config, layout, tensors, fault=fault)
    ids = torch.arange(P).repeat(2).view(-1, 2)  # uniform load: every expert twice per step
    pauses: list[float] = []
    events: list[tuple | None] = []
    raised = None
    for _ in range(last + 8):
        for layer in range(LAYERS):
            bal.route(ids, layer)
        start = time.perf_counter()
        try:
            report = bal.step()
        except InconsistentWeightsError as exc:
            raised = (bal.steps, str(exc))
            break
        pauses.append(time.perf_counter() - start)
        events.append(report and (report.event, tuple(report.layers)))
    bal.close()
    return {
        "events": events, "pauses": pauses, "injected": injected, "raised": raised,
        "stats": bal.stats, "disabled": bal.disabled_reason, "phy2log": bal.layout.phy2log,
        "maps_ok": bool(torch.equal(bal.maps.phy2log.cpu(), bal.layout.phy2log)),
        "wrong": wrong_slots(tensors, bal.layout.phy2log, rank), "last": last,
        "schedule": schedule,
    }  # fmt: skip


def check_soak(results: list[dict | None], terminal: str | None, timeout_s: float) -> dict:
    """The soak's invariants; returns figures: the longest step of any other rank at each
    kind of fault (seconds), and the longest step after the terminal fault."""
    alive = [r for r in results if r is not None]
    assert len(alive) == (3 if terminal == "kill" else 4)
    last = alive[0]["last"]
    term = None
    if terminal == "commit":
        term = alive[0]["raised"][0]
        for r in alive:  # every rank stops serving at the same step, none on wrong maps
            assert r["raised"] is not None and r["raised"][0] == term, r["raised"]
    else:
        for r in alive:
            assert r["raised"] is None
            assert r["wrong"] == [] and r["maps_ok"], r["wrong"][:5]
            assert torch.equal(r["phy2log"], alive[0]["phy2log"])
    if terminal in ("kill", "hang"):
        events = alive[0]["events"]
        term = next(i + 1 for i in range(last - 1, len(events)) if events[i] and
                    events[i][0] == "failed")  # fmt: skip
        for r in alive:
            assert r["events"][term - 1][0] == "failed" and r["disabled"] is not None
    # random phase: every local fault cost one chunk on every rank alike, counted as a
    # failure, and rebalancing went on; nothing disabled it
    events = [r["events"][: last - 1] for r in alive]
    assert all(e == events[0] for e in events), "ranks diverged"
    # a fault fails its chunk; one scheduled where no chunk runs (or on a rank with nothing
    # to pack) does not fire; the killed rank's own record is lost with it
    injected = sorted({f for r in alive for f in r["injected"] if f[0] < last})
    failed_steps = [i + 1 for i, e in enumerate(events[0]) if e and e[0] == "failed"]
    scheduled = alive[0]["schedule"]
    assert set(failed_steps) <= set(scheduled), (failed_steps, scheduled)
    assert {step for step, _ in injected} <= set(failed_steps), (failed_steps, injected)
    injected = [(step, scheduled[step][1]) for step in failed_steps]
    done = sum(1 for e in events[0] if e and e[0] == "done")
    assert done > 0
    if terminal is None:  # no fault after the random phase: count over the whole run
        for r in alive:
            assert r["disabled"] is None
            assert r["stats"].failures == sum(1 for e in r["events"] if e and e[0] == "failed")
            assert r["stats"].rebalances == sum(1 for e in r["events"] if e and e[0] == "done")
    # no step of the random phase waited for a collective timeout (a local fault costs a vote)
    figures: dict[str, float] = {}
    for step, what in injected:
        worst = max(r["pauses"][step - 1] for r in alive)
        figures[what] = max(figures.get(what, 0.0), worst)
    for r in alive:
        assert max(r["pauses"][: last - 1]) < timeout_s, max(r["pauses"][: last - 1])
    if terminal in ("kill", "hang"):
        # the other ranks wait about one collective timeout at most, then serve on
        peers = [r["pauses"][term - 1] for i, r in enumerate(results) if r and i != 3]
        assert max(peers) < 2 * timeout_s
        figures[terminal] = max(peers)
        figures["after"] = max(p for r in alive for p in r["pauses"][term:])
    return figures


@pytest.mark.parametrize("terminal", ["kill"])
def test_soak_short(terminal):
    # 24 steps: 8 rebalances of 3 layers, about 8 local faults, then a rank is killed
    results = run_ranks(
        _soak, 4, 24, 3, 0.3, terminal, 8.0,
        timeout=240, env=ENV, allow_missing=True,
    )  # fmt: skip
    check_soak(results, terminal, 8.0)


@pytest.mark.soak
@pytest.mark.parametrize("terminal", [None, "kill", "hang", "commit"])
@pytest.mark.parametrize("seed", [11, 12])
def test_soak_long(terminal, seed):
    results = run_ranks(
        _soak, 4, 150, seed, 0.25, terminal, 5.0,
        timeout=600, env=ENV, allow_missing=True,
    )  # fmt: skip
    check_soak(results, terminal, 5.0)
