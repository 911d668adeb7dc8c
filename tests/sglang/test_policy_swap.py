"""The policy swap inside SGLang's own EPLB code (SGLang installed; run in .venv-sglang)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("sglang.srt.eplb")

from eplb_plugin import ExpertLayout, register_policy  # noqa: E402
from eplb_plugin.formats import write_sglang_dump  # noqa: E402
from eplb_plugin.integrations.sglang import disable, enable_policy_swap, patches  # noqa: E402
from eplb_plugin.integrations.sglang.policy import plan_for_sglang  # noqa: E402
from eplb_plugin.policies import plan  # noqa: E402
from eplb_plugin.policies.deepseek import deepseek_policy  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
CALLS: list[tuple[int, ...]] = []


def _spy(weight, topology, previous=None, **options):
    """DeepSeek's policy, recording each call (proves the swap reached eplb-plugin)."""
    CALLS.append(tuple(weight.shape))
    return deepseek_policy(weight, topology, previous=previous)


def _reversed_gpus(weight, topology, previous=None, **options):
    """DeepSeek's layout with the GPUs in reverse order: valid, and unlike SGLang's own."""
    layout = deepseek_policy(weight, topology, previous=previous)
    g, s = topology.num_gpus, topology.slots_per_gpu
    phy2log = layout.phy2log.view(layout.num_layers, g, s).flip(1).reshape(layout.num_layers, -1)
    return ExpertLayout.from_phy2log(phy2log, topology, layout.num_experts)


register_policy("test-sglang-spy", _spy, replace=True)
register_policy("test-sglang-reversed", _reversed_gpus, replace=True)


@pytest.fixture
def swapped(sglang_eplb):
    CALLS.clear()
    yield enable_policy_swap
    disable()


@pytest.fixture(scope="module")
def real_load() -> torch.Tensor:
    """[32 steps, 26 layers, 64 experts] DeepSeek-V2-Lite routing counts (examples/)."""
    path = ROOT / "examples" / "dsv2lite_intent_load.npy"
    return torch.from_numpy(np.load(path)).to(torch.int64)


@pytest.mark.parametrize("name", ["deepseek", "deepseek_hierarchical"])
def test_swap_with_deepseek_policy_reproduces_sglang_exactly(sglang_eplb, swapped, real_load,
                                                              name):  # fmt: skip
    algorithms = sglang_eplb.algorithms
    algorithm = algorithms.EplbAlgorithm[name]
    # 64 experts + 16 redundant on 8 GPUs (10 per GPU), 8 groups over 2 nodes
    args = (real_load, 80, 10, 8, 2, algorithm)
    original = algorithms.rebalance_experts(*args)
    swapped("test-sglang-spy")
    assert algorithms.rebalance_experts is not getattr(algorithms.rebalance_experts,
                                                      "__wrapped__", None)  # fmt: skip
    ours = algorithms.rebalance_experts(*args)
    assert CALLS == [(26, 64)]
    for mine, theirs in zip(ours, original):
        assert torch.equal(mine, theirs.cpu())


def test_swap_reaches_sglang_metadata_built_by_eplb(sglang_eplb, swapped, model, server_args,
                                                     real_load):  # fmt: skip
    """SGLang's ExpertLocationMetadata.init_by_eplb (its EPLB manager's planning call)."""
    model(26, 64, num_groups=None)
    swapped("test-sglang-reversed")
    with server_args(ep_size=4, ep_num_redundant_experts=16, eplb_algorithm="auto",
                     moe_a2a_backend="deepep", ep_dispatch_algorithm="static"):  # fmt: skip
        metadata = sglang_eplb.location.ExpertLocationMetadata.init_by_eplb(None, real_load)
    topology_load = real_load.sum(0).to(torch.float32)
    from eplb_plugin import Topology

    expected = plan(topology_load, Topology(80, 1, 1, 4), policy="test-sglang-reversed")
    assert torch.equal(metadata.physical_to_logical_map_cpu, expected.phy2log)
    # SGLang derived its own maps from ours: every replica list points back at its expert
    log2phy = metadata.logical_to_all_physical_map_cpu
    for layer in (0, 25):
        for expert in (0, 63):
            slots = [s for s in log2phy[layer, expert].tolist() if s >= 0]
            assert slots and all(expected.phy2log[layer, s] == expert for s in slots)


def test_dump_file_as_init_expert_location_runs_our_policy(
    sglang_eplb, swapped, model, server_args, real_load, tmp_path
):
    """A load written by eplb-plugin as an SGLang dump, given to --init-expert-location:
    SGLang's start-up path reads it and places experts with the swapped policy."""
    model(26, 64)
    path = tmp_path / "load.pt"
    write_sglang_dump(path, real_load)
    swapped("test-sglang-spy")
    with server_args(ep_size=2, ep_num_redundant_experts=2, init_expert_location=str(path),
                     moe_a2a_backend="deepep"):  # fmt: skip
        metadata = sglang_eplb.location.compute_initial_expert_location_metadata(None, 0)
    assert CALLS == [(26, 64)]
    phy2log, _, _ = plan_for_sglang(real_load, 66, 33, None, 1, "deepseek", policy="deepseek")
    assert torch.equal(metadata.physical_to_logical_map_cpu, phy2log)


