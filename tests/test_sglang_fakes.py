"""The SGLang integration in the core environment: SGLang replaced by faithful fakes.

What SGLang's own code does with the pieces is tested for real in ``tests/sglang`` (run in
``.venv-sglang``). Here, without SGLang: the policy answer, the runtime (dispatch, counting,
stepping) with the real Balancer, the patches applied to a fake SGLang module tree that
keeps SGLang 0.5.23's names, signatures and call order (``ModelRunner.initialize`` /
``forward``, ``select_experts``' info -> mapping -> padding mask -> recorder sequence), the
plugin switch, and the launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import types
from typing import Optional

import pytest
import torch

from eplb_plugin import Topology, rebalance_experts, register_policy
from eplb_plugin.cli.main import build_parser
from eplb_plugin.cli.main import main as eplb_main
from eplb_plugin.cli.sglang import build_launch
from eplb_plugin.config import EplbConfig
from eplb_plugin.integrations.sglang import ENV_CONFIG, ENV_POLICY, patches, plugin
from eplb_plugin.integrations.sglang.policy import (
    make_rebalance_experts,
    plan_for_sglang,
    sglang_topology,
)
from eplb_plugin.integrations.sglang.runtime import RecorderShim, SglangEplb, count_source
from eplb_plugin.policies.deepseek import deepseek_policy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_utils import run_ranks  # noqa: E402

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")
PREVIOUS: list = []


def _remember_previous(weight, topology, previous=None, **options):
    PREVIOUS.append((previous, options))
    return deepseek_policy(weight, topology)


register_policy("test-sglang-fakes-previous", _remember_previous, replace=True)


# ---------------------------------------------------------------------------- policy
def test_plan_for_sglang_is_deepseek_for_the_deepseek_policy():
    load = torch.rand(5, 3, 16) * 100
    for name, groups, nodes in (("deepseek", 1, 1), ("deepseek_hierarchical", 4, 2)):
        ours = plan_for_sglang(load, 24, 6, 4, 2, name, policy="deepseek")
        ref = rebalance_experts(load.sum(0), 24, groups, nodes, 4, policy="deepseek")
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)


def test_sglang_topology_follows_sglang_rules():
    assert sglang_topology(24, 6, 4, 2, 16, True) == Topology(24, 4, 2, 4)
    assert sglang_topology(24, 6, 4, 2, 16, False) == Topology(24, 1, 1, 4)
    assert sglang_topology(24, 6, None, 2, 16, True) == Topology(24, 1, 1, 4)  # no groups
    assert sglang_topology(24, 6, 3, 2, 16, True) == Topology(24, 1, 1, 4)  # 16 % 3
    assert sglang_topology(24, 6, 4, 3, 16, True) == Topology(24, 4, 1, 4)  # 4 GPUs / 3 nodes
    with pytest.raises(ValueError, match="multiple of num_local_physical_experts"):
        sglang_topology(24, 5, 1, 1, 16, False)


def test_swap_passes_other_algorithms_through_and_gives_previous():
    calls = []

    def original(*args):
        calls.append(args[-1])
        return "sglang"

    current = torch.arange(12).remainder(8).expand(2, -1).contiguous()
    fn = make_rebalance_experts(original, "test-sglang-fakes-previous", ("deepseek",),
                                current_phy2log=lambda: current,
                                options={"max_moved": 0.5})  # fmt: skip
    assert fn(torch.ones(2, 8), 12, 6, None, 1, "elasticity_aware") == "sglang"
    assert calls == ["elasticity_aware"]
    PREVIOUS.clear()
    phy2log, log2phy, logcnt = fn(torch.ones(1, 2, 8), 12, 6, None, 1, "deepseek")
    assert phy2log.shape == (2, 12) and logcnt.sum(1).eq(12).all()
    previous, options = PREVIOUS[0]
    assert previous is not None and torch.equal(previous.phy2log, current)
    assert options["max_moved"] == 0.5  # (plan adds the per-step loads as steps=)
    with pytest.raises(ValueError, match="unknown policy"):
        make_rebalance_experts(original, "no-such-policy")
    with pytest.raises(ValueError, match="not SGLang EPLB algorithm names"):
        make_rebalance_experts(original, "default", ("deepseek", "nope"))
    with pytest.raises(ValueError, match="tokens_per_expert"):
        plan_for_sglang(torch.ones(8), 12, 6, None, 1, "deepseek")


# ---------------------------------------------------------------------------- runtime
def test_count_source_mirrors_sglang_gatherer_choice():
    assert count_source("none", "auto", "stat") == "select_experts"
    assert count_source("deepep", "low_latency", None) == "deepep_low_latency"
    assert count_source("deepep", "normal", "stat") == "select_experts"
    assert count_source("deepep", "normal", "stat_approx") == "deepep_normal"
    assert count_source("deepep", "auto", "stat") == "select_experts"


class FakeBalancer:
    """The Balancer's surface the runtime uses, for shapes the single-process real one
    cannot take (several EP ranks)."""

    def __init__(self, config, layout, expert_tensors, group=None, rank=None, world_size=None):
        from eplb_plugin.maps import ExpertMaps

        self.config, self.layout, self.rank = config, layout, rank
        self.maps = ExpertMaps.of(layout)
        self.counts = torch.zeros(layout.num_layers, layout.num_slots, dtype=torch.int32)
        self.stats, self.comm, self.events = {}, None, []
        self.closed = False

    def step(self):
        return {"event": self.events.pop(0), "step": 1} if self.events else None

    def close(self):
        self.closed = True


def _config(**kw):
    base = dict(num_redundant_experts=4, window=4, interval=4, plan_delay=0, min_gain=0.0,
                layers_per_step=1, policy="deepseek")  # fmt: skip
    base.update(kw)
    return EplbConfig(**base)


def _trivial(num_layers=3, experts=8, slots=12):
    return (torch.arange(slots) % experts).expand(num_layers, -1).contiguous()


def test_runtime_counts_only_inside_forward_passes_and_from_its_source():
    runtime = SglangEplb(_config(), _trivial(), 8, [1, 2], [[torch.zeros(6, 2)]] * 2, 1, 2,
                         source="deepep_low_latency", balancer_cls=FakeBalancer)  # fmt: skip
    counts = runtime.balancer.counts
    runtime.count_local(1, torch.arange(6), "deepep_low_latency")
    assert not counts.any()  # outside a pass (e.g. CUDA-graph capture): nothing added
    runtime.begin_forward(5)
    runtime.count_local(1, torch.arange(6), "deepep_low_latency")
    runtime.count_local(2, [1] * 6, "deepep_normal")  # not this runtime's source
    runtime.count_local(0, [1] * 6, "deepep_low_latency")  # dense layer: not balanced
    runtime.count_select_experts(1, torch.tensor([[0, 1]]))  # not the source either
    runtime.end_forward()
    assert counts[0].tolist() == [0] * 6 + list(range(6))  # rank 1's slots 6..11
    assert not counts[1].any()
    runtime.begin_forward(0)  # an idle DP-attention pass
    runtime.count_local(1, torch.ones(6), "deepep_low_latency")
    assert counts[0].tolist() == [0] * 6 + list(range(6))


def test_runtime_select_experts_counts_skip_padding_and_unknown_ids():
    runtime = SglangEplb(_config(), _trivial(), 8, [1, 2], [[torch.zeros(12, 2)]] * 2, 0, 1,
                         balancer_cls=FakeBalancer)  # fmt: skip
    runtime.begin_forward(3)
    runtime.count_select_experts(2, torch.tensor([[3, 3], [11, -1], [-1, 99]]))
    runtime.count_select_experts(None, torch.tensor([[0, 0]]))  # no current layer
    runtime.end_forward()
    expected = torch.zeros(12, dtype=torch.int32)
    expected[3], expected[11] = 2, 1
    assert torch.equal(runtime.balancer.counts[1], expected)
    assert not runtime.balancer.counts[0].any()


def test_runtime_seed_is_rank_invariant_without_all_to_all():
    seeds = {}
    for invariant in (True, False):
        for rank in (0, 1):
            runtime = SglangEplb(_config(seed=3), _trivial(), 8, [1], [[torch.zeros(6, 1)]],
                                 rank, 2, rank_invariant=invariant,
                                 balancer_cls=FakeBalancer)  # fmt: skip
            runtime.begin_forward(4)
            seeds[invariant, rank] = int(runtime.seed)
            runtime.close()
    assert seeds[True, 0] == seeds[True, 1]
    assert seeds[False, 0] != seeds[False, 1]


def test_runtime_refreshes_sglang_metadata_when_a_rebalance_ends():
    seen = []
    runtime = SglangEplb(_config(), _trivial(), 8, [1, 2], [[torch.zeros(12, 1)]] * 2, 0, 1,
                         balancer_cls=FakeBalancer,
                         on_layout=lambda full, ids: seen.append((full, ids)))  # fmt: skip
    runtime.balancer.events = ["planned", "chunk", "done"]
    runtime.balancer.maps.phy2log[1] = torch.arange(12).flip(0) % 8
    assert runtime.step()["event"] == "planned" and runtime.step()["event"] == "chunk"
    assert not seen
    assert runtime.step()["event"] == "done"
    ((full, ids),) = seen
    assert ids == [1, 2] and full.shape == (3, 12)
    assert torch.equal(full[0], torch.arange(12) % 8)  # dense layer row kept
    assert torch.equal(full[2], torch.arange(12).flip(0) % 8)
    assert runtime.summary()["reports"][-1]["event"] == "done"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(layer_ids=[]), "no MoE layer"),
        (dict(layer_ids=[2, 1]), "ascending"),
        (dict(layer_ids=[1, 3]), "do not fit"),
        (dict(num_experts=10), "redundant"),
        (dict(ep_size=5), "must divide the 12 physical slots"),
    ],
)
def test_runtime_refuses_bad_setups(kwargs, match):
    args = dict(config=_config(), model_phy2log=_trivial(), num_experts=8, layer_ids=[1, 2],
                expert_tensors=[[torch.zeros(6, 1)]] * 2, ep_rank=0, ep_size=2)  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SglangEplb(**args, balancer_cls=FakeBalancer)


def test_runtime_takes_model_groups_and_sglang_nodes_unless_set():
    def topology(config, **kw):
        tensors = [[torch.zeros(6, 1)]]
        runtime = SglangEplb(config, _trivial(experts=16, slots=24), 16, [1], tensors, 0, 4,
                             balancer_cls=FakeBalancer, **kw)  # fmt: skip
        return runtime.topology

    config = _config(num_redundant_experts=8)
    assert topology(config, num_groups=4, num_nodes=2) == Topology(24, 4, 2, 4)
    assert topology(config, num_groups=3, num_nodes=3) == Topology(24, 1, 1, 4)  # don't fit
    assert topology(_config(num_redundant_experts=8, num_groups=2, num_nodes=4),
                    num_groups=4, num_nodes=2) == Topology(24, 2, 4, 4)  # fmt: skip


def test_recorder_shim_delegates_and_tracks_nested_layers():
    calls = []

    class Inner:
        recording = True

        @contextlib.contextmanager
        def with_current_layer(self, layer_idx):
            calls.append(("layer", layer_idx))
            yield

        def on_select_experts(self, topk_ids):
            calls.append(("select", topk_ids.tolist()))

        def dump_record(self, output_mode="file"):
            return "dumped"

    runtime = SglangEplb(_config(), _trivial(), 8, [1, 2], [[torch.zeros(12, 1)]] * 2, 0, 1,
                         balancer_cls=FakeBalancer)  # fmt: skip
    shim = RecorderShim(Inner(), runtime)
    runtime.begin_forward(1)
    with shim.with_current_layer(1):
        with shim.with_current_layer(2):
            shim.on_select_experts(topk_ids=torch.tensor([[5]]))
        shim.on_select_experts(topk_ids=torch.tensor([[4]]))
    assert shim.recording and shim.dump_record(output_mode="object") == "dumped"
    assert calls == [("layer", 1), ("layer", 2), ("select", [[5]]), ("select", [[4]])]
    assert runtime.balancer.counts[1, 5] == 1 and runtime.balancer.counts[0, 4] == 1


class _InnerRecorder:
    """SGLang's no-op recorder surface (what the shim wraps when SGLang records nothing)."""

    recording = False

    @contextlib.contextmanager
    def with_current_layer(self, layer_idx):
        yield

    def on_deepep_dispatch_normal(self, **kwargs):
        pass


