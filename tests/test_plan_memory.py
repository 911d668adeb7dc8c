"""Plans that also see earlier plans' windows (eplb_plugin.plan_memory): the memory's
bookkeeping by hand, the detector's yardstick, and the Balancer and the replay planning on
the same runs."""

from __future__ import annotations

import pytest
import torch
from test_executor import make_tensors
from test_shift import _shifting_counts

from eplb_plugin.balancer import Balancer
from eplb_plugin.config import EplbConfig
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.plan_memory import PlanMemory, run_bounds
from eplb_plugin.policies import default_policy, register_policy
from eplb_plugin.shift import ShiftDetector, run_deviation
from eplb_plugin.simulate import SimConfig, replay

LAYERS, EXPERTS, SLOTS = 2, 6, 9


def _runs(*values: float) -> torch.Tensor:
    """[S, 1, 2] runs whose entries are (v, 2v): tell runs apart by value."""
    return torch.tensor([[[v, 2 * v]] for v in values], dtype=torch.float64)


def test_run_bounds_cut_as_tensor_split() -> None:
    assert run_bounds(10, 4, 4) == [(10, 11), (11, 12), (12, 13), (13, 14)]
    assert run_bounds(0, 10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert run_bounds(5, 3, 1) == [(5, 8)]


def test_memory_keeps_earlier_windows_without_overlap_or_pre_shift_steps() -> None:
    memory = PlanMemory(windows=3)
    assert memory.runs_before(100) == (None, [])
    memory.remember(_runs(1, 2), first_step=0, num_steps=4)  # runs [0, 2), [2, 4)
    memory.remember(_runs(3, 4), first_step=4, num_steps=4)  # runs [4, 6), [6, 8)
    runs, steps = memory.runs_before(8)
    assert torch.equal(runs, _runs(1, 2, 3, 4)) and steps == [2, 2, 2, 2]
    # a window that starts at 6 overlaps the run [6, 8): it is not counted twice
    assert torch.equal(memory.runs_before(6)[0], _runs(1, 2, 3))
    # windows - 1 = 2 earlier windows are kept: the oldest goes
    memory.remember(_runs(5), first_step=8, num_steps=2)
    assert torch.equal(memory.runs_before(10)[0], _runs(3, 4, 5))
    # a shift at step 6: nothing that starts before it is used again
    memory.forget_before(6)
    runs, steps = memory.runs_before(10)
    assert torch.equal(runs, _runs(4, 5)) and steps == [2, 2]
    memory.forget_before(2)  # the floor never moves back
    assert memory.floor == 6
    # before any shift, runs from negative steps (a window loaded before serving) count
    loaded = PlanMemory(windows=2)
    loaded.remember(_runs(1), first_step=-4, num_steps=4)
    assert torch.equal(loaded.runs_before(0)[0], _runs(1))


def test_extend_returns_the_load_and_the_runs_the_forecast_averages() -> None:
    memory = PlanMemory(windows=2)
    load, forecast = memory.extend(_runs(1, 2), first_step=0, num_steps=4)
    assert torch.equal(load, _runs(1, 2)) and torch.equal(forecast, _runs(1, 2))
    # runs of 2 steps each, as before: the forecast is the mean of all four
    load, forecast = memory.extend(_runs(3, 4), first_step=4, num_steps=4)
    assert torch.equal(load, _runs(1, 2, 3, 4)) and torch.equal(forecast, load)
    # runs of 1 step after runs of 2: the plan sees all, the yardstick only the window's
    load, forecast = memory.extend(_runs(5, 6), first_step=8, num_steps=2)
    assert torch.equal(load, _runs(3, 4, 5, 6)) and torch.equal(forecast, _runs(5, 6))
    # the window's dtype is kept
    load, _ = memory.extend(_runs(7).float(), first_step=10, num_steps=1)
    assert load.dtype == torch.float32 and load.shape[0] == 3


def test_one_window_remembers_nothing_and_bad_sizes_are_refused() -> None:
    memory = PlanMemory(windows=1)
    memory.extend(_runs(1, 2), 0, 4)
    load, _ = memory.extend(_runs(3, 4), 4, 4)
    assert torch.equal(load, _runs(3, 4))
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="memory windows"):
            PlanMemory(windows=bad)
        with pytest.raises(ValueError, match="memory"):
            SimConfig(memory_windows=bad)
    for bad in (0, 65, 1.5):
        with pytest.raises(ValueError, match="memory_windows"):
            EplbConfig(memory_windows=bad)
    with pytest.raises(ValueError, match="<= 64"):
        SimConfig(memory_windows=65)


def test_detector_yardstick_from_the_newest_window_forecast_from_all() -> None:
    window = _runs(10, 12)
    older = _runs(20, 20)
    det = ShiftDetector(threshold=2.0)
    det.calibrate(torch.cat([older, window]), run_steps=3, noise_runs=window)
    assert det.forecast_runs == 4 and det.run_steps == 3
    torch.testing.assert_close(det.forecast, torch.cat([older, window]).mean(0))
    mean = window.mean(0)
    scatter = sum(run_deviation(run, mean) for run in window) / 2
    assert det.noise == pytest.approx(scatter * 2)
    assert det.expected == pytest.approx(det.noise * (1 + 1 / 4))


def _recording(name: str, seen: list):
    def policy(weight, topology, previous=None, *, steps=None, **options):
        seen.append(steps.clone())
        return default_policy(weight, topology, previous, steps=steps, **options)

    register_policy(name, policy, options=("dispatch", "shares"))
    return name


def _balancer(config: EplbConfig) -> Balancer:
    layout = ExpertLayout.identity(LAYERS, EXPERTS, Topology(SLOTS, num_gpus=1))
    return Balancer(config, layout, make_tensors(layout.phy2log, 0, SLOTS))


@pytest.mark.parametrize("memory_windows", [1, 2, 3])
def test_balancer_and_replay_plan_on_the_same_runs(memory_windows: int) -> None:
    """Regular plans every 4 steps on a window of 4 (as the benchmarks replay): the Balancer
    (one rank) and the replay hand the policy the same runs, the earlier windows' first."""
    counts = _shifting_counts(21, shift_at=100, ranks=1)  # no shift: memory is never cut
    by_replay, by_balancer = [], []
    config = SimConfig(
        policy=_recording(f"mem_replay_{memory_windows}", by_replay), interval=4, window=4,
        memory_windows=memory_windows,
    )  # fmt: skip
    replay(counts, Topology(SLOTS, 1, 1, 1), config)
    bal = _balancer(EplbConfig(
        num_redundant_experts=3, window=4, interval=4, plan_delay=0, layers_per_step=0,
        min_gain=0.0, policy=_recording(f"mem_bal_{memory_windows}", by_balancer),
        memory_windows=memory_windows,
    ))  # fmt: skip
    for row in counts[:, 0]:
        bal.counts[:, :EXPERTS] += row.to(torch.int32)
        bal.step()
    # plans at steps 4, 8, 12, 16, 20: each sees min(k, memory_windows) windows of 4 steps
    assert [s.shape[0] for s in by_replay] == [4 * min(k, memory_windows) for k in (1, 2, 3, 4, 5)]
    assert len(by_balancer) == len(by_replay)
    for ours, theirs in zip(by_balancer, by_replay):
        torch.testing.assert_close(ours.double(), theirs.double())
    last = by_replay[-1]
    steps = counts[20 - last.shape[0] : 20, 0]
    torch.testing.assert_close(last.double(), steps.double())
