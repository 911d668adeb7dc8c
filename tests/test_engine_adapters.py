"""One scripted routing through the three engine adapters: the transformers EP layers, the
vLLM runtime over vLLM-shaped fakes and the SGLang runtime over SGLang-shaped fakes.

They share one routing path (``eplb_plugin.routing.Router``) and one runtime base, so the same
routing must give the same per-slot counts every step, the same maps after the rebalances and
the same expert in every slot's weights."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vllm_fakes import expert_weights, fake_runner  # noqa: E402

from eplb_plugin.config import EplbConfig  # noqa: E402
from eplb_plugin.integrations.sglang.runtime import SglangEplb, route  # noqa: E402
from eplb_plugin.integrations.transformers import apply_eplb  # noqa: E402
from eplb_plugin.integrations.transformers.models import FAMILIES, moe_layers  # noqa: E402
from eplb_plugin.integrations.transformers.tiny import build_tiny_model  # noqa: E402
from eplb_plugin.integrations.vllm import model as vllm_model  # noqa: E402
from eplb_plugin.integrations.vllm.runtime import VllmEplb, initial_phy2log  # noqa: E402
from eplb_plugin.layout import ExpertLayout, Topology  # noqa: E402

LAYERS, EXPERTS, SLOTS, TOP_K, TOKENS, STEPS = 2, 8, 12, 2, 24, 9
FAMILY = FAMILIES["qwen3_moe"]  # the tiny qwen3_moe model: 2 MoE layers, 8 experts, top-2


def script(step: int, layer: int) -> torch.Tensor:
    """[TOKENS, TOP_K] int64 distinct expert ids per token, skewed, different every call;
    the hot experts change halfway so that the second rebalance moves experts again."""
    g = torch.Generator().manual_seed(1000 * step + layer)
    weight = 1.0 / torch.arange(1, EXPERTS + 1, dtype=torch.float64) ** 2
    ids = torch.multinomial(weight.expand(TOKENS, -1), TOP_K, generator=g)
    return (ids + (3 if step >= STEPS // 2 else 0)) % EXPERTS


def config(dispatch: str) -> EplbConfig:
    return EplbConfig(num_redundant_experts=SLOTS - EXPERTS, window=4, interval=4,
                      plan_delay=0, min_gain=0.0, layers_per_step=1, dispatch=dispatch)  # fmt: skip


def held_experts(slots: torch.Tensor, full: torch.Tensor) -> list[int]:
    """For each slot row of ``slots`` [S, ...], the expert of ``full`` [E, ...] it equals."""
    return [next(e for e in range(len(full)) if torch.equal(row, full[e])) for row in slots]


# ---------------------------------------------------------------------- the three adapters
def run_vllm(cfg: EplbConfig) -> dict:
    runner = fake_runner(num_layers=LAYERS, num_experts=EXPERTS)
    rt = VllmEplb(cfg, vllm_model.moe_layers(runner))
    counts = []
    for step in range(STEPS):
        rt.begin_forward(TOKENS)
        for layer, moe in enumerate(runner.moes):
            moe.router.select_experts(script(step, layer))  # vLLM's router -> the op
        rt.end_forward()
        counts.append(rt.balancer.counts.clone())
        rt.step()
    held = [held_experts(moe.routed_experts.w13_weight.data, expert_weights(EXPERTS, i)[0])
            for i, moe in enumerate(runner.moes)]  # fmt: skip
    return {"counts": counts, "held": held, "balancer": rt.balancer}


def run_sglang(cfg: EplbConfig) -> dict:
    phy2log = initial_phy2log(LAYERS, EXPERTS, SLOTS, 1)
    full = [expert_weights(EXPERTS, layer) for layer in range(LAYERS)]
    tensors = [[w[phy2log[layer]].clone() for w in full[layer]] for layer in range(LAYERS)]
    rt = SglangEplb(cfg, phy2log, EXPERTS, list(range(LAYERS)), tensors, 0, 1)
    counts = []
    for step in range(STEPS):
        rt.begin_forward(TOKENS)
        for layer in range(LAYERS):
            physical = route(script(step, layer), rt.routes[layer])  # SGLang's dispatch hook
            rt.count_select_experts(layer, physical)  # SGLang's recorder hook
        rt.end_forward()
        counts.append(rt.balancer.counts.clone())
        rt.step()
    held = [held_experts(tensors[layer][0], full[layer][0]) for layer in range(LAYERS)]
    return {"counts": counts, "held": held, "balancer": rt.balancer}


def run_transformers(cfg: EplbConfig) -> dict:
    model = build_tiny_model("qwen3_moe", seed=4)
    originals = [copy.deepcopy(getattr(block, FAMILY.experts)) for _, block in
                 moe_layers(model, FAMILY)]  # fmt: skip
    layout = ExpertLayout.from_phy2log(
        initial_phy2log(LAYERS, EXPERTS, SLOTS, 1), Topology(SLOTS, 1, 1, 1), EXPERTS
    )
    handle = apply_eplb(model, cfg, layout=layout)
    ep_layers = [getattr(block, FAMILY.experts) for _, block in moe_layers(model, FAMILY)]
    hidden = torch.zeros(TOKENS, model.config.hidden_size)
    weights = torch.full((TOKENS, TOP_K), 1.0 / TOP_K)
    counts = []
    for step in range(STEPS):
        for layer, experts in enumerate(ep_layers):
            experts(hidden, script(step, layer), weights)  # the EP layer: route, send, run
        counts.append(handle.counts.clone())
        handle.step()
    name = FAMILY.expert_params[0]
    held = [held_experts(getattr(ep.local, name).data, getattr(orig, name).data)
            for ep, orig in zip(ep_layers, originals)]  # fmt: skip
    return {"counts": counts, "held": held, "balancer": handle.balancer}


@pytest.mark.parametrize("dispatch", ["static", "local", "node", "global"])
def test_same_routing_gives_the_same_counts_maps_and_weights_in_every_engine(dispatch):
    cfg = config(dispatch)
    runs = {"transformers": run_transformers(cfg), "vllm": run_vllm(cfg),
            "sglang": run_sglang(cfg)}  # fmt: skip
    ref = runs["transformers"]
    initial = initial_phy2log(LAYERS, EXPERTS, SLOTS, 1)
    assert ref["balancer"].stats.rebalances >= 2
    assert not torch.equal(ref["balancer"].maps.phy2log, initial)  # the experts did move
    for name, run in runs.items():
        b = run["balancer"]
        assert b.stats.failures == 0, name
        assert b.metrics.labels["engine"] == name  # the `engine` label of its eplb_* series
        for step, (got, want) in enumerate(zip(run["counts"], ref["counts"])):
            assert torch.equal(got, want), (name, step)
            assert int(got.sum()) == LAYERS * TOKENS * TOP_K  # every entry counted once
        for got, want in zip(b.maps.tensors(), ref["balancer"].maps.tensors()):
            assert torch.equal(got, want), name
        # every slot holds the weights of the expert the maps say it holds
        assert run["held"] == b.maps.phy2log.tolist() == ref["held"], name