def _deepep_normal_body(rank: int, world_size: int) -> tuple[list, list]:
    """Each rank routes its own tokens, dispatches them with (the fake of) DeepEP's normal
    mode, and hands the received per-expert counts to the shim, as SGLang's DeepEP
    dispatcher hands them to its recorder."""
    import torch.distributed as dist

    sys.path.insert(0, FAKES)
    import deep_ep

    from eplb_plugin.integrations.sglang.runtime import route

    runtime = SglangEplb(_config(), _trivial(), 8, [1, 2], [[torch.zeros(6, 2)]] * 2, rank,
                         world_size, source="deepep_normal", balancer_cls=FakeBalancer)  # fmt: skip
    shim = RecorderShim(_InnerRecorder(), runtime)
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 20, 0)
    g = torch.Generator().manual_seed(rank)
    sent = []
    runtime.begin_forward(10)
    for layer in (1, 2):
        logical = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(10)])
        physical = route(logical, runtime.routes[layer]).long()
        sent.append(physical.tolist())
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(physical, 12)
        x = torch.zeros(10, 8, dtype=torch.bfloat16)
        _, _, _, recv_list, _, _ = buffer.dispatch(
            x, topk_idx=physical, topk_weights=torch.ones(10, 2), num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        )  # fmt: skip
        with shim.with_current_layer(layer):
            shim.on_deepep_dispatch_normal(recv_list, per_rank, per_rdma, per_expert)
    runtime.end_forward()
    return runtime.balancer.counts.tolist(), sent


