"""The step-time model's arithmetic against hand-computed cases."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from eplb_plugin.costmodel import (
    FUSED_SWEEP_US,
    HARDWARE,
    MODELS,
    Hardware,
    MoeShape,
    all_to_all_us,
    allreduce_us,
    balanced_layer_us,
    expert_us,
    get_hardware,
    get_model,
    layer_us,
    mode_overhead_us,
    waterfill_impl,
    waterfill_us,
)

# round figures so every expected value below is easy to check by hand
HW = Hardware(
    name="test", gpus_per_node=4, hbm_gbps=1000.0, gemm_tflops=100.0,
    a2a_ep=(4, 16), dispatch_us=(10.0, 30.0), combine_us=(20.0, 40.0),
    a2a_ref_tokens=100, a2a_ref_hidden=1000, ar_gbps=1.0, kernel_us=1.0, fused_waterfill=0,
)  # fmt: skip
# expert: 3 * 1000 * 500 * 2 bytes = 3 MB; 6 * 1000 * 500 = 3 MFLOP per token
MODEL = MoeShape("test", hidden=1000, intermediate=500, top_k=2, num_experts=8,
                 weight_bytes=2.0, act_bytes=2.0)  # fmt: skip


def test_expert_time_is_the_roofline_of_compute_and_memory() -> None:
    # 1000 tokens: 3e9 FLOP / 1e14 FLOP/s = 30 us; 2 active experts: 6e6 B + 1000*1000*2 B
    # = 8e6 B / 1e12 B/s = 8 us -> compute-bound, 30 us
    # 10 tokens: 0.3 us of compute; (6e6 + 2e4) B -> 6.02 us, memory-bound
    t = expert_us(HW, MODEL, torch.tensor([1000.0, 10.0]), torch.tensor([2.0, 2.0]))
    assert t.tolist() == pytest.approx([30.0, 6.02])


def test_all_to_all_interpolates_in_log_ep_and_scales_with_tokens_and_hidden() -> None:
    assert all_to_all_us(HW, 1, 100, 1000) == 0.0  # no peers, nothing to send
    assert all_to_all_us(HW, 4, 100, 1000) == pytest.approx(30.0)
    assert all_to_all_us(HW, 8, 100, 1000) == pytest.approx(50.0)  # halfway in log2
    assert all_to_all_us(HW, 64, 100, 1000) == pytest.approx(70.0)  # clamped to the table
    assert all_to_all_us(HW, 4, 300, 2000) == pytest.approx(30.0 * 3 * 2)
    # below the table's tokens the table's latency is kept
    assert all_to_all_us(HW, 4, 10, 1000) == pytest.approx(30.0)
    overlapped = dataclasses.replace(HW, a2a_hidden=0.75)
    assert all_to_all_us(overlapped, 4, 100, 1000) == pytest.approx(7.5)


def test_allreduce_follows_nccls_tree_and_ring_latency_model() -> None:
    # one node of 4: tree 6.8 + 2 * 3 * 0.6 = 10.4, ring 6.6 + 6 * 0.6 = 10.2 -> ring
    assert allreduce_us(HW, 1000, 4, 1) == pytest.approx(10.2 + 1.0)  # + 1000 B / 1 GB/s
    # 4 nodes of 4: tree 6.8 + 2 * (3 * 0.6 + 2 * 5.0) = 30.4;
    # ring 6.6 + (30 - 8) * 1.0 + 8 * 2.7 = 50.2 -> tree
    assert allreduce_us(HW, 0, 16, 4) == pytest.approx(30.4)
    assert allreduce_us(HW, 1000, 1, 1) == 0.0


def test_mode_overheads() -> None:
    assert mode_overhead_us(HW, MODEL, "static", 16, 4) == 0.0
    # water-fill of 8 sweeps: (30 + 47 * 8) kernels at 1 us
    assert waterfill_us(HW, 8) == 406.0
    assert mode_overhead_us(HW, MODEL, "local", 16, 4, iters=8) == 406.0
    # global adds the all-reduce of a [16 ranks, 8 experts + 1] float32 table (576 B at
    # 1 GB/s: 0.576 us)
    assert mode_overhead_us(HW, MODEL, "global", 16, 4, iters=8) == pytest.approx(
        406.0 + 30.4 + 0.576
    )
    # node: the same table over one node's 4 ranks (144 B), NVLink hops only: ring 10.2 us
    assert mode_overhead_us(HW, MODEL, "node", 16, 4, iters=8) == pytest.approx(
        406.0 + 10.2 + 0.144
    )
    # one node: node dispatch is global dispatch
    assert mode_overhead_us(HW, MODEL, "node", 4, 1) == mode_overhead_us(HW, MODEL, "global", 4, 1)
    fused = dataclasses.replace(HW, waterfill_us=5.0)
    assert mode_overhead_us(fused, MODEL, "local", 16, 4) == 5.0


def test_fused_waterfill_estimate() -> None:
    # one launch (kernel_us = 1) plus (8 + 1) sweeps at 2 us
    fused = dataclasses.replace(HW, fused_waterfill=1, fused_sweep_us=2.0)
    assert waterfill_impl(HW) == "torch" and waterfill_impl(fused) == "fused"
    assert waterfill_us(fused, 8) == 19.0
    assert waterfill_us(HW, 8, "fused") == 1.0 + 9 * FUSED_SWEEP_US
    assert waterfill_us(fused, 8, "torch") == 406.0  # the other implementation, asked for
    assert waterfill_us(fused, 0) == 3.0
    assert mode_overhead_us(fused, MODEL, "local", 16, 4, iters=8) == 19.0
    # a measured figure replaces the selected implementation only
    measured = dataclasses.replace(fused, waterfill_us=7.0)
    assert waterfill_us(measured, 8) == 7.0 and waterfill_us(measured, 8, "torch") == 406.0
    with pytest.raises(ValueError, match="implementation"):
        waterfill_us(HW, 8, "cuda")
    assert get_hardware("h200-nvlink-node", fused_waterfill=0.0).fused_waterfill == 0
    with pytest.raises(ValueError, match="dispatch"):
        mode_overhead_us(HW, MODEL, "random", 16, 4)


def test_layer_time_takes_the_busiest_gpu_plus_shared_costs() -> None:
    # 1 layer, 2 GPUs x 2 slots; GPU 0 gets 1000 tokens on both slots (compute: 30 us),
    # GPU 1 gets 10 tokens on one slot and 0.4 (rounds to none) on the other: memory-bound
    loads = torch.tensor([[600.0, 400.0, 10.0, 0.4]])
    t = layer_us(HW, MODEL, loads, 2, "static", 1, tokens_per_gpu=100)
    assert t.tolist() == pytest.approx([30.0 + 10.0 + 20.0])  # EP 2 < table: first row
    t_global = layer_us(HW, MODEL, loads, 2, "global", 1, 100, iters=0)
    # iters=0: 30 kernels; all-reduce over 2 ranks on one node: ring 6.6 + 2 * 0.6 = 7.8,
    # tree 6.8 + 2 * 0.6 = 8.0; a [2 ranks, 8 experts + 1] float32 table, 72 B at 1 GB/s
    assert float(t_global[0] - t[0]) == pytest.approx(30.0 + 7.8 + 0.072)


def test_balanced_layer_time_closed_form() -> None:
    # 1000 tokens per GPU, top-2, balancedness 0.5: the busiest GPU routes 4000 pairs
    # -> 120 us of compute; all-to-all at EP 16 and 10x the table's tokens: 70 * 10
    t = balanced_layer_us(HW, MODEL, 16, 4, 1000, 4, 0.5, "static")
    assert t == pytest.approx(120.0 + 700.0)
    with pytest.raises(ValueError, match="balancedness"):
        balanced_layer_us(HW, MODEL, 16, 4, 1000, 4, 0.0, "static")


def test_presets_and_overrides() -> None:
    assert {"h200-nvlink-node", "h800-ib400-multinode"} <= set(HARDWARE)
    v3 = get_model("deepseek-v3")
    assert (v3.hidden, v3.intermediate, v3.top_k, v3.num_experts) == (7168, 2048, 8, 256)
    assert v3.expert_bytes == 3 * 7168 * 2048
    assert "deepseek-v2-lite" in MODELS
    hw = get_hardware("h200-nvlink-node", hbm_gbps=3000)
    assert hw.hbm_gbps == 3000 and hw.name == "h200-nvlink-node"
    # DeepEP README: EP 32 dispatch 155 us + combine 273 us at 128 tokens, hidden 7168
    assert all_to_all_us(hw, 32, 128, 7168) == pytest.approx(428.0)
    with pytest.raises(ValueError, match="unknown hardware preset"):
        get_hardware("tpu")
    with pytest.raises(ValueError, match="unknown hardware parameter .dispatch_us."):
        get_hardware("h200-nvlink-node", dispatch_us=1.0)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_model("gpt")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hbm_gbps": 0.0}, "hbm_gbps"),
        ({"kernel_us": -1.0}, "kernel_us"),
        ({"fused_waterfill": 0.5}, "fused_waterfill"),
        ({"fused_sweep_us": -1.0}, "fused_sweep_us"),
        ({"ar_gbps": math.inf}, "ar_gbps"),
        ({"a2a_ep": (16, 4)}, "a2a_ep"),
        ({"a2a_hidden": 1.5}, "a2a_hidden"),
        ({"dispatch_us": (1.0,)}, "equal"),
    ],
)
def test_bad_hardware_is_refused(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(HW, **change)


def test_bad_model_is_refused() -> None:
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(MODEL, top_k=0)
    with pytest.raises(ValueError, match="weight_bytes"):
        dataclasses.replace(MODEL, weight_bytes=0)


def test_recommend_rows_rebased_on_the_fused_waterfill() -> None:
    """``eplb simulate --recommend`` shows the other water-fill by shifting the rows by the
    difference of ``mode_overhead_us``: the same as replaying with that hardware."""
    from eplb_plugin.cli.simulate import _rows_with_cost
    from eplb_plugin.layout import Topology
    from eplb_plugin.simulate import CostSpec, SimConfig, recommend

    model = dataclasses.replace(get_model("deepseek-v3"), num_experts=32)
    fused_hw = get_hardware("h800-ib400-multinode")
    assert waterfill_impl(fused_hw) == "fused"  # the default: what runs where Triton runs
    torch_hw = dataclasses.replace(fused_hw, fused_waterfill=0)
    topo, config = Topology(40, 1, 1, 8), SimConfig(window=2, interval=2)
    runs = {}
    for hw in (torch_hw, fused_hw):
        cost = CostSpec(hw, model, nodes=1)
        runs[waterfill_impl(hw)] = (
            cost,
            recommend(cost, topo, [4, 4096], num_layers=2, steps=6, config=config),
        )
    (torch_cost, torch_rows), (fused_cost, fused_rows) = runs["torch"], runs["fused"]
    shifted = _rows_with_cost(torch_rows, fused_cost, torch_cost, topo, config.waterfill_iters)
    for got, want in zip(shifted, fused_rows):
        for key in ("static_us", "local_us", "node_us", "global_us", "speedup"):
            assert got[key] == pytest.approx(want[key], rel=1e-9), key
        assert got["best"] == want["best"]
    # the fused estimate is ~600 us cheaper per layer for the water-fill modes
    gap = torch_rows[0]["local_us"] - fused_rows[0]["local_us"]
    assert gap == pytest.approx(waterfill_us(torch_hw, 8) - waterfill_us(fused_hw, 8))
