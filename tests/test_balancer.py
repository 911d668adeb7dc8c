"""Balancer: the per-step timeline, in-place maps, skips and failures, and end to end on 4
gloo ranks (routing through map_and_count, planning, broadcast, chunked moves, a failed
chunk, the load trace)."""

from __future__ import annotations

import sys

import pytest
import torch
from dist_utils import run_ranks
from test_executor import FAKES, make_tensors, topology_for, wrong_slots

from eplb_plugin.balancer import Balancer
from eplb_plugin.config import EplbConfig
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.policies import register_policy

LAYERS = 3


def single_rank(config: EplbConfig, experts: int = 6, slots: int = 9):
    topo = Topology(slots, num_gpus=1)
    layout = ExpertLayout.identity(LAYERS, experts, topo)
    tensors = make_tensors(layout.phy2log, 0, slots)
    return Balancer(config, layout, tensors), tensors


def skewed_ids(gen: torch.Generator, experts: int, tokens: int = 16, top_k: int = 2):
    probs = 1.0 / torch.arange(1, experts + 1, dtype=torch.float) ** 1.5
    return torch.multinomial(probs, tokens * top_k, replacement=True, generator=gen).view(
        tokens, top_k
    )


def test_timeline_moves_one_layer_per_step_and_keeps_map_storage():
    config = EplbConfig(
        num_redundant_experts=3, window=4, interval=4, plan_delay=2, layers_per_step=1,
        min_gain=0.0, staging_bytes=1 << 16, plan_wait_s=60.0,
    )  # fmt: skip
    bal, tensors = single_rank(config)
    ptrs = [t.data_ptr() for t in bal.maps.tensors()]
    gen = torch.Generator().manual_seed(0)
    events = {}
    for _ in range(11):
        for layer in range(LAYERS):
            ids = skewed_ids(gen, 6)
            phys = bal.route(ids, layer)
            assert torch.equal(bal.maps.phy2log[layer][phys], ids)
        report = bal.step()
        if report is not None:
            events[report.step] = (report.event, report.layers)
    # due at 4, collected at 6 (the move is prepared in the background), moving from 8, one
    # layer per step
    assert events == {
        4: ("planned", []), 6: ("collected", []), 8: ("chunk", [0]), 9: ("chunk", [1]),
        10: ("done", [2]),
    }  # fmt: skip
    assert bal.stats.rebalances == 1 and bal.stats.slots_moved > 0
    assert [t.data_ptr() for t in bal.maps.tensors()] == ptrs  # CUDA-graph safe
    assert not wrong_slots(tensors, bal.layout.phy2log, 0)
    m, lay = bal.maps, bal.layout
    assert torch.equal(m.phy2log, lay.phy2log) and torch.equal(m.logcnt, lay.logcnt)
    assert torch.equal(m.log2phy[:, :, : lay.log2phy.shape[2]], lay.log2phy)
    assert bool((m.log2phy[:, :, lay.log2phy.shape[2] :] == -1).all())
    # the heaviest expert got the redundant slots
    assert int(lay.logcnt[0, 0]) > 1


@pytest.mark.parametrize("dispatch", ["static", "local", "node", "global"])
def test_route_maps_to_replicas_of_the_same_expert_and_counts(dispatch):
    config = EplbConfig(num_redundant_experts=3, dispatch=dispatch)
    topo = Topology(9, num_gpus=1)
    layout = ExpertLayout.from_phy2log(torch.tensor([[0, 0, 0, 1, 1, 2, 3, 4, 5]] * LAYERS), topo)
    bal = Balancer(config, layout, make_tensors(layout.phy2log, 0, 9))
    gen = torch.Generator().manual_seed(5)
    ids = skewed_ids(gen, 6, tokens=40)
    phys = bal.route(ids, 1, num_valid=36)
    assert torch.equal(bal.maps.phy2log[1][phys[:36]], ids[:36])
    assert int(bal.counts[1].sum()) == 36 * 2 and int(bal.counts[0].sum()) == 0
    # expert 0's tokens are spread over its three replicas
    assert int((bal.counts[1, :3] > 0).sum()) == 3


def test_all_layers_in_one_step_and_synchronous_plan():
    config = EplbConfig(
        num_redundant_experts=3, window=3, interval=3, plan_delay=0, layers_per_step=0,
        min_gain=0.0,
    )  # fmt: skip
    bal, tensors = single_rank(config)
    gen = torch.Generator().manual_seed(1)
    reports = []
    for _ in range(3):
        for layer in range(LAYERS):
            bal.route(skewed_ids(gen, 6), layer)
        reports.append(bal.step())
    assert reports[:2] == [None, None]
    assert reports[2].event == "done" and reports[2].layers == [0, 1, 2]
    assert not wrong_slots(tensors, bal.layout.phy2log, 0)