def test_deepep_normal_received_counts_sum_to_the_global_slot_counts():
    results = run_ranks(_deepep_normal_body, 2, timeout=120)
    total = sum(torch.tensor(counts) for counts, _ in results)
    for row in range(2):
        ids = torch.tensor([sent[row] for _, sent in results]).reshape(-1)
        assert torch.equal(total[row], torch.bincount(ids, minlength=12).to(torch.int32))
    # each rank counted only the slots it holds
    assert not torch.tensor(results[0][0])[:, 6:].any()
    assert not torch.tensor(results[1][0])[:, :6].any()


# ---------------------------------------------------------------------------- fake SGLang
def _info_class() -> type:
    @dataclasses.dataclass
    class ExpertLocationDispatchInfo:
        """SGLang 0.5.23's dataclass (sglang/srt/eplb/expert_location_dispatch.py)."""

        ep_dispatch_algorithm: str
        partial_logical_to_rank_dispatch_physical_map: Optional[torch.Tensor]  # noqa: UP045
        partial_logical_to_all_physical_map: torch.Tensor
        partial_logical_to_all_physical_map_num_valid: torch.Tensor
        num_physical_experts: int
        rank_invariant: bool = False

        @classmethod
        def init_new(cls, layer_id: int, *, is_draft: bool = False):
            return None  # SGLang's answer while its --ep-dispatch-algorithm is unset

    return ExpertLocationDispatchInfo


