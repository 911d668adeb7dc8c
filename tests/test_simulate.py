"""Routing traces, the replay simulator and ``eplb simulate``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from eplb_plugin import Topology, plan
from eplb_plugin.cli.main import main
from eplb_plugin.costmodel import get_hardware, get_model, layer_us
from eplb_plugin.dispatch import gpu_loads_of, slot_loads, token_loads
from eplb_plugin.simulate import (
    CostSpec,
    SimConfig,
    baseline_config,
    compare,
    crossovers,
    gap_closed,
    oracle,
    predict,
    recommend,
    replay,
    step_balancedness,
    synthetic_rank_counts,
)
from eplb_plugin.traces import (
    is_routing_trace,
    read_routing_trace,
    steps_from_routing_trace,
    synthetic_routing_trace,
)


@pytest.fixture(scope="module")
def trace():
    return synthetic_routing_trace(2048, 4, 32, 4, seq_tokens=256, seed=11)


# ---------------------------------------------------------------------- traces
def test_steps_deal_tokens_round_robin() -> None:
    ids = torch.tensor([[[0, 1]], [[1, 2]], [[2, 2]], [[0, -1]], [[3, 3]]])  # [5, 1, 2]
    steps = steps_from_routing_trace(ids, batch_tokens=2, num_ranks=2, num_experts=4)
    assert steps.shape == (2, 2, 1, 4)  # the fifth token is a partial step: dropped
    assert steps[0, 0, 0].tolist() == [1, 1, 0, 0]  # token 0 -> rank 0
    assert steps[0, 1, 0].tolist() == [0, 1, 1, 0]  # token 1 -> rank 1
    assert steps[1, 0, 0].tolist() == [0, 0, 2, 0]
    assert steps[1, 1, 0].tolist() == [1, 0, 0, 0]  # -1 is not counted


def test_steps_count_every_choice(trace) -> None:
    steps = steps_from_routing_trace(trace.topk_ids, 256, 8, 32)
    assert steps.shape == (8, 8, 4, 32)
    assert torch.all(steps.sum((1, 3)) == 256 * 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_tokens": 0}, "batch_tokens"),
        ({"num_ranks": 1.5}, "num_ranks"),
        ({"batch_tokens": 10**6}, "no step"),
        ({"num_experts": 4}, "num_experts"),
    ],
)
def test_steps_bad_input(trace, kwargs: dict, match: str) -> None:
    args = {"batch_tokens": 256, "num_ranks": 4, "num_experts": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        steps_from_routing_trace(trace.topk_ids, **args)


def test_read_routing_trace(traces_dir, tmp_path) -> None:
    path = traces_dir / "esft_intent.npz"
    trace = read_routing_trace(path)
    assert trace.topk_ids.shape == (8222, 26, 6) and trace.topk_ids.dtype == torch.int64
    assert int(trace.seq_offsets[-1]) == 8222 and trace.num_experts() == 64
    assert is_routing_trace(path) and not is_routing_trace(tmp_path / "none.npz")
    np.savez(tmp_path / "load.npz", load=np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="topk_ids"):
        read_routing_trace(tmp_path / "load.npz")
    np.savez(tmp_path / "bad.npz", topk_ids=np.zeros((4, 2, 1), np.int8), seq_offsets=[0, 3])
    with pytest.raises(ValueError, match="seq_offsets"):
        read_routing_trace(tmp_path / "bad.npz")
    np.savez(tmp_path / "flat.npz", topk_ids=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="tokens, layers, k"):
        read_routing_trace(tmp_path / "flat.npz")
    (tmp_path / "noise.npz").write_bytes(bytes(range(100)))  # not numpy's pickle hint
    with pytest.raises(ValueError, match=r"noise.npz.*not an \.npz file"):
        read_routing_trace(tmp_path / "noise.npz")


def test_synthetic_trace_is_a_valid_routing(trace) -> None:
    ids = trace.topk_ids
    assert ids.shape == (2048, 4, 4) and int(ids.min()) >= 0 and int(ids.max()) < 32
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token
    again = synthetic_routing_trace(2048, 4, 32, 4, seq_tokens=256, seed=11)
    assert torch.equal(ids, again.topk_ids)
    assert int(trace.seq_offsets[-1]) == 2048


# ---------------------------------------------------------------------- simulator
def test_predict() -> None:
    history = torch.arange(5.0).view(5, 1, 1).expand(5, 2, 3)
    window = predict(history, SimConfig(window=2))
    assert torch.equal(window, history[-2:])
    ema = predict(history, SimConfig(window=2, predictor="ema", ema_decay=0.5))
    assert ema.shape == (2, 3)
    weights = 0.5 ** torch.arange(4, -1, -1.0)
    expected = 2 * (weights * torch.arange(5.0)).sum() / weights.sum()
    assert float(ema[0, 0]) == pytest.approx(float(expected))


def test_replay_on_a_constant_load_matches_the_layout() -> None:
    load = torch.rand(3, 16) * 100
    counts = (load / 2).unsqueeze(0).unsqueeze(0).expand(6, 2, 3, 16)  # 6 steps, 2 ranks
    topology = Topology(20, 1, 1, 4)
    config = SimConfig(policy="deepseek", dispatch="static", window=2, interval=2)
    result = replay(counts, topology, config)
    layout = plan(load, topology, "deepseek")
    assert result.steps == [2, 3, 4, 5]
    expected = torch.full((4,), layout.balancedness(load), dtype=torch.float64)
    assert torch.allclose(result.balancedness, expected)
    assert result.slots_moved == [0] and len(result.plan_ms) == 2


def test_compare_frames_results(trace) -> None:
    counts = steps_from_routing_trace(trace.topk_ids, 128, 4, 32)
    topology = Topology(40, 1, 1, 8)
    configs = [SimConfig(policy="default", dispatch=d) for d in ("static", "global")]
    out = compare(counts, topology, configs)
    base, best = out["baseline"], out["oracle"]
    again = replay(counts, topology, baseline_config(configs[0]))
    assert torch.equal(base.balancedness, again.balancedness)
    assert best.mean > base.mean
    for result, gap in zip(out["results"], out["gap_closed"]):
        assert gap == pytest.approx(gap_closed(result.mean, base.mean, best.mean))
    static, water = out["results"]
    assert water.mean > static.mean  # water-filling evens the steps' fluctuations
    assert out["gap_closed"][1] > 0.3
    assert math_isnan(gap_closed(0.5, 0.7, 0.7))


def test_replay_counts_whole_tokens_with_the_engines_seeds(trace) -> None:
    from eplb_plugin.routing import dither_seed

    counts = steps_from_routing_trace(trace.topk_ids, 128, 4, 32)
    topology = Topology(40, 1, 1, 8)
    # the fixed cadence (no re-plan on a shift) on the window alone, to replay the plans by hand
    configs = [
        SimConfig(dispatch=d, rounding="tokens", shift_threshold=0, memory_windows=1)
        for d in ("static", "local", "global")
    ]
    out = compare(counts, topology, configs)
    assert out["baseline"].mean != compare(counts, topology, [SimConfig()])["baseline"].mean
    config = configs[2]
    result = out["results"][2]
    # replayed by hand: the same plans, each step's loads the op's whole-token counts
    layout, expected = None, []
    for i, step in enumerate(result.steps):
        if i % config.interval == 0:
            load = predict(counts.sum(1)[:step], config)
            layout = plan(load, topology, "default", dispatch="global")
        seeds = [dither_seed(0, step, r, 4) for r in range(4)]
        loads = token_loads(layout, counts[step], "global", seeds)
        assert torch.equal(loads, loads.round())
        expected.append(float(step_balancedness(gpu_loads_of(layout, loads))))
    assert torch.equal(result.balancedness, torch.tensor(expected, dtype=torch.float64))
    assert out["oracle"].mean > out["baseline"].mean


def test_replay_times_each_step_with_the_cost_model(trace) -> None:
    counts = steps_from_routing_trace(trace.topk_ids, 128, 4, 32)
    topology = Topology(40, 1, 1, 8)
    model = dataclasses.replace(get_model("deepseek-v2-lite"), num_experts=32, top_k=4)
    cost = CostSpec(get_hardware("h800-ib400-multinode"), model, nodes=1)
    config = SimConfig(dispatch="global", window=2, interval=2)
    result = replay(counts, topology, config, cost=cost)
    assert result.layer_us is not None and result.layer_us.shape == result.balancedness.shape
    assert replay(counts, topology, config).layer_us is None
    # step 2 is served by the plan made from steps 0-1: recompute its time by hand
    layout = plan(counts[:2].sum(1), topology, "default", dispatch="global")
    loads = slot_loads(layout, counts[2], "global")
    tokens_per_gpu = 128 / 8  # 128 tokens per step over 8 ranks
    expected = layer_us(cost.hardware, model, loads, 5, "global", 1, tokens_per_gpu).mean()
    assert float(result.layer_us[0]) == pytest.approx(float(expected))
    out = compare(counts, topology, [config], cost=cost)
    assert out["speedup"] == [pytest.approx(out["baseline"].mean_layer_us / result.mean_layer_us)]
    assert result.summary()["layer_us"] == pytest.approx(result.mean_layer_us)


def test_synthetic_rank_counts_and_recommend() -> None:
    model = dataclasses.replace(get_model("deepseek-v3"), num_experts=32)
    counts = synthetic_rank_counts(3, 4, 2, model, 64, seed=1)
    assert counts.shape == (3, 4, 2, 32) and (counts >= 0).all()
    # each rank routes about tokens * top_k pairs (Poisson around it)
    assert counts.sum(-1).mean() == pytest.approx(64 * 8, rel=0.1)
    assert torch.equal(counts, synthetic_rank_counts(3, 4, 2, model, 64, seed=1))
    cost = CostSpec(get_hardware("h800-ib400-multinode"), model, nodes=1)
    rows = recommend(cost, Topology(40, 1, 1, 8), [4, 4096], num_layers=2, steps=6,
                     config=SimConfig(window=2, interval=2))  # fmt: skip
    assert [r["tokens_per_gpu"] for r in rows] == [4, 4096]
    for r in rows:
        assert r["best"] in ("static", "local", "node", "global")
        modes = ("static", "local", "node", "global")
        assert r[f"{r['best']}_us"] == min(r[f"{m}_us"] for m in modes)
        assert r["speedup"] == pytest.approx(r["baseline_us"] / r[f"{r['best']}_us"])
    # at 4 tokens per GPU expert reads are memory-bound: balance saves nothing, so the
    # water-fill and the all-reduce are pure cost and static wins
    assert rows[0]["best"] == "static"
    fake = [
        {"tokens_per_gpu": t, "best": b} for t, b in ((1, "static"), (2, "static"), (4, "global"))
    ]
    assert crossovers(fake) == [(2, 4, "static", "global")]


def math_isnan(x: float) -> bool:
    return x != x


def test_default_global_beats_deepseek_global_on_shifting_load(trace) -> None:
    counts = steps_from_routing_trace(trace.topk_ids, 128, 8, 32)
    topology = Topology(40, 1, 1, 8)
    ours = replay(counts, topology, SimConfig(policy="default", dispatch="global"))
    theirs = replay(counts, topology, SimConfig(policy="deepseek", dispatch="global"))
    assert ours.mean > theirs.mean


def test_oracle_and_step_balancedness() -> None:
    loads = torch.tensor([[[1.0, 1.0], [1.0, 3.0]]])  # [1 step, 2 layers, 2 GPUs]
    assert step_balancedness(loads).tolist() == [pytest.approx((1.0 + 2 / 3) / 2)]
    counts = torch.rand(5, 2, 2, 8)
    result = oracle(counts, Topology(10, 1, 1, 2), SimConfig(window=1))
    assert result.steps == [1, 2, 3, 4] and (result.balancedness <= 1).all()


def test_migration_aware_replay_moves_less(trace) -> None:
    counts = steps_from_routing_trace(trace.topk_ids, 128, 8, 32)
    topology = Topology(40, 1, 1, 8)
    free = replay(counts, topology, SimConfig(dispatch="global", interval=2))
    capped = replay(
        counts, topology,
        SimConfig(dispatch="global", interval=2, migrate=True, policy_options={"max_moved": 0.2}),
    )  # fmt: skip
    assert max(capped.slots_moved) <= 0.2 * 4 * 40
    assert sum(capped.slots_moved) < sum(free.slots_moved)
    summary = capped.summary()
    assert summary["bytes_moved_per_rebalance"] == pytest.approx(
        summary["slots_moved_per_rebalance"] * capped.bytes_per_slot
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dispatch": "x"}, "dispatch"),
        ({"policy": "nope"}, "policy"),
        ({"interval": 0}, "interval"),
        ({"predictor": "oracle"}, "predictor"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"bytes_per_slot": -1}, "bytes_per_slot"),
        ({"rounding": "floor"}, "rounding"),
        ({"waterfill_iters": 129}, "waterfill_iters must be <= 128"),
    ],
)
def test_config_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimConfig(**kwargs)


# ---------------------------------------------------------------------- CLI
def _cli(trace_path, *extra: str) -> list[str]:
    return [
        "simulate", "--trace", str(trace_path), "--replicas", "80", "--gpus", "16",
        "--batch-tokens", "1024", "--no-progress", *extra,
    ]  # fmt: skip


def test_cli_compare_json_and_plot(traces_dir, tmp_path, capsys) -> None:
    png = tmp_path / "out.png"
    args = _cli(traces_dir / "esft_summary.npz", "--compare", "--json", "--plot", str(png),
                "--dispatch", "static,global", "--window", "2", "--interval", "2")  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    labels = [r["label"] for r in out["results"]]
    assert labels[0].startswith("baseline") and labels[1].startswith("oracle")
    assert labels[2:] == ["default/static", "default/global"]
    assert out["results"][1]["gap_closed"] == 1.0
    assert len(out["per_step"][labels[3]]) == out["scored_steps"] == out["steps"] - 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table(traces_dir, capsys) -> None:
    assert main(_cli(traces_dir / "esft_intent.npz", "--policy", "deepseek,default")) == 0
    out = capsys.readouterr().out
    assert "deepseek/global" in out and "default/global" in out and "GB moved" in out


def test_cli_node_dispatch_says_its_nodes(traces_dir, capsys) -> None:
    args = _cli(traces_dir / "esft_intent.npz", "--dispatch", "local,node,global", "--nodes", "2")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "default/node" in out and "within each of --nodes 2 node(s) of 8 GPUs" in out
    assert main(_cli(traces_dir / "esft_intent.npz", "--dispatch", "global")) == 0
    assert "node(s)" not in capsys.readouterr().out


def test_cli_reports_modelled_time(traces_dir, capsys) -> None:
    args = _cli(traces_dir / "esft_intent.npz", "--compare", "--json", "--dispatch", "static",
                "--hardware", "h200-nvlink-node", "--hw-param", "waterfill_us=5")  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cost_model"]["hardware"]["waterfill_us"] == 5.0
    assert out["cost_model"]["model"]["name"] == "deepseek-v2-lite"
    base, _, static = out["results"]
    assert base["throughput_vs_baseline"] == 1.0
    assert static["throughput_vs_baseline"] == pytest.approx(base["layer_us"] / static["layer_us"])


def test_cli_recommend(capsys) -> None:
    args = ["simulate", "--recommend", "--replicas", "288", "--gpus", "32", "--nodes", "4",
            "--tokens-per-gpu", "2,4096", "--layers", "1", "--window", "2", "--interval", "1",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "deepseek-v3 (hidden 7168, 256 experts, top-8) on 32 GPUs / 4 nodes" in out
    assert "tokens/GPU" in out and ("recommended dispatch" in out or "answer changes" in out)


def test_cli_load_trace(tmp_path, capsys) -> None:
    path = tmp_path / "load.npy"
    np.save(path, np.random.default_rng(0).integers(0, 50, size=(8, 2, 64)).astype(np.float32))
    args = ["simulate", "--trace", str(path), "--replicas", "80", "--gpus", "16", "--json",
            "--no-progress", "--migrate", "--phase", "decode"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["label"] == "default/global+migrate"
    assert main([*args, "--rounding", "tokens"]) == 2
    assert "--rounding tokens needs a routing trace" in capsys.readouterr().err


def test_cli_rounding_tokens(traces_dir, capsys) -> None:
    args = _cli(traces_dir / "esft_intent.npz", "--dispatch", "local", "--json", "--compare")
    assert main([*args, "--rounding", "tokens"]) == 0
    tokens = json.loads(capsys.readouterr().out)["results"]
    assert main(args) == 0
    fractional = json.loads(capsys.readouterr().out)["results"]
    assert [r["label"] for r in tokens] == [r["label"] for r in fractional]
    for whole, split in zip(tokens, fractional):
        assert whole["balancedness"] != split["balancedness"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--plot", "out.jpg"], "--plot"),
        (["--dispatch", "fast"], "--dispatch"),
        (["--window", "100"], "none to score"),
        (["--policy", "nope"], "--policy"),
        (["--hardware", "tpu"], "hardware preset"),
        (["--hw-param", "hbm_gbps"], "--hw-param"),
        (["--hw-param", "speed=3"], "unknown hardware parameter"),
        (["--model", "gpt"], "model preset"),
    ],
)
def test_cli_bad_input(traces_dir, capsys, extra: list[str], match: str) -> None:
    assert main(_cli(traces_dir / "esft_intent.npz", *extra)) == 2
    assert match in capsys.readouterr().err