def test_gain_below_threshold_is_skipped_and_disabled_does_nothing():
    bal, tensors = single_rank(
        EplbConfig(num_redundant_experts=3, window=2, interval=2, plan_delay=0, min_gain=0.5)
    )
    gen = torch.Generator().manual_seed(2)
    before = bal.layout.phy2log.clone()
    for _ in range(4):
        for layer in range(LAYERS):
            bal.route(skewed_ids(gen, 6), layer)
        bal.step()
    assert bal.stats.skipped == 2 and bal.stats.rebalances == 0
    assert torch.equal(bal.layout.phy2log, before)
    off, _ = single_rank(EplbConfig(enable=False, num_redundant_experts=3, interval=1))
    assert all(off.step() is None for _ in range(3)) and off.recorder.steps == 0


@pytest.mark.parametrize("dispatch", ["static", "global"])
def test_the_policy_plans_for_the_configured_dispatch_mode(dispatch):
    from eplb_plugin.policies.default import default_policy

    seen = []

    def recording(weight, topology, previous=None, **options):
        seen.append(options.get("dispatch"))
        return default_policy(weight, topology, previous=previous, **options)

    def no_dispatch_option(weight, topology, previous=None):
        seen.append("called")
        return default_policy(weight, topology)

    register_policy("test-recording", recording, replace=True)
    register_policy("test-no-dispatch", no_dispatch_option, replace=True)
    for name in ("test-recording", "test-no-dispatch"):
        config = EplbConfig(
            num_redundant_experts=3, window=2, interval=2, plan_delay=0, policy=name,
            dispatch=dispatch, min_gain=0.0,
        )  # fmt: skip
        bal, _ = single_rank(config)
        gen = torch.Generator().manual_seed(4)
        for _ in range(2):
            for layer in range(LAYERS):
                bal.route(skewed_ids(gen, 6), layer)
            bal.step()
        assert bal.stats.failures == 0
    assert seen == [dispatch, "called"]


@pytest.mark.parametrize("predictor", ["window", "ema"])
def test_the_policy_sees_the_windows_steps_with_the_window_predictor(predictor):
    """recency / spread of the default policy act in serving, not only in the simulator:
    the window predictor hands the policy the window's per-step runs (their sum is the
    load), the EMA predictor only its [L, E] load."""
    from eplb_plugin.policies.default import default_policy

    seen = []

    def recording(weight, topology, previous=None, *, steps=None, **options):
        seen.append((weight.clone(), None if steps is None else steps.clone()))
        return default_policy(weight, topology, previous=previous, steps=steps, **options)

    register_policy("test-steps", recording, replace=True)
    config = EplbConfig(
        num_redundant_experts=3, window=3, interval=3, plan_delay=0, policy="test-steps",
        predictor=predictor, min_gain=0.0,
    )  # fmt: skip
    bal, _ = single_rank(config)
    gen = torch.Generator().manual_seed(6)
    routed = torch.zeros(3, LAYERS, 6)
    for step in range(3):
        for layer in range(LAYERS):
            ids = skewed_ids(gen, 6)
            routed[step, layer] += torch.bincount(ids.flatten(), minlength=6).float()
            bal.route(ids, layer)
        bal.step()
    assert bal.stats.failures == 0 and len(seen) == 1
    weight, steps = seen[0]
    if predictor == "window":
        assert torch.equal(steps, routed) and torch.equal(weight, routed.sum(0))
    else:
        assert steps is None and weight.shape == (LAYERS, 6)


def test_a_failing_policy_is_reported_and_serving_continues():
    def broken(weight, topology, previous=None, **options):
        raise RuntimeError("policy bug")

    register_policy("test-broken", broken, replace=True)
    config = EplbConfig(
        num_redundant_experts=3, window=2, interval=2, plan_delay=1, policy="test-broken",
        plan_wait_s=60.0,
    )  # fmt: skip
    bal, _ = single_rank(config)
    gen = torch.Generator().manual_seed(3)
    events = []
    for _ in range(6):
        for layer in range(LAYERS):
            bal.route(skewed_ids(gen, 6), layer)
        report = bal.step()
        events.append(report and report.event)
    assert events == [None, "planned", "failed", "planned", "failed", "planned"]
    assert bal.disabled_reason is None and bal.stats.failures == 2


