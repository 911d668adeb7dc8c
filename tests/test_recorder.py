"""LoadRecorder: ring window, conversion through the layout of each step, EMA, dump/load."""

from __future__ import annotations

import pytest
import torch

from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.recorder import LoadRecorder
from eplb_plugin.traces import read_load

L, E, P = 2, 6, 8


def spread(logical: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """[L, E] int logical counts -> [L, P] int32 slot counts (split over replicas)."""
    counts = torch.zeros(L, P, dtype=torch.int32)
    for layer in range(L):
        for expert in range(E):
            slots = layout.log2phy[layer, expert, : layout.logcnt[layer, expert]].tolist()
            n = int(logical[layer, expert])
            for i, slot in enumerate(slots):
                counts[layer, slot] += n // len(slots) + (1 if i < n % len(slots) else 0)
    return counts


def layouts() -> tuple[ExpertLayout, ExpertLayout]:
    topo = Topology(P, num_gpus=2)
    a = ExpertLayout.identity(L, E, topo)
    b = ExpertLayout.from_phy2log(torch.tensor([[5, 4, 3, 2, 1, 0, 5, 5]] * L), topo, E)
    return a, b


def test_record_moves_counts_into_the_ring_and_zeroes_them():
    a, _ = layouts()
    rec = LoadRecorder(L, P, E, 3, a.phy2log)
    for step in range(5):
        rec.counts.fill_(step + 1)
        rec.record()
        assert int(rec.counts.abs().sum()) == 0
    assert rec.filled == 3 and rec.steps == 5
    window = rec.slot_window()
    assert window.shape == (3, L, P)
    assert window[:, 0, 0].tolist() == [3.0, 4.0, 5.0]  # oldest first, last 3 kept


def recorded_across_a_rebalance(seed: int) -> tuple[LoadRecorder, torch.Tensor]:
    """A window of 10 holding 6 recorded steps: 3 under layout a, then 3 under layout b.
    Returns the recorder and the true [6, L, E] logical loads."""
    a, b = layouts()
    gen = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, 50, (6, L, E), generator=gen)
    rec = LoadRecorder(L, P, E, 10, a.phy2log)
    for step in range(6):
        layout = a if step < 3 else b
        if step == 3:
            rec.set_layout(b.phy2log)
        rec.counts.copy_(spread(truth[step], layout))
        rec.record()
    return rec, truth


