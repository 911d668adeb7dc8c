"""The plugin balancer's hooks against SGLang's own dispatch, recorder and metadata code.

One process (EP size 1, world of one gloo rank): SGLang's ``ExpertLocationDispatchInfo``,
``topk_ids_logical_to_physical``, ``ExpertDistributionRecorder`` and
``ExpertLocationMetadata`` are SGLang's real code; the model runner and the MoE kernels,
which need CUDA, are not here: a loop stands in for the forward pass and calls SGLang's
functions in the order its top-k code does (docs/sglang.md lists what this leaves
untested).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang.srt.eplb")

from eplb_plugin.config import EplbConfig  # noqa: E402
from eplb_plugin.integrations.sglang import patches  # noqa: E402
from eplb_plugin.integrations.sglang.runtime import RecorderShim, SglangEplb  # noqa: E402

NUM_LAYERS, MOE_LAYERS, EXPERTS, REDUNDANT = 3, [1, 2], 8, 4
SLOTS = EXPERTS + REDUNDANT


def _weights(phy2log: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per MoE layer, one [P, 3] tensor whose row p identifies (expert, layer)."""
    return [
        [(phy2log[layer] * 100 + layer).to(torch.float32).unsqueeze(1).repeat(1, 3)]
        for layer in MOE_LAYERS
    ]


@pytest.fixture
def deployment(sglang_eplb, model, server_args):
    """SGLang's metadata and recorder for a 3-layer model (layer 0 dense), and the plugin
    runtime on it, with the dispatch and recorder hooks installed."""
    location, distribution = sglang_eplb.location, sglang_eplb.distribution
    model(NUM_LAYERS, EXPERTS)
    config = EplbConfig(
        num_redundant_experts=REDUNDANT, window=4, interval=4, plan_delay=0, min_gain=0.0,
        layers_per_step=1, policy="deepseek",
    )  # fmt: skip
    overrides = dict(ep_size=1, ep_num_redundant_experts=REDUNDANT, moe_a2a_backend="none",
                     expert_distribution_recorder_mode="stat",
                     expert_distribution_recorder_buffer_size=-1)  # fmt: skip
    with server_args(**overrides):
        metadata = location.ExpertLocationMetadata.init_trivial(None, moe_ep_rank=0)
        location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
        weights = _weights(metadata.physical_to_logical_map_cpu)
        runtime = SglangEplb(
            config, metadata.physical_to_logical_map_cpu, EXPERTS, MOE_LAYERS, weights, 0, 1,
            rank_invariant=True, source="select_experts",
            on_layout=lambda full, ids: patches.refresh_metadata(None, full, ids, 0),
        )  # fmt: skip
        patches.install()
        patches.set_current_runtime(runtime)
        recorder = distribution.ExpertDistributionRecorder.init_new(metadata, rank=0)
        distribution.set_global_expert_distribution_recorder(recorder)
        try:
            yield sglang_eplb, runtime, weights
        finally:
            patches.set_current_runtime(None)
            patches.uninstall()
            runtime.close()
            distribution.set_global_expert_distribution_recorder(None)
            location.set_global_expert_location_metadata(None, allow_overwrite=True)


def _forward(sglang, runtime, logical: list[torch.Tensor]) -> list[torch.Tensor]:
    """One pass as SGLang runs it: per MoE layer, the dispatch info, the mapping, then the
    recorder hook inside the layer's ``with_current_layer``; then the step."""
    recorder = sglang.distribution.get_global_expert_distribution_recorder()
    runtime.begin_forward(logical[0].shape[0])
    out = []
    with recorder.with_forward_pass(runtime.forwards, None):
        for layer_id, topk_ids in zip(MOE_LAYERS, logical):
            with recorder.with_current_layer(layer_id):
                info = sglang.dispatch.ExpertLocationDispatchInfo.init_new(layer_id)
                physical = sglang.dispatch.topk_ids_logical_to_physical(topk_ids.clone(), info)
                recorder.on_select_experts(topk_ids=physical)
                out.append(physical)
    runtime.end_forward()
    runtime.step()
    return out