def _fake_sglang(monkeypatch, num_layers=3, experts=8, slots=12, moe_layers=(1, 2), hidden=4):
    """Modules named, shaped and called like SGLang 0.5.23's, installed in sys.modules."""
    mods = {}

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        mods[name] = mod
        return mod

    for name in ("sglang", "sglang.srt", "sglang.srt.eplb", "sglang.srt.layers",
                 "sglang.srt.layers.moe", "sglang.srt.model_executor"):  # fmt: skip
        module(name, __path__=[])

    def topk_ids_logical_to_physical(topk_ids, info, log2phy_prob=None):
        if info is None:
            return topk_ids
        raise NotImplementedError(info.ep_dispatch_algorithm)

    dispatch = module(
        "sglang.srt.eplb.expert_location_dispatch",
        ExpertLocationDispatchInfo=_info_class(),
        topk_ids_logical_to_physical=topk_ids_logical_to_physical,
    )  # fmt: skip
    recorders = {"value": None}

    class NoopRecorder:
        recording = False

        @contextlib.contextmanager
        def with_current_layer(self, layer_idx):
            yield

        def on_select_experts(self, topk_ids):
            pass

    def set_global_expert_distribution_recorder(value):
        recorders["value"] = value

    def get_global_expert_distribution_recorder():
        if recorders["value"] is None:
            recorders["value"] = NoopRecorder()
        return recorders["value"]

    distribution = module(
        "sglang.srt.eplb.expert_distribution",
        set_global_expert_distribution_recorder=set_global_expert_distribution_recorder,
        get_global_expert_distribution_recorder=get_global_expert_distribution_recorder,
    )
    metadata_box = {"value": None}

    @dataclasses.dataclass
    class ModelConfigForExpertLocation:
        num_layers: int
        num_logical_experts: int
        num_groups: Optional[int] = None  # noqa: UP045

        @staticmethod
        def from_model_config(model_config):
            return ModelConfigForExpertLocation(num_layers, experts, None)

    class ExpertLocationMetadata:
        def __init__(self, phy2log):
            self.physical_to_logical_map_cpu = torch.as_tensor(phy2log).clone()
            self.num_logical_experts = experts
            self.ep_size = 1
            self.updates = []

        @staticmethod
        def init_by_mapping(model_config, physical_to_logical_map, moe_ep_rank=None):
            return ExpertLocationMetadata(physical_to_logical_map)

        def update(self, other, update_layer_ids):
            self.updates.append(list(update_layer_ids))
            rows = list(update_layer_ids)
            self.physical_to_logical_map_cpu[rows] = other.physical_to_logical_map_cpu[rows]

    location = module(
        "sglang.srt.eplb.expert_location",
        ModelConfigForExpertLocation=ModelConfigForExpertLocation,
        ExpertLocationMetadata=ExpertLocationMetadata,
        get_global_expert_location_metadata=lambda: metadata_box["value"],
    )
    moe = types.SimpleNamespace(moe_a2a_backend="none", deepep_mode="auto",
                                expert_distribution_recorder_mode=None)  # fmt: skip
    module("sglang.srt.runtime_context",
           get_exec=lambda: types.SimpleNamespace(moe=moe),
           get_parallel=lambda: types.SimpleNamespace(moe_ep_rank=0))  # fmt: skip

    def select_experts(router_logits, top_k, layer_id, num_token_non_padded):
        """SGLang's order: top-k, dispatch info, logical->physical, padding mask, recorder."""
        topk_ids = router_logits.topk(top_k, dim=-1).indices.to(torch.int32)
        info = mods["sglang.srt.eplb.expert_location_dispatch"].ExpertLocationDispatchInfo \
            .init_new(layer_id)  # fmt: skip
        topk_ids = topk_mod.topk_ids_logical_to_physical(topk_ids, info)
        topk_ids[num_token_non_padded:] = -1
        distribution.get_global_expert_distribution_recorder().on_select_experts(topk_ids=topk_ids)
        return topk_ids

    topk_mod = module("sglang.srt.layers.moe.topk",
                      topk_ids_logical_to_physical=topk_ids_logical_to_physical,
                      select_experts=select_experts)  # fmt: skip

    class Model:
        """Expert weights per MoE layer: row p of slot p is (its expert's id, layer)."""

        def __init__(self):
            row = torch.arange(slots) % experts
            self.weights = {
                layer: [(row * 100 + layer).float().unsqueeze(1).repeat(1, hidden)]
                for layer in moe_layers
            }

        @property
        def routed_experts_weights_of_layer(self):
            return self.weights

    class ModelRunner:
        def __init__(self, is_draft_worker=False, sglang_eplb=False):
            self.is_draft_worker = is_draft_worker
            self.sglang_eplb = sglang_eplb
            self.model_config = object()
            self.forward_pass_id = 0
            self.initialize()

        def initialize(self):
            metadata_box["value"] = ExpertLocationMetadata(
                (torch.arange(slots) % experts).expand(num_layers, -1)
            )
            self.model = Model()
            # SGLang's initialize makes its own EPLB manager when given --enable-eplb
            self.eplb_manager = object() if self.sglang_eplb else None

        def forward(self, forward_batch, skip_attn_backend_init=False, pp_proxy_tensors=None):
            self.forward_pass_id += 1
            recorder = distribution.get_global_expert_distribution_recorder()
            out = []
            n = forward_batch.input_ids.shape[0]
            for layer in moe_layers:
                with recorder.with_current_layer(layer):
                    out.append(select_experts(forward_batch.logits[layer], 2, layer, n))
            return out

    module("sglang.srt.model_executor.model_runner", ModelRunner=ModelRunner)
    return types.SimpleNamespace(dispatch=dispatch, distribution=distribution,
                                 location=location, metadata=metadata_box, moe=moe,
                                 mods=mods)  # fmt: skip


