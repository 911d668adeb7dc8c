"""transformers integration, single process: tables, sharding, routing, exchange, bad input."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from eplb_plugin.config import EplbConfig  # noqa: E402
from eplb_plugin.integrations.transformers import apply_eplb, check_checkpoint  # noqa: E402
from eplb_plugin.integrations.transformers.comm import route_to_ranks  # noqa: E402
from eplb_plugin.integrations.transformers.engine import (  # noqa: E402
    attach_routing,
    greedy_decode,
)
from eplb_plugin.integrations.transformers.models import (  # noqa: E402
    FAMILIES,
    family_of,
    moe_layers,
)
from eplb_plugin.integrations.transformers.patch import ep_topology  # noqa: E402
from eplb_plugin.integrations.transformers.routing import (  # noqa: E402
    TraceRouting,
    synthetic_trace,
)
from eplb_plugin.integrations.transformers.tiny import (  # noqa: E402
    build_tiny_model,
    save_tiny_model,
)
from eplb_plugin.layout import ExpertLayout, Topology  # noqa: E402

FAMILY_NAMES = sorted(FAMILIES)


def random_layout(num_layers, num_experts, num_slots, ranks, seed=0) -> ExpertLayout:
    """Every expert once plus random extra replicas, shuffled over the slots."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_layers):
        extra = torch.randint(0, num_experts, (num_slots - num_experts,), generator=gen)
        row = torch.cat([torch.arange(num_experts), extra])
        rows.append(row[torch.randperm(num_slots, generator=gen)])
    return ExpertLayout.from_phy2log(
        torch.stack(rows), Topology(num_slots, 1, 1, ranks), num_experts
    )


def test_route_to_ranks_groups_rows_by_destination():
    slot = torch.tensor([[0, 5], [4, 7], [1, 2]])  # S = 4: ranks 0,1 | 1,1 | 0,0
    weight = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.1, 0.9]])
    token, ids, w, splits = route_to_ranks(slot, weight, 4, 2)
    assert splits == [2, 2]
    assert token.tolist() == [0, 2, 0, 1]
    assert ids.tolist() == [[0, 4], [1, 2], [4, 1], [0, 3]]  # 4 = sentinel (held elsewhere)
    expect = torch.tensor([[0.25, 0], [0.1, 0.9], [0, 0.75], [0.5, 0.5]])
    assert torch.equal(w, expect)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_single_rank_replicated_layout_matches_unsharded(family):
    """Slots re-laid with replicas (one rank, no exchange): logits equal the model's."""
    model = build_tiny_model(family, seed=1)
    fam = family_of(model.config)
    num_layers = len(moe_layers(model, fam))
    num_experts = fam.num_experts(model.config)
    layout = random_layout(num_layers, num_experts, num_experts + 5, 1, seed=3)
    patched = copy.deepcopy(model)
    handle = apply_eplb(patched, EplbConfig(enable=False), layout=layout)
    prompts = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    ref_tokens, ref_logits = greedy_decode(model, prompts, 4, record_logits=True)
    tokens, logits = greedy_decode(patched, prompts, 4, record_logits=True)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    # every (token, k) entry was counted once (no step() ran: counts accumulate)
    k = fam.top_k(model.config)
    assert handle.counts.sum(1).tolist() == [(3 * 5 + 3 * 3) * k] * num_layers
    experts = getattr(moe_layers(patched, fam)[0][1], fam.experts)
    assert experts.local.gate_up_proj.shape[0] == num_experts + 5


def test_sharded_slots_hold_the_layout_experts():
    model = build_tiny_model("qwen3_moe", seed=2)
    original = [copy.deepcopy(b.experts) for _, b in moe_layers(model, FAMILIES["qwen3_moe"])]
    layout = random_layout(2, 8, 12, 3, seed=5)
    apply_eplb(model, EplbConfig(enable=False), layout=layout, rank=1, world_size=3)
    for layer, (_, block) in enumerate(moe_layers(model, FAMILIES["qwen3_moe"])):
        local = block.experts.local
        held = layout.phy2log[layer, 4:8]
        assert local.num_experts == 4
        assert torch.equal(local.gate_up_proj, original[layer].gate_up_proj[held])
        assert torch.equal(local.down_proj, original[layer].down_proj[held])