def _skewed(g: torch.Generator, tokens: int = 32) -> list[torch.Tensor]:
    """Expert 0 takes half of the tokens in every layer."""
    hot = torch.rand(tokens, 2, generator=g) < 0.5
    return [
        torch.where(hot, 0, torch.randint(1, EXPERTS, (tokens, 2), generator=g)).to(torch.int32)
        for _ in MOE_LAYERS
    ]


def test_recorder_is_wrapped_and_sglang_records_the_same_counts(deployment):
    sglang, runtime, _ = deployment
    recorder = sglang.distribution.get_global_expert_distribution_recorder()
    assert isinstance(recorder, RecorderShim)  # SGLang's setter wrapped it
    recorder.start_record()
    g = torch.Generator().manual_seed(0)
    counted = torch.zeros(len(MOE_LAYERS), SLOTS, dtype=torch.int64)
    for _ in range(3):  # window 4 / interval 4: no plan yet
        logical = _skewed(g)
        for row, physical in enumerate(_forward(sglang, runtime, logical)):
            counted[row] += torch.bincount(physical.reshape(-1).long(), minlength=SLOTS)
    dump = recorder.dump_record(output_mode="object")["logical_count"]
    phy2log = runtime.balancer.maps.phy2log
    expected_logical = torch.zeros(len(MOE_LAYERS), EXPERTS, dtype=torch.int64)
    expected_logical.scatter_add_(1, phy2log, counted)
    assert torch.equal(dump.sum(0)[MOE_LAYERS].to(torch.int64), expected_logical)
    assert not dump.sum(0)[0].any()  # the dense layer routes nothing
    logical_load = runtime.balancer.recorder.logical_load(reduce=False)
    assert torch.equal(logical_load.to(torch.int64), expected_logical)


def test_dispatch_follows_the_plugin_maps_and_sglang_fallbacks(deployment):
    sglang, runtime, _ = deployment
    dispatch = sglang.dispatch
    info = dispatch.ExpertLocationDispatchInfo.init_new(1)
    assert info.eplb_plugin is runtime.routes[1]
    assert dispatch.ExpertLocationDispatchInfo.init_new(1, is_draft=True) is None  # SGLang's
    assert dispatch.ExpertLocationDispatchInfo.init_new(0) is None  # dense layer: SGLang's
    topk = torch.randint(0, EXPERTS, (20, 3), dtype=torch.int32)
    physical = dispatch.topk_ids_logical_to_physical(topk.clone(), info)
    assert physical.dtype == topk.dtype
    assert torch.equal(runtime.balancer.maps.phy2log[0][physical.long()], topk.long())
    # SGLang's own dynamic mapping on the same info stays inside the plugin's layout
    dynamic = dispatch._topk_ids_logical_to_physical_dynamic(topk.clone(), info)
    assert torch.equal(runtime.balancer.maps.phy2log[0][dynamic.long()], topk.long())

    # SGLang runs the mapping inside torch.compile'd helpers: one graph, no break
    def helper(ids, info):
        return dispatch.topk_ids_logical_to_physical(ids, info)

    compiled = torch.compile(helper, backend="eager", fullgraph=True)
    assert torch.equal(compiled(topk.clone(), info), physical)
    other = dispatch.ExpertLocationDispatchInfo.init_new(2)
    assert torch.equal(compiled(topk.clone(), other),
                       dispatch.topk_ids_logical_to_physical(topk.clone(), other))  # fmt: skip