@pytest.fixture
def fake_sglang(monkeypatch):
    monkeypatch.setattr(patches, "installed_version", lambda: "0.5.23")
    fake = _fake_sglang(monkeypatch)
    yield fake
    plugin.disable()
    patches.uninstall()
    runtime = patches.current_runtime()
    if runtime is not None:
        runtime.close()
    patches.set_current_runtime(None)


class Batch:
    def __init__(self, logits: dict[int, torch.Tensor], idle: bool = False):
        self.logits = logits
        self.input_ids = torch.zeros(0 if idle else next(iter(logits.values())).shape[0])
        self.forward_mode = types.SimpleNamespace(is_idle=lambda: idle)


def test_patched_fake_sglang_runs_the_balancer_end_to_end(fake_sglang):
    plugin.enable(_config(dispatch="static"))
    runner_mod = sys.modules[patches.RUNNER_MODULE]
    runner = runner_mod.ModelRunner()
    runtime = getattr(runner, patches.RUNTIME_ATTR)
    assert patches.current_runtime() is runtime and runtime.layer_ids == [1, 2]
    assert isinstance(fake_sglang.distribution.get_global_expert_distribution_recorder(),
                      RecorderShim)  # fmt: skip
    assert runner_mod.ModelRunner(is_draft_worker=True).__dict__.get(patches.RUNTIME_ATTR) is None
    g = torch.Generator().manual_seed(0)
    weights = runner.model.weights
    for _ in range(12):
        bias = torch.zeros(8)
        bias[0] = 5.0  # expert 0 is hot
        logits = {layer: torch.randn(16, 8, generator=g) + bias for layer in (1, 2)}
        in_force = runtime.balancer.maps.phy2log.clone()
        out = runner.forward(Batch(logits))
        for row, layer in enumerate((1, 2)):
            logical = logits[layer].topk(2, dim=-1).indices
            assert torch.equal(in_force[row][out[row].long()], logical)
    assert runtime.balancer.stats.rebalances >= 1
    after = runtime.balancer.maps.phy2log
    assert int((after == 0).sum()) > 2  # expert 0 replicated
    for row, layer in enumerate((1, 2)):
        assert torch.equal(weights[layer][0][:, 0], (after[row] * 100 + layer).float())
    metadata = fake_sglang.metadata["value"]
    assert torch.equal(metadata.physical_to_logical_map_cpu[[1, 2]], after)
    assert metadata.updates and metadata.updates[-1] == [1, 2]
    steps = runtime.steps
    runner.forward(Batch({1: torch.zeros(0, 8), 2: torch.zeros(0, 8)}, idle=True))
    assert runtime.steps == steps + 1  # idle passes step too (lockstep over ranks)