def test_rebalance_mid_window_converts_each_step_with_its_own_layout():
    _, b = layouts()
    rec, truth = recorded_across_a_rebalance(0)
    assert torch.equal(rec.logical_window(), truth.float())
    assert torch.equal(rec.logical_load(), truth.sum(0).double())
    per_gpu = rec.slot_window().double().sum(0).view(L, 2, P // 2).sum(-1)
    assert torch.equal(rec.gpu_loads(2), per_gpu)
    assert torch.equal(rec.gpu_loads(2).sum(-1), truth.sum((0, 2)).double())
    # the same slot counts read through one layout only would be wrong
    naive = torch.zeros(L, E, dtype=torch.float64)
    naive.scatter_add_(1, b.phy2log, rec.slot_window().double().sum(0))
    assert not torch.equal(naive, truth.sum(0).double())


def test_ema_tracks_logical_load_across_layouts():
    """The EMA predictor: bias-corrected (no pull towards zero in the first steps) and
    scaled to the window's steps, like the window predictor's sum."""
    a, b = layouts()
    gen = torch.Generator().manual_seed(1)
    rec = LoadRecorder(L, P, E, 4, a.phy2log, predictor="ema", ema_decay=0.8)
    steps = []
    for step in range(9):
        layout = a if step % 2 else b
        rec.set_layout(layout.phy2log)
        steps.append(torch.randint(0, 30, (L, E), generator=gen).double())
        rec.counts.copy_(spread(steps[-1], layout))
        rec.record()
        # oracle: the weighted mean written out, newest step weighing 1
        weights = [0.8**age for age in range(len(steps) - 1, -1, -1)]
        mean = sum(w * x for w, x in zip(weights, steps)) / sum(weights)
        assert torch.allclose(rec.logical_load(), min(4, len(steps)) * mean, rtol=1e-5)
    constant = LoadRecorder(L, P, E, 4, a.phy2log, predictor="ema", ema_decay=0.99)
    for _ in range(2):
        constant.counts.fill_(3)
        constant.record()
    want = torch.full((L,), 2 * 3.0 * P, dtype=torch.float64)  # 2 steps of 3 tokens a slot
    assert torch.allclose(constant.logical_load().sum(-1), want)


def test_recorder_and_simulator_predict_alike(tmp_path):
    """One predictor: the runtime's recorder and the replay simulator give the same load
    after the same steps, for both predictors."""
    from eplb_plugin.simulate import SimConfig, predict
    from eplb_plugin.traces import write_load

    a, _ = layouts()
    gen = torch.Generator().manual_seed(3)
    history = torch.randint(0, 50, (7, L, E), generator=gen).float()
    for predictor in ("window", "ema"):
        rec = LoadRecorder(L, P, E, 3, a.phy2log, predictor=predictor, ema_decay=0.7)
        for step in history:
            rec.counts.copy_(spread(step, a))
            rec.record()
        config = SimConfig(window=3, predictor=predictor, ema_decay=0.7)
        sim = predict(history, config)
        sim = sim.sum(0) if predictor == "window" else sim
        assert torch.allclose(rec.logical_load(), sim.double(), rtol=1e-5), predictor
        # a trace loaded into the window counts as recorded steps
        write_load(tmp_path / f"{predictor}.npz", history)
        loaded = LoadRecorder(L, P, E, 3, a.phy2log, predictor=predictor, ema_decay=0.7)
        loaded.load(tmp_path / f"{predictor}.npz")
        assert torch.allclose(loaded.logical_load(), sim.double(), rtol=1e-5), predictor


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_dump_and_load_round_trip(tmp_path, suffix):
    a, b = layouts()
    gen = torch.Generator().manual_seed(2)
    truth = torch.randint(0, 40, (4, L, E), generator=gen)
    rec = LoadRecorder(L, P, E, 8, a.phy2log)
    for step in range(4):
        rec.counts.copy_(spread(truth[step], a))
        rec.record()
    path = tmp_path / f"trace{suffix}"
    dumped = rec.dump(path)
    assert torch.equal(dumped, truth.float())
    assert torch.equal(read_load(path), truth.float())
    fresh = LoadRecorder(L, P, E, 3, b.phy2log)  # other layout, shorter window
    assert fresh.load(path) == 3
    assert torch.equal(fresh.logical_window(), truth[1:].float())
    assert torch.equal(fresh.logical_load(), truth[1:].sum(0).double())


def test_load_rejects_a_trace_of_another_model(tmp_path):
    a, _ = layouts()
    rec = LoadRecorder(L, P, E, 4, a.phy2log)
    path = tmp_path / "other.npy"
    import numpy as np

    np.save(path, np.ones((3, L, E + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="experts"):
        rec.load(path)
    with pytest.raises(ValueError, match="empty"):
        rec.dump(tmp_path / "empty.npz")


def test_counts_from_map_and_count_give_the_routed_load():
    from eplb_plugin.kernels import map_and_count

    a, b = layouts()
    rec = LoadRecorder(L, P, E, 4, b.phy2log)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, E, (L, 32, 2), generator=gen)
    for layer in range(L):
        map_and_count(
            ids[layer], b.log2phy, b.logcnt, b.replica_share, rec.counts, layer, 30
        )  # the last 2 rows are padding
    rec.record()
    want = torch.stack([torch.bincount(ids[layer, :30].flatten(), minlength=E) for layer in (0, 1)])
    assert torch.equal(rec.logical_load(), want.double())


def test_bad_arguments():
    a, _ = layouts()
    with pytest.raises(ValueError, match="window"):
        LoadRecorder(L, P, E, 0, a.phy2log)
    with pytest.raises(ValueError, match="predictor"):
        LoadRecorder(L, P, E, 2, a.phy2log, predictor="mean")
    with pytest.raises(ValueError, match="phy2log"):
        LoadRecorder(L, P, E, 2, a.phy2log[:, :4])


def test_plan_steps_are_the_window_cut_into_runs_through_each_steps_layout():
    a, _ = layouts()
    rec, truth = recorded_across_a_rebalance(5)
    runs = rec.plan_steps(4)  # 6 steps in 4 runs: 2, 2, 1, 1 steps, oldest first
    expected = torch.stack([truth[0:2].sum(0), truth[2:4].sum(0), truth[4], truth[5]])
    assert runs.dtype == torch.float64 and torch.equal(runs, expected.double())
    assert torch.equal(runs.sum(0), rec.logical_load())
    assert torch.equal(rec.plan_steps(8), truth.double())  # fewer steps than runs: one each
    with pytest.raises(ValueError, match="max_steps"):
        rec.plan_steps(0)
    ema = LoadRecorder(L, P, E, 10, a.phy2log, predictor="ema")
    assert ema.plan_steps() is None