def test_rebalance_moves_weights_and_refreshes_sglang_metadata(deployment):
    sglang, runtime, weights = deployment
    recorder = sglang.distribution.get_global_expert_distribution_recorder()
    recorder.start_record()
    before = runtime.balancer.maps.phy2log.clone()
    g = torch.Generator().manual_seed(1)
    reports = []
    for _ in range(12):
        logical = _skewed(g)
        in_force = runtime.balancer.maps.phy2log.clone()  # commits happen in the step after
        physical = _forward(sglang, runtime, logical)
        for row, (ids, phys) in enumerate(zip(logical, physical)):
            assert torch.equal(in_force[row][phys.long()], ids.long())
        reports += [r for r in runtime.reports if r not in reports]
    events = [r["event"] for r in reports]
    assert "done" in events, events
    after = runtime.balancer.maps.phy2log
    assert not torch.equal(after, before)
    # the hot expert got replicas, and every slot's weights are its new expert's
    assert int((after == 0).sum()) > int((before == 0).sum())
    for row, layer in enumerate(MOE_LAYERS):
        expected = (after[row] * 100 + layer).to(torch.float32)
        assert torch.equal(weights[row][0][:, 0], expected)
    # SGLang's own metadata was rebuilt from the layout in force (its init_by_mapping)
    metadata = sglang.location.get_global_expert_location_metadata()
    assert torch.equal(metadata.physical_to_logical_map_cpu[MOE_LAYERS], after)
    assert torch.equal(metadata.physical_to_logical_map_cpu[0], torch.arange(SLOTS) % EXPERTS)
    for layer in MOE_LAYERS:
        slots = metadata.logical_to_all_physical(layer, 0)
        assert sorted(slots) == sorted((after[MOE_LAYERS.index(layer)] == 0).nonzero().view(-1)
                                       .tolist())  # fmt: skip
    # and the routing after the move still maps every token to a slot of its expert
    logical = _skewed(g)
    for row, phys in enumerate(_forward(sglang, runtime, logical)):
        assert torch.equal(runtime.balancer.maps.phy2log[row][phys.long()], logical[row].long())


@pytest.mark.parametrize(
    ("mode", "source"), [("low_latency", "deepep_low_latency"), ("normal", "deepep_normal")]
)
def test_deepep_counts_match_sglang_gatherers(sglang_eplb, model, server_args, mode, source):
    """DeepEP's per-rank received counts reach the plugin's counts exactly as SGLang's own
    DeepEP gatherers record them."""
    location, distribution = sglang_eplb.location, sglang_eplb.distribution
    model(NUM_LAYERS, EXPERTS)
    config = EplbConfig(num_redundant_experts=REDUNDANT, window=8, interval=100)
    recorder_mode = "stat_approx" if mode == "normal" else "stat"
    with server_args(ep_size=1, ep_num_redundant_experts=REDUNDANT, moe_a2a_backend="deepep",
                     deepep_mode=mode, expert_distribution_recorder_mode=recorder_mode,
                     expert_distribution_recorder_buffer_size=-1):  # fmt: skip
        metadata = location.ExpertLocationMetadata.init_trivial(None, moe_ep_rank=0)
        runtime = SglangEplb(
            config, metadata.physical_to_logical_map_cpu, EXPERTS, MOE_LAYERS,
            _weights(metadata.physical_to_logical_map_cpu), 0, 1, source=source,
        )  # fmt: skip
        try:
            inner = distribution.ExpertDistributionRecorder.init_new(metadata, rank=0)
            shim = RecorderShim(inner, runtime)
            shim.start_record()
            g = torch.Generator().manual_seed(2)
            total = torch.zeros(len(MOE_LAYERS), SLOTS, dtype=torch.int64)
            runtime.begin_forward(16)
            with shim.with_forward_pass(0, None):
                for row, layer in enumerate(MOE_LAYERS):
                    received = torch.randint(0, 9, (SLOTS,), generator=g, dtype=torch.int32)
                    total[row] += received.long()
                    with shim.with_current_layer(layer):
                        if mode == "low_latency":
                            shim.on_deepep_dispatch_low_latency(received)
                        else:
                            shim.on_deepep_dispatch_normal(received.tolist(), None, None, None)
            ours = runtime.balancer.counts.clone()
            runtime.end_forward()
            dump = shim.dump_record(output_mode="object")["logical_count"].sum(0)
        finally:
            runtime.close()
    assert torch.equal(ours.long(), total)
    phy2log = metadata.physical_to_logical_map_cpu[MOE_LAYERS]
    logical = torch.zeros(len(MOE_LAYERS), EXPERTS, dtype=torch.int64)
    logical.scatter_add_(1, phy2log, total)
    assert torch.equal(dump[MOE_LAYERS].long(), logical)