def test_a_failing_synchronous_plan_is_counted_and_logged_not_disabling(caplog):
    # before: with plan_delay=0 the policy's error escaped step(), disabled rebalancing for
    # good and left stats.failures at 0
    def broken(weight, topology, previous=None, **options):
        raise TypeError("unexpected keyword argument")

    register_policy("test-broken-sync", broken, replace=True)
    config = EplbConfig(
        num_redundant_experts=3, window=2, interval=2, plan_delay=0, policy="test-broken-sync"
    )
    bal, _ = single_rank(config)
    gen = torch.Generator().manual_seed(3)
    events = []
    with caplog.at_level("WARNING", logger="eplb_plugin.runtime"):
        for _ in range(4):
            for layer in range(LAYERS):
                bal.route(skewed_ids(gen, 6), layer)
            report = bal.step()
            events.append(report and report.event)
    assert events == [None, "failed", None, "failed"]
    assert bal.disabled_reason is None and bal.stats.failures == 2
    assert "planning failed: TypeError: unexpected keyword argument" in caplog.text


def test_log_lines_rebalance_skips_and_balancedness(caplog):
    config = EplbConfig(
        num_redundant_experts=3, window=3, interval=3, plan_delay=0, layers_per_step=2,
        min_gain=0.0, log_balancedness=True, log_balancedness_interval=2,
    )  # fmt: skip
    bal, _ = single_rank(config)
    gen = torch.Generator().manual_seed(0)
    with caplog.at_level("INFO", logger="eplb_plugin.runtime"):
        for _ in range(8):
            for layer in range(LAYERS):
                bal.route(skewed_ids(gen, 6), layer)
            bal.step()
    lines = [r.getMessage() for r in caplog.records]
    done = [line for line in lines if line.startswith("EPLB rebalance done")]
    # due at 3 (3 layers: chunks at steps 3, 4) and 6 (2 layers: one chunk): one line each
    assert [line.split(":")[0] for line in done] == [
        "EPLB rebalance done at step 4", "EPLB rebalance done at step 6"
    ]  # fmt: skip
    keys = (" layers, ", " slots moved, ", " MiB between ranks, longest pause ",
            "window balancedness 1.0000 -> 1.0000 planned, realized 1.0000 since")  # fmt: skip
    for key in keys:
        assert key in done[0], key
    periodic = [line for line in lines if line.startswith("EPLB step ")]
    assert [line.split(":")[0] for line in periodic] == [
        "EPLB step 2", "EPLB step 4", "EPLB step 6", "EPLB step 8"
    ]  # fmt: skip
    assert all("balancedness=1.0000" in line for line in periodic)  # one GPU
    assert bal.stats.realized_balancedness == 1.0
    # one GPU: nothing to gain; a plan below min_gain says so
    caplog.clear()
    bal, _ = single_rank(EplbConfig(num_redundant_experts=3, window=2, interval=2,
                                    plan_delay=0, min_gain=0.5))  # fmt: skip
    with caplog.at_level("INFO", logger="eplb_plugin.runtime"):
        for _ in range(2):
            bal.route(skewed_ids(gen, 6), 0)
            bal.step()
    assert bal.stats.skip_reasons == {"no gain": 1}
    assert (
        "EPLB plan skipped (no gain): predicted balancedness 1.0000 -> 1.0000, gain below "
        "min_gain 0.5; next plan at step 4"
    ) in caplog.text


def test_a_plan_due_during_a_move_is_skipped_with_a_reason(caplog):
    config = EplbConfig(
        num_redundant_experts=3, window=2, interval=2, plan_delay=0, layers_per_step=1,
        min_gain=0.0,
    )  # fmt: skip
    bal, _ = single_rank(config)
    gen = torch.Generator().manual_seed(0)
    with caplog.at_level("INFO", logger="eplb_plugin.runtime"):
        for _ in range(4):
            for layer in range(LAYERS):
                bal.route(skewed_ids(gen, 6), layer)
            bal.step()
    # due at 2 (moving layers 0, 1, 2 at steps 2-4); due at 4 falls during the move
    assert bal.stats.skip_reasons.get("busy") == 1
    assert "EPLB plan skipped (busy): due at step 4 while the previous rebalance" in caplog.text


