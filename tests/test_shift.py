"""Re-planning on a load shift: the detector's arithmetic, the recorder's newest runs, the
simulator's cadence and the Balancer's (one rank, and two gloo ranks deciding alike)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_ranks
from test_executor import make_tensors

from eplb_plugin.balancer import Balancer
from eplb_plugin.config import EplbConfig
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.policies import default_policy, register_policy
from eplb_plugin.recorder import LoadRecorder
from eplb_plugin.shift import ShiftDetector, cut_runs, run_deviation, run_steps_of
from eplb_plugin.simulate import SimConfig, replay

LAYERS, EXPERTS, SLOTS = 2, 6, 9


def test_run_deviation_by_hand() -> None:
    observed = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    # layer 0: expected (2, 2), ((1/2) + (1/2)); layer 1: expected (2, 2), 0
    assert run_deviation(observed, torch.tensor([[1.0, 1.0], [5.0, 5.0]])) == pytest.approx(0.25)
    # the forecast's scale does not matter, only its mix
    assert run_deviation(observed, torch.tensor([[7.0, 7.0], [1.0, 1.0]])) == pytest.approx(0.25)
    # small expected counts are divided by 1, not by themselves
    small = run_deviation(torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert small == pytest.approx((0.25 + 0.25) / 2)
    assert run_deviation(torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])) == 0.0


def test_detector_calibrates_on_the_runs_and_flags_a_shift() -> None:
    runs = torch.tensor([[[10.0, 10.0]], [[12.0, 8.0]], [[8.0, 12.0]]])
    det = ShiftDetector(threshold=2.0)
    assert det.enabled and not det.ready
    det.calibrate(runs, run_steps=5)
    assert det.ready and det.run_steps == 5
    assert torch.equal(det.forecast, torch.tensor([[10.0, 10.0]], dtype=torch.float64))
    # deviations 0, 0.4, 0.4: mean 0.8 / 3, times 3 / 2 for the fitted mean; a new run is
    # expected that far from the true mean, plus 1/3 of it for the forecast's own noise
    assert det.noise == pytest.approx(0.4) and det.forecast_runs == 3
    assert det.expected == pytest.approx(0.4 * 4 / 3)
    assert not det.shifted(torch.tensor([[11.0, 9.0]]))  # 0.1 <= 2 x 0.533
    assert det.shifted(torch.tensor([[14.0, 6.0]]))  # 1.6 > 1.067
    assert det.deviation_ratio(torch.tensor([[14.0, 6.0]])) == pytest.approx(3.0)
    assert not det.shifted(torch.zeros(1, 2))  # an idle run says nothing
    # one run: a new forecast, the yardstick kept; a run is expected twice as far from a
    # one-run forecast as from the true mean
    det.calibrate(torch.tensor([[[14.0, 6.0]]]), run_steps=3)
    assert det.noise == pytest.approx(0.4) and det.run_steps == 3
    assert det.expected == pytest.approx(0.8)
    assert not det.shifted(torch.tensor([[14.0, 6.0]]))
    assert not det.shifted(torch.tensor([[12.0, 8.0]]))  # 0.48 <= 1.6
    assert det.shifted(torch.tensor([[8.0, 12.0]]))  # 4.3 > 1.6
    off = ShiftDetector(threshold=0)
    off.calibrate(runs, 1)
    assert not off.enabled and not off.ready and not off.shifted(torch.tensor([[20.0, 0.0]]))
    for bad in (-1.0, True, "5", float("nan")):
        with pytest.raises(ValueError, match="shift threshold"):
            ShiftDetector(threshold=bad)


def test_runs_are_cut_as_the_recorder_cuts_them() -> None:
    steps = torch.arange(11 * 2 * 3, dtype=torch.float64).view(11, 2, 3)
    runs, run_steps = cut_runs(steps, 4)
    assert run_steps == 3 == run_steps_of(11, 4) and runs.shape == (4, 2, 3)
    assert torch.equal(runs.sum(0), steps.sum(0)) and torch.equal(runs[0], steps[:3].sum(0))
    assert cut_runs(steps[:2], 8)[1] == 1 and run_steps_of(0, 8) == 1

    layout = ExpertLayout.identity(LAYERS, EXPERTS, Topology(SLOTS, num_gpus=1))
    rec = LoadRecorder(LAYERS, SLOTS, EXPERTS, 6, layout.phy2log)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(9):  # wraps the ring of 6
        rec.counts.copy_(torch.randint(0, 5, (LAYERS, SLOTS), generator=gen, dtype=torch.int32))
        rows.append(
            torch.zeros(LAYERS, EXPERTS, dtype=torch.float64).scatter_add_(
                1, layout.phy2log, rec.counts.double()
            )
        )
        rec.record()
    newest = torch.stack(rows[-4:])
    assert torch.equal(rec.newest_load(4), newest.sum(0))
    assert torch.equal(rec.plan_steps(3, last=4), cut_runs(newest, 3)[0])
    assert torch.equal(rec.plan_steps(8, last=100), torch.stack(rows[-6:]))
    with pytest.raises(ValueError, match="last"):
        rec.plan_steps(last=0)


def _shifting_counts(steps: int, shift_at: int, ranks: int = 2) -> torch.Tensor:
    """[S, R, L, E] multinomial counts whose hot experts flip at ``shift_at``."""
    gen = torch.Generator().manual_seed(3)
    before = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 1.0])
    out = torch.zeros(steps, ranks, LAYERS, EXPERTS)
    for s in range(steps):
        probs = before if s < shift_at else before.flip(0)
        for r in range(ranks):
            for layer in range(LAYERS):
                draw = torch.multinomial(probs, 400, replacement=True, generator=gen)
                out[s, r, layer] = torch.bincount(draw, minlength=EXPERTS).float()
    return out


def test_replay_replans_after_a_shift_on_the_steps_since_it() -> None:
    seen = []

    def recording(weight, topology, previous=None, *, steps=None, **options):
        seen.append(0 if steps is None else steps.shape[0])
        return default_policy(weight, topology, previous, steps=steps, **options)

    register_policy("shift_recording", recording, options=("dispatch", "shares"))
    counts = _shifting_counts(30, shift_at=13)
    topology = Topology(8, 1, 1, 2)
    config = SimConfig(policy="shift_recording", interval=8, window=4)
    fixed = replay(counts, topology, SimConfig(interval=8, window=4, shift_threshold=0))
    result = replay(counts, topology, config)
    # regular plans at 4, 12, 20, 28; the shift shows in step 13, checked at 14: re-planned
    # there on that one step, at 16 on the 3 since the shift, then every 8 (24). With the
    # default memory of 2 windows the plan at 12 also sees the window of the plan at 4, and
    # the one at 24 the follow-up's 3 steps since the shift, never a step before it
    assert fixed.shift_plans == 0 and len(fixed.plan_ms) == 4
    assert result.shift_plans == 1 and result.summary()["shift_rebalances"] == 1
    assert seen == [4, 8, 1, 3, 7]
    seen.clear()
    replay(counts, topology, SimConfig(policy="shift_recording", interval=8, window=4,
                                       memory_windows=1))  # fmt: skip
    assert seen == [4, 4, 1, 3, 4]
    after = [i for i, s in enumerate(result.steps) if 14 <= s < 20]
    assert float(result.balancedness[after].mean()) > float(fixed.balancedness[after].mean())


def test_replay_hands_a_long_window_to_the_policy_as_the_balancers_runs() -> None:
    seen = []

    def recording(weight, topology, previous=None, *, steps=None, **options):
        seen.append((weight.clone(), steps.clone()))
        return default_policy(weight, topology, previous, steps=steps, **options)

    register_policy("runs_recording", recording, options=("dispatch", "shares"))
    counts = _shifting_counts(20, shift_at=100)
    config = SimConfig(policy="runs_recording", interval=50, window=16, shift_threshold=0)
    replay(counts, Topology(8, 1, 1, 2), config)
    weight, steps = seen[0]
    # 16 steps in 8 runs of 2, oldest first: what LoadRecorder.plan_steps all-reduces
    window = counts[:16].sum(1)
    assert steps.shape == (8, LAYERS, EXPERTS)
    torch.testing.assert_close(steps.double(), (window[0::2] + window[1::2]).double())
    torch.testing.assert_close(weight.double(), window.sum(0).double())


def single_rank(config: EplbConfig, engine: str = "unknown"):
    topo = Topology(SLOTS, num_gpus=1)
    layout = ExpertLayout.identity(LAYERS, EXPERTS, topo)
    return Balancer(config, layout, make_tensors(layout.phy2log, 0, SLOTS), engine=engine)


def _feed(bal: Balancer, counts: torch.Tensor) -> dict:
    """One step of [L, E] logical counts through the identity maps' first slots."""
    bal.counts[:, :EXPERTS] += counts.to(torch.int32)
    return bal.step()