def test_balancer_refuses_to_run_beside_sglang_own_eplb(fake_sglang):
    plugin.enable(_config(dispatch="static"))
    runner_mod = sys.modules[patches.RUNNER_MODULE]
    with pytest.raises(ValueError, match="SGLang's own EPLB is running"):
        runner_mod.ModelRunner(sglang_eplb=True)
    assert patches.current_runtime() is None


def test_uninstall_restores_fake_sglang(fake_sglang):
    dispatch = fake_sglang.dispatch
    originals = (dispatch.ExpertLocationDispatchInfo.__dict__["init_new"].__func__,
                 dispatch.topk_ids_logical_to_physical)  # fmt: skip
    topk_binding = sys.modules["sglang.srt.layers.moe.topk"].topk_ids_logical_to_physical
    patches.install()
    patches.install()  # idempotent
    assert dispatch.topk_ids_logical_to_physical is not originals[1]
    assert dispatch.topk_ids_logical_to_physical.__wrapped__ is originals[1]
    assert sys.modules["sglang.srt.layers.moe.topk"].topk_ids_logical_to_physical is \
        dispatch.topk_ids_logical_to_physical  # rebinds `from X import name`  # fmt: skip
    patches.uninstall()
    assert dispatch.ExpertLocationDispatchInfo.__dict__["init_new"].__func__ is originals[0]
    assert dispatch.topk_ids_logical_to_physical is originals[1]
    assert sys.modules["sglang.srt.layers.moe.topk"].topk_ids_logical_to_physical is topk_binding