def test_a_failed_commit_stops_serving_instead_of_serving_wrong_weights():
    from eplb_plugin.executor import InconsistentWeightsError

    def fault(point: str, index: int) -> None:
        if point == "commit" and index == 1:
            raise RuntimeError("injected commit failure")

    config = EplbConfig(
        num_redundant_experts=3, window=2, interval=2, plan_delay=0, layers_per_step=0,
        min_gain=0.0,
    )  # fmt: skip
    topo = Topology(9, num_gpus=1)
    layout = ExpertLayout.identity(LAYERS, 6, topo)
    bal = Balancer(config, layout, make_tensors(layout.phy2log, 0, 9), fault=fault)
    gen = torch.Generator().manual_seed(6)
    for layer in range(LAYERS):  # every layer loaded, so that every layer moves
        bal.route(skewed_ids(gen, 6), layer)
    assert bal.step() is None
    for layer in range(LAYERS):
        bal.route(skewed_ids(gen, 6), layer)
    with pytest.raises(InconsistentWeightsError, match="committing layer 1"):
        bal.step()
    assert bal.disabled_reason is not None and bal.step() is None


def test_an_unexpected_error_disables_rebalancing_but_not_serving():
    config = EplbConfig(num_redundant_experts=3, window=2, interval=2, plan_delay=0, min_gain=0)
    bal, tensors = single_rank(config)

    def bug(*args, **kwargs):
        raise RuntimeError("executor bug")

    bal.executor.run_chunk = bug
    gen = torch.Generator().manual_seed(4)
    reports = []
    for _ in range(5):
        for layer in range(LAYERS):
            bal.route(skewed_ids(gen, 6), layer)
        reports.append(bal.step())
    assert reports[1].event == "failed" and "executor bug" in reports[1].error
    assert "executor bug" in bal.disabled_reason
    assert reports[2:] == [None, None, None] and bal.recorder.steps == 5
    assert not wrong_slots(tensors, bal.layout.phy2log, 0)


def test_bad_construction():
    topo = Topology(9, num_gpus=1)
    layout = ExpertLayout.identity(LAYERS, 6, topo)
    tensors = make_tensors(layout.phy2log, 0, 9)
    with pytest.raises(ValueError, match="num_redundant_experts"):
        Balancer(EplbConfig(num_redundant_experts=2), layout, tensors)
    with pytest.raises(ValueError, match="staging_bytes"):
        Balancer(EplbConfig(num_redundant_experts=3, staging_bytes=64), layout, tensors)
    with pytest.raises(ValueError, match="expert_tensors"):
        Balancer(EplbConfig(num_redundant_experts=3), layout, tensors[:2])
    with pytest.raises(ValueError, match="world_size"):
        Balancer(EplbConfig(num_redundant_experts=3), layout, tensors, world_size=2)
    other = ExpertLayout.identity(LAYERS, 6, Topology(9, num_nodes=1, num_gpus=3))
    with pytest.raises(ValueError, match="num_gpus"):
        Balancer(EplbConfig(num_redundant_experts=3), other, make_tensors(other.phy2log, 0, 3))


# ------------------------------------------------------------------ 4 ranks, end to end
def _serve(rank: int, world_size: int, plan_on: str, dispatch: str, communicator: str, trace):
    comm = None
    if communicator == "deepep":
        sys.path.insert(0, FAKES)
        from eplb_plugin.comm.deepep import DeepEPCommunicator

        comm = DeepEPCommunicator(timeout_s=60, row_bytes=64)
    topo = topology_for(world_size)
    experts = topo.num_replicas - 2
    layout = ExpertLayout.identity(LAYERS, experts, topo)
    tensors = make_tensors(layout.phy2log, rank, topo.slots_per_gpu)
    config = EplbConfig(
        num_redundant_experts=2, num_nodes=topo.num_nodes, window=6, interval=6,
        plan_delay=1, layers_per_step=1, min_gain=0.01, plan_on=plan_on, dispatch=dispatch,
        staging_bytes=1 << 16, timeout_s=60, plan_wait_s=60.0,
    )  # fmt: skip
    failed_once = []

    def fault(point: str, index: int) -> None:
        if rank == 1 and point == "pack" and not failed_once:
            failed_once.append(index)
            raise RuntimeError("injected")

    bal = Balancer(config, layout, tensors, communicator=comm, fault=fault)
    gen = torch.Generator().manual_seed(100 + rank)
    events = []
    maps_ok = True
    for step in range(1, 19):
        for layer in range(LAYERS):
            ids = skewed_ids(gen, experts)
            phys = bal.route(ids, layer, seed=step)
            maps_ok &= bool(torch.equal(bal.maps.phy2log[layer][phys], ids))
        if step == 18 and trace:
            dumped = bal.dump_load(trace)
        report = bal.step()
        events.append((report.event, report.layers) if report else None)
    bal.close()
    return {
        "events": events,
        "phy2log": bal.layout.phy2log,
        "wrong": wrong_slots(tensors, bal.layout.phy2log, rank),
        "maps_ok": maps_ok,
        "balancedness": bal.stats.balancedness,
        "dumped": dumped if trace else None,
        "disabled": bal.disabled_reason,
    }