def test_balancer_plans_at_once_on_a_shift_and_looks_only_after_it(caplog) -> None:
    seen = []

    def recording(weight, topology, previous=None, *, steps=None, **options):
        seen.append(None if steps is None else tuple(steps.shape))
        return default_policy(weight, topology, previous, steps=steps, **options)

    register_policy("shift_recording_bal", recording, options=("dispatch", "shares"))
    config = EplbConfig(
        num_redundant_experts=3, window=16, interval=1000, plan_delay=1, layers_per_step=0,
        min_gain=0.0, policy="shift_recording_bal", plan_wait_s=60.0,
    )  # fmt: skip
    counts = _shifting_counts(40, shift_at=24, ranks=1)[:, 0]
    bal = single_rank(config, engine="test-shift")
    events = {}
    with caplog.at_level("INFO", logger="eplb_plugin.runtime"):
        for step, row in enumerate(counts, start=1):
            if step == 16:
                bal.request_rebalance()  # the first plan, on the full window
            report = _feed(bal, row)
            if report is not None and report.event == "planned":
                events[report.step] = report.event
    # 16 steps in 8 runs of 2: the first plan at 16; a check every 2 steps after it, while
    # no move is in progress; the shift enters at step 25, the run of steps 25-26 shows it
    assert bal.stats.shifts == 1
    assert sorted(events) == [16, 26, 30]
    assert seen[0] == (8, LAYERS, EXPERTS)
    assert seen[1] == (2, LAYERS, EXPERTS)  # the 2 steps since the shift, in runs of 1
    assert seen[2] == (6, LAYERS, EXPERTS)  # follow-up 2 runs (4 steps) later: 6 steps
    assert any("EPLB load shift at step 26" in r.getMessage() for r in caplog.records)
    if bal.metrics.enabled:
        from prometheus_client import REGISTRY

        labels = {"engine": "test-shift", "rank": "0"}
        assert REGISTRY.get_sample_value("eplb_load_shifts_total", labels) == 1

    off = single_rank(EplbConfig(**{**config.to_dict(), "shift_threshold": 0.0}))
    for step, row in enumerate(counts, start=1):
        if step == 16:
            off.request_rebalance()
        _feed(off, row)
    assert off.stats.shifts == 0 and off.stats.rebalances == 1