def test_signature_guard_refuses_a_changed_target(fake_sglang, monkeypatch):
    def changed(topk_ids, expert_location_dispatch_info):
        return topk_ids

    monkeypatch.setattr(fake_sglang.dispatch, "topk_ids_logical_to_physical", changed)
    with pytest.raises(ValueError, match="not one the integration supports"):
        patches.install()


def test_policy_swap_on_fake_algorithms_module(fake_sglang, monkeypatch):
    def rebalance_experts(tokens_per_expert, num_physical_experts, num_local_physical_experts,
                          num_groups, num_nodes, algorithm):  # fmt: skip
        return "sglang"

    mod = types.ModuleType(patches.ALGORITHMS_MODULE)
    mod.rebalance_experts = rebalance_experts
    monkeypatch.setitem(sys.modules, patches.ALGORITHMS_MODULE, mod)
    plugin.enable_policy_swap("deepseek")
    assert plugin.active_policy() == "deepseek"
    phy2log, _, _ = mod.rebalance_experts(torch.ones(2, 3, 8), 12, 6, None, 1, "deepseek")
    assert phy2log.shape == (3, 12)
    assert mod.rebalance_experts(None, 12, 6, None, 1, "elasticity_aware") == "sglang"
    with pytest.raises(ValueError, match="cannot be combined"):
        plugin._ACTIVE["config"] = _config()
        plugin.enable_policy_swap("deepseek", ("deepseek",))
    plugin._ACTIVE["config"] = None
    plugin.disable()
    assert mod.rebalance_experts is rebalance_experts


def test_version_guard():
    assert patches.parse_version("0.5.23.post1") == (0, 5, 23)
    assert patches.version_supported("0.5.24rc0+cu13")
    assert not patches.version_supported("0.5.22") and not patches.version_supported("0.6.0")
    with pytest.raises(ValueError, match=">=0.5.23,<0.6"):
        patches.check_version("0.4.9")


def test_num_tokens_of_forward_batches():
    assert patches.num_tokens(Batch({1: torch.zeros(7, 8)})) == 7
    assert patches.num_tokens(Batch({1: torch.zeros(7, 8)}, idle=True)) == 0
    assert patches.num_tokens(types.SimpleNamespace(batch_size=3)) == 3


# ---------------------------------------------------------------------------- plugin switch
def test_register_reads_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    monkeypatch.delenv(ENV_POLICY, raising=False)
    plugin.register()  # nothing asked: nothing done (and no SGLang needed)
    assert plugin.active_config() is None and plugin.active_policy() is None
    monkeypatch.setenv(ENV_CONFIG, plugin.config_to_env(_config()))
    monkeypatch.setenv(ENV_POLICY, "default")
    with pytest.raises(ValueError, match="exclude each other"):
        plugin.register()
    monkeypatch.setenv(ENV_POLICY, "nope")
    with pytest.raises(ValueError, match="is not a policy"):
        plugin.policy_from_env({ENV_POLICY: "nope"})
    assert plugin.policy_from_env({ENV_POLICY: "default",
                                   plugin.ENV_ALGORITHMS: "deepseek, deepseek_vec",
                                   plugin.ENV_POLICY_OPTIONS: '{"max_moved": 2}'}) == (
        "default", ("deepseek", "deepseek_vec"), {"max_moved": 2})  # fmt: skip
    with pytest.raises(ValueError, match="must be a JSON object"):
        plugin.policy_from_env({ENV_POLICY: "default", plugin.ENV_POLICY_OPTIONS: "[1]"})
    with pytest.raises(ValueError, match="unknown SGLang algorithm"):
        plugin.policy_from_env({ENV_POLICY: "default", plugin.ENV_ALGORITHMS: "lp"})
    with pytest.raises(ValueError, match="not valid JSON"):
        plugin.config_from_env({ENV_CONFIG: "{"})
    with pytest.raises(ValueError, match="window"):
        plugin.config_from_env({ENV_CONFIG: json.dumps({"enable": True, "window": 0})})
    assert plugin.config_from_env({ENV_CONFIG: json.dumps({"enable": False})}) is None