@pytest.mark.parametrize(
    "plan_on,dispatch,communicator",
    [("rank0", "static", "torch"), ("all", "global", "deepep"), ("all", "node", "torch")],
)
def test_four_ranks_end_to_end(tmp_path, plan_on, dispatch, communicator):
    trace = str(tmp_path / "load.npz") if plan_on == "rank0" else None
    results = run_ranks(
        _serve, 4, plan_on, dispatch, communicator, trace,
        timeout=180, env={"EPLB_KERNELS": "torch"},
    )  # fmt: skip
    first = results[0]
    for rank, r in enumerate(results):
        assert r["disabled"] is None
        assert r["events"] == first["events"], f"rank {rank} diverged"
        assert torch.equal(r["phy2log"], first["phy2log"])
        assert r["wrong"] == [] and r["maps_ok"]
    events = {i + 1: e for i, e in enumerate(first["events"]) if e}
    # plan due at 6, collected at 7. rank0: every rank prepares the move in the background and
    # moves from 8; all: the move was prepared with the plan, moving starts at 7. The first
    # chunk fails on rank 1 (injected): every rank keeps its layout. Due again at 12.
    start = 8 if plan_on == "rank0" else 7
    assert events[6] == ("planned", []) and events[start] == ("failed", [])
    assert events[12] == ("planned", [])
    start += 6
    moves = [events[s] for s in (start, start + 1, start + 2)]
    assert moves == [("chunk", [0]), ("chunk", [1]), ("done", [2])]
    if plan_on == "rank0":
        assert events[7] == events[13] == ("collected", [])
    for _, before, after in first["balancedness"]:
        assert after >= before + 0.01
    identity = ExpertLayout.identity(LAYERS, 10, Topology(12, num_nodes=2, num_gpus=4))
    assert not torch.equal(first["phy2log"], identity.phy2log)
    if trace:
        from eplb_plugin.traces import read_load

        written = read_load(trace)
        assert written.shape == (6, LAYERS, 10) and torch.equal(written, first["dumped"])
        # dumped before step 18 is recorded: the window holds steps 12-17 of all 4 ranks,
        # each routing 16 tokens x top-2 per layer
        assert float(written.sum()) == 4 * 6 * LAYERS * 16 * 2


def _rank_dependent_plans(rank: int, world_size: int) -> dict:
    from eplb_plugin.policies.default import default_policy

    def by_rank(weight, topology, previous=None, *, steps=None, **options):
        # rank 1 plans for another load: what a policy that is not deterministic does
        if rank == 1:
            weight, steps = weight.flip(-1), steps.flip(-1)
        return default_policy(weight, topology, steps=steps, **options)

    register_policy("test-by-rank", by_rank, replace=True)
    topo = topology_for(world_size)
    layout = ExpertLayout.identity(LAYERS, topo.num_replicas - 2, topo)
    tensors = make_tensors(layout.phy2log, rank, topo.slots_per_gpu)
    config = EplbConfig(
        num_redundant_experts=2, num_nodes=topo.num_nodes, window=4, interval=4, plan_delay=0,
        min_gain=0.0, plan_on="all", policy="test-by-rank", timeout_s=60,
    )  # fmt: skip
    bal = Balancer(config, layout, tensors)
    gen = torch.Generator().manual_seed(7)  # the same ids on both ranks
    events = []
    for _ in range(4):
        for layer in range(LAYERS):
            bal.route(skewed_ids(gen, topo.num_replicas - 2), layer)
        report = bal.step()
        events.append(report and report.event)
    bal.close()
    return {"events": events, "failures": bal.stats.failures, "moved": bal.stats.rebalances,
            "same": torch.equal(bal.layout.phy2log, layout.phy2log),
            "wrong": wrong_slots(tensors, bal.layout.phy2log, rank)}  # fmt: skip


def test_plan_on_all_refuses_layouts_the_ranks_disagree_on():
    results = run_ranks(_rank_dependent_plans, 2, timeout=120, env={"EPLB_KERNELS": "torch"})
    for r in results:
        assert r["events"] == [None, None, None, "failed"]
        assert r["failures"] == 1 and r["moved"] == 0 and r["same"] and r["wrong"] == []


def test_dist_utils_reports_rank_exceptions():
    from dist_utils import RankError

    with pytest.raises(RankError, match="boom"):
        run_ranks(_raise_on_rank_one, 2, timeout=60)


def _raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom")
    return rank