def test_the_ema_predictor_never_checks() -> None:
    config = EplbConfig(
        num_redundant_experts=3, window=16, interval=1000, plan_delay=0, predictor="ema",
        min_gain=0.0,
    )  # fmt: skip
    bal = single_rank(config)
    for step, row in enumerate(_shifting_counts(40, shift_at=24, ranks=1)[:, 0], start=1):
        if step == 16:
            bal.request_rebalance()
        _feed(bal, row)
    assert not bal.shift.enabled and bal.stats.shifts == 0


def _two_ranks(rank: int, world_size: int) -> tuple[int, list[int]]:
    topo = Topology(2 * 5, num_gpus=2)
    layout = ExpertLayout.identity(LAYERS, 8, topo)
    config = EplbConfig(
        num_redundant_experts=2, window=8, interval=1000, plan_delay=1, layers_per_step=0,
        min_gain=0.0, plan_wait_s=60.0,
    )  # fmt: skip
    bal = Balancer(config, layout, make_tensors(layout.phy2log, rank, 5))
    gen = torch.Generator().manual_seed(11)
    planned = []
    hot = torch.tensor([6.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    for step in range(1, 31):
        if step == 8:
            bal.request_rebalance()
        # only rank 1's tokens shift: each rank must still decide what the other does
        probs = hot.flip(0) if rank == 1 and step > 18 else hot
        for layer in range(LAYERS):
            ids = torch.multinomial(probs, 600, replacement=True, generator=gen).view(-1, 2)
            bal.route(ids, layer)
        report = bal.step()
        if report is not None and report.event == "planned":
            planned.append(report.step)
    bal.close()
    return bal.stats.shifts, planned


def test_ranks_decide_a_shift_alike() -> None:
    results = run_ranks(_two_ranks, 2)
    assert results[0] == results[1]
    assert results[0][0] >= 1 and len(results[0][1]) >= 2