def test_algorithms_not_swapped_stay_sglang(sglang_eplb, swapped, real_load):
    algorithms = sglang_eplb.algorithms
    vec = algorithms.EplbAlgorithm.deepseek_vec
    args = (real_load, 80, 10, 8, 2, vec)
    original = algorithms.rebalance_experts(*args)
    swapped("test-sglang-spy", ("deepseek",))
    again = algorithms.rebalance_experts(*args)
    assert CALLS == []
    for mine, theirs in zip(again, original):
        assert torch.equal(mine, theirs)


def test_disable_restores_sglang_function(sglang_eplb):
    algorithms = sglang_eplb.algorithms
    before = algorithms.rebalance_experts
    enable_policy_swap("default")
    assert algorithms.rebalance_experts is not before
    assert algorithms.rebalance_experts.__wrapped__ is before
    disable()
    assert algorithms.rebalance_experts is before


def test_installed_sglang_passes_the_version_and_signature_guard(sglang_eplb):
    assert patches.version_supported(patches.check_version())
    patches.check_targets()  # every imported target module: signatures as written for


def test_signature_guard_refuses_a_changed_function():
    def changed(weight, num_replicas, num_groups, num_nodes, num_gpus):
        pass

    with pytest.raises(ValueError, match="tokens_per_expert"):
        patches.check_signature(changed, patches.TARGETS[0][2], "eplb_algorithms.x")


def _record_passes(recorder, passes: list[list[torch.Tensor]]) -> None:
    """Drive SGLang's recorder as its model runner and MoE layers do."""
    for pass_id, layers in enumerate(passes):
        with recorder.with_forward_pass(pass_id, None):
            for layer, topk_ids in enumerate(layers):
                with recorder.with_current_layer(layer):
                    recorder.on_select_experts(topk_ids=topk_ids)


def test_sglang_eplb_manager_plans_with_swapped_policy(sglang_eplb, swapped, model, server_args):
    """SGLang's EPLBManager: its recorder's dump, then its planning step (which calls the
    algorithm through ExpertLocationMetadata.init_by_eplb) gives eplb-plugin's layout."""
    from sglang.srt.eplb.eplb_manager import EPLBManager

    location, distribution = sglang_eplb.location, sglang_eplb.distribution
    model(4, 8)
    generator = torch.Generator().manual_seed(0)
    # skewed routing: expert 0 is hot in every layer (physical ids: trivial layout, 12 slots)
    passes = [
        [torch.where(torch.rand(16, 2, generator=generator) < 0.5, 0,
                     torch.randint(0, 12, (16, 2), generator=generator)) for _ in range(4)]
        for _ in range(5)
    ]  # fmt: skip
    swapped("test-sglang-reversed")
    with server_args(ep_size=2, ep_num_redundant_experts=4, enable_eplb=True,
                     expert_distribution_recorder_mode="stat", moe_a2a_backend="deepep",
                     deepep_mode="normal",
                     eplb_rebalance_num_iterations=10, expert_distribution_recorder_buffer_size=10,
                     ep_dispatch_algorithm="static"):  # fmt: skip
        metadata = location.ExpertLocationMetadata.init_trivial(None, moe_ep_rank=0)
        location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
        recorder = distribution.ExpertDistributionRecorder.init_new(metadata, rank=0)
        distribution.set_global_expert_distribution_recorder(recorder)
        try:
            manager = EPLBManager(
                model_config=None, get_model=lambda: None,
                get_expert_location_updater=lambda: None,
                get_expert_backup_client=lambda: None, get_weight_updater=lambda: None,
            )  # fmt: skip
            assert recorder.recording  # the manager started SGLang's recorder
            _record_passes(recorder, passes)
            dump = recorder.dump_record(output_mode="object")
            new = manager._compute_expert_location_metadata(
                dump["logical_count"], broadcast_over_world=False
            )
        finally:
            location.set_global_expert_location_metadata(None, allow_overwrite=True)
            distribution.set_global_expert_distribution_recorder(None)
    trivial = torch.arange(12) % 8
    expected_count = torch.zeros(5, 4, 8, dtype=torch.int64)
    for step, layers in enumerate(passes):
        for layer, ids in enumerate(layers):
            ones = torch.ones(ids.numel(), dtype=torch.int64)
            expected_count[step, layer].index_add_(0, trivial[ids.reshape(-1)], ones)
    # SGLang's circular buffer (size 10) dumps all its rows, unused ones as zeros
    logical_count = dump["logical_count"].to(torch.int64)
    assert logical_count.shape == (10, 4, 8)
    assert torch.equal(logical_count[:5], expected_count) and not logical_count[5:].any()
    from eplb_plugin import Topology

    expected = plan(expected_count.sum(0), Topology(12, 1, 1, 2), policy="test-sglang-reversed")
    assert torch.equal(new.physical_to_logical_map_cpu, expected.phy2log)