def test_enable_without_sglang_names_the_missing_package(monkeypatch):
    # (not "sglang": tests/sglang is a namespace package of that name on pytest's path)
    if _installed("sglang.srt"):
        pytest.skip("SGLang is installed here")
    with pytest.raises(ValueError, match="SGLang is not installed"):
        plugin.enable(_config())


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------------------- launcher
def _launch_args(*argv: str) -> argparse.Namespace:
    args, extra = build_parser().parse_known_args(["sglang", *argv])
    args.extra = extra
    return args


def test_launcher_plugin_balancer_keeps_sglang_eplb_off():
    env, argv = build_launch(_launch_args(
        "launch_server", "--model-path", "m", "--tp", "8", "--enable-eplb",
        "--eplb-num-redundant-experts", "32", "--eplb-dispatch", "local",
        "--init-expert-location", "layout.json",
    ))  # fmt: skip
    assert argv == ["--model-path", "m", "--tp", "8", "--init-expert-location", "layout.json",
                    "--ep-num-redundant-experts", "32"]  # fmt: skip
    assert "--enable-eplb" not in argv
    config = EplbConfig.from_dict(json.loads(env[ENV_CONFIG]))
    assert config.enable and config.num_redundant_experts == 32 and config.dispatch == "local"
    env, argv = build_launch(_launch_args("launch_server", "--enable-eplb",
                                          "--eplb-num-redundant-experts", "8",
                                          "--ep-num-redundant-experts=8"))  # fmt: skip
    assert argv == ["--ep-num-redundant-experts=8"]


def test_launcher_policy_only_runs_sglang_eplb():
    env, argv = build_launch(_launch_args("launch_server", "--model-path", "m",
                                          "--eplb-policy-only", "--eplb-policy", "deepseek",
                                          "--eplb-rebalance-num-iterations", "500"))  # fmt: skip
    assert env == {ENV_POLICY: "deepseek"}
    assert argv == ["--enable-eplb", "--model-path", "m", "--eplb-rebalance-num-iterations",
                    "500"]  # fmt: skip
    env, _ = build_launch(_launch_args("launch_server", "--eplb-policy-only",
                                       "--eplb-swap-algorithms", "deepseek",
                                       "--eplb-policy-options", '{"max_moved": 0.25}'))  # fmt: skip
    assert env == {ENV_POLICY: "default", plugin.ENV_ALGORITHMS: "deepseek",
                   plugin.ENV_POLICY_OPTIONS: '{"max_moved": 0.25}'}  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--enable-eplb", "--eplb-algorithm", "deepseek"], "SGLang's own EPLB"),
        (["--enable-eplb", "--ep-dispatch-algorithm", "static"], "SGLang's own EPLB"),
        (
            [
                "--enable-eplb",
                "--eplb-num-redundant-experts",
                "8",
                "--ep-num-redundant-experts",
                "4",
            ],
            "disagrees",
        ),
        (["--enable-eplb", "--eplb-policy-only"], "exclude each other"),
        (["--eplb-policy-only", "--eplb-window", "10"], "no effect"),
        (["--eplb-policy-only", "--eplb-policy", "nope"], "unknown policy"),
        (["--eplb-window", "10"], "without --enable-eplb"),
        (["--eplb-swap-algorithms", "deepseek"], "only with --eplb-policy-only"),
        (["--enable-eplb", "--eplb-window", "0"], "window"),
    ],
)
def test_launcher_refuses_conflicts(argv, match):
    with pytest.raises(ValueError, match=match):
        build_launch(_launch_args("launch_server", *argv))


def test_launcher_cli_dry_run_and_errors(capsys):
    assert eplb_main(["sglang", "launch_server", "--model-path", "m", "--enable-eplb",
                      "--eplb-num-redundant-experts", "4", "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    plan, _ = json.JSONDecoder().raw_decode(out)
    assert plan["command"][1:4] == ["-m", "eplb_plugin.integrations.sglang.launch",
                                    "--model-path"]  # fmt: skip
    assert ENV_CONFIG in plan["env"]
    assert eplb_main(["sglang", "launch_server", "--enable-eplb", "--eplb-algorithm", "x"]) == 2
    assert "SGLang's own EPLB" in capsys.readouterr().err