def test_apply_twice_and_bad_layout_are_refused():
    model = build_tiny_model("mixtral")
    with pytest.raises(ValueError, match="num_gpus=2 != EP size 1"):
        apply_eplb(model, EplbConfig(enable=False), layout=random_layout(2, 8, 8, 2))
    apply_eplb(model, EplbConfig(enable=False))
    with pytest.raises(ValueError, match="already applied"):
        apply_eplb(model, EplbConfig(enable=False))


def test_ep_topology_requires_slots_divisible_by_ranks():
    assert ep_topology(EplbConfig(enable=True, num_redundant_experts=4), 16, 4).num_replicas == 20
    with pytest.raises(ValueError, match="EP size 3 does not divide the 20 physical slots"):
        ep_topology(EplbConfig(enable=True, num_redundant_experts=4), 16, 3)
    # EPLB off serves the logical experts only
    assert ep_topology(EplbConfig(enable=False, num_redundant_experts=4), 16, 4).num_replicas == 16


def test_unsupported_family_is_refused(tmp_path):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="model_type='llama' is not supported"):
        apply_eplb(model, EplbConfig(enable=False))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='llama'"):
        check_checkpoint(str(tmp_path))


def test_checkpoint_missing_expert_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_tiny_model("qwen2_moe", str(tmp_path / "ckpt"))
    family, config = check_checkpoint(path)
    assert family.name == "qwen2_moe"
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing expert tensors: .*layers\.1\..*experts\.3\.up"):
        check_checkpoint(path)


def test_checkpoint_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        check_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ValueError, match="no .safetensors file"):
        check_checkpoint(str(tmp_path))


def test_trace_routing_replaces_router_choices(traces_dir):
    model = build_tiny_model("deepseek_v3", seed=0, n_routed_experts=64, n_group=8,
                             topk_group=4, num_experts_per_tok=6)  # fmt: skip
    routing = attach_routing(str(traces_dir / "esft_intent.npz"), model)
    seen = []
    fam = FAMILIES["deepseek_v3"]
    block = moe_layers(model, fam)[1][1]
    block.gate.register_forward_hook(lambda m, a, out: seen.append(out[2].clone()))
    prompts = torch.zeros(2, 3, dtype=torch.int64)
    greedy_decode(model, prompts, 2, seq_ids=torch.tensor([0, 5]), routing=routing)
    import numpy as np

    with np.load(traces_dir / "esft_intent.npz") as data:
        ids, offsets = data["topk_ids"].astype(np.int64), data["seq_offsets"]
    # prefill: sequences 0 and 5, positions 0..2, MoE layer 1
    expect = np.concatenate(
        [ids[offsets[0] : offsets[0] + 3, 1], ids[offsets[5] : offsets[5] + 3, 1]]
    )
    assert seen[0].tolist() == expect.tolist()
    # decode step: position 3
    assert seen[1].tolist() == [ids[offsets[0] + 3, 1].tolist(), ids[offsets[5] + 3, 1].tolist()]


def test_trace_routing_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TraceRouting.from_file(str(tmp_path / "x.npz"), 8, 2)
    ids, offsets = synthetic_trace(2, 4, 3, 8, 2)
    with pytest.raises(ValueError, match="top_k=3 exceeds"):
        TraceRouting(ids, offsets, 8, 3)


def test_synthetic_trace_is_skewed_and_distinct_per_token():
    ids, offsets = synthetic_trace(8, 32, 2, 16, 4, skew=1.2, seed=1)
    assert ids.shape == (256, 2, 4) and offsets.tolist() == list(range(0, 257, 32))
    t = torch.as_tensor(ids.astype("int64"))
    assert (t.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token
    load = torch.bincount(t[:, 0].reshape(-1), minlength=16).float()
    assert load.max() > 3 * load.mean()
    # with phases the hot expert of a layer changes along the sequences
    ids, _ = synthetic_trace(4, 32, 1, 16, 2, skew=2.0, seed=1, phases=2)
    t = torch.as_tensor(ids.astype("int64")).view(4, 2, 16, 2)  # seqs, phase, pos, k
    hot = [torch.bincount(t[:, p].reshape(-1), minlength=16).argmax() for p in range(2)]
    assert hot[0] != hot[1]
