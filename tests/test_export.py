"""Offline export (eplb export / verify / the per-rank reader) on tiny real checkpoints.

Checkpoints come from transformers' own ``save_pretrained`` (DeepSeek-V3, Mixtral, Qwen2-MoE,
Qwen3-MoE, per-expert and fused names) and from a synthetic DeepSeek-V3-style writer with
fp8 weights, ``weight_scale_inv`` tensors, dense layers and an MTP layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eplb_plugin.checkpoint import Checkpoint, find_experts, read_header
from eplb_plugin.cli.main import main
from eplb_plugin.export import (
    EXPORT_INDEX,
    ExportConfig,
    export_checkpoint,
    open_export,
    plan_export,
    verify_export,
)
from eplb_plugin.formats import write_sglang_dump, write_sglang_layout
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.policies import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny configs: (config class, model class, kwargs)
TINY = {
    "dsv3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, n_shared_experts=1, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_local_experts=4, num_experts_per_tok=2, num_attention_heads=2,
        num_key_value_heads=2)),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_experts=4,
        num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=2)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16)),
}  # fmt: skip
FAMILY = {"dsv3": "deepseek", "mixtral": "mixtral", "qwen2moe": "qwen_moe", "qwen3moe": "qwen_moe"}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """name -> checkpoint folder written by transformers' save_pretrained (sharded)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, (config_cls, model_cls, kwargs) in TINY.items():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
        model.save_pretrained(root / name, max_shard_size="20KB")
        out[name] = str(root / name)
        if name == "qwen3moe":  # the fused form: experts.gate_up_proj [E, 2I, H]
            model.save_pretrained(root / "qwen3fused", save_original_format=False)
            out["qwen3fused"] = str(root / "qwen3fused")
    return out


def write_fp8_deepseek(root, layers=4, dense=1, experts=8, hidden=64, inter=32, mtp=True):
    """A DeepSeek-V3-style checkpoint: fp8 expert weights with block ``weight_scale_inv``,
    bf16 attention, dense first layers, one shard per layer, an MTP layer past
    ``num_hidden_layers`` and ``model.safetensors.index.json``."""
    os.makedirs(root)
    g = torch.Generator().manual_seed(7)

    def fp8(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(torch.float8_e4m3fn)

    def scale(out_f, in_f):
        return torch.rand(math.ceil(out_f / 128), math.ceil(in_f / 128), generator=g) + 0.5

    shards = {"embed": {"model.embed_tokens.weight": torch.randn(32, hidden, generator=g)}}
    for layer in range(layers + (1 if mtp else 0)):
        p = f"model.layers.{layer}"
        t = {
            f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            f"{p}.self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g).bfloat16(),
        }
        if layer < dense:
            for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter))):  # fmt: skip
                t[f"{p}.mlp.{proj}.weight"] = fp8(*shape)
                t[f"{p}.mlp.{proj}.weight_scale_inv"] = scale(*shape)
        else:
            t[f"{p}.mlp.gate.weight"] = torch.randn(experts, hidden, generator=g).bfloat16()
            t[f"{p}.mlp.gate.e_score_correction_bias"] = torch.rand(experts, generator=g)
            t[f"{p}.mlp.shared_experts.down_proj.weight"] = fp8(hidden, inter)
            for e in range(experts):
                for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                    ("down_proj", (hidden, inter))):  # fmt: skip
                    t[f"{p}.mlp.experts.{e}.{proj}.weight"] = fp8(*shape)
                    t[f"{p}.mlp.experts.{e}.{proj}.weight_scale_inv"] = scale(*shape)
        if layer == layers:
            t[f"{p}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=g).bfloat16()
        shards[f"layer{layer}"] = t
    weight_map = {}
    names = list(shards)
    for i, key in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file(shards[key], os.path.join(root, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shards[key]})
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {
        "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
        "num_hidden_layers": layers, "first_k_dense_replace": dense,
        "n_routed_experts": experts, "hidden_size": hidden, "num_nextn_predict_layers": 1,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }  # fmt: skip
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    (open(os.path.join(root, "tokenizer.json"), "w")).write("{}")
    return str(root)


@pytest.fixture
def fp8_ckpt(tmp_path):
    return write_fp8_deepseek(tmp_path / "dsv3-fp8")


def make_layout(num_layers, num_experts, extra=4, gpus=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    load = torch.rand(num_layers, num_experts, generator=g) ** 4 * 1000  # skewed: replicas
    return plan(load, Topology(num_experts + extra, 1, 1, gpus))


def layout_for(ckpt_dir, **kwargs):
    table = find_experts(Checkpoint.open(ckpt_dir))
    return make_layout(len(table.layers), table.num_experts, **kwargs)


def source_tensors(ckpt_dir):
    ckpt = Checkpoint.open(ckpt_dir)
    out = {}
    for name in ckpt.files:
        out.update(load_file(os.path.join(ckpt_dir, name)))
    return out


def snapshot(folder):
    """Names, sizes and content hashes of everything under ``folder`` (hidden files too)."""
    state = {}
    for dirpath, _, files in os.walk(folder):
        state[os.path.relpath(dirpath, folder)] = "dir"
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return state


CFG = ExportConfig(progress=False)


# ------------------------------------------------------------------ what is on disk
def test_save_pretrained_writes_per_expert_names_and_fused_on_request(hf):
    """Documents transformers 5.x: per-expert names by default, fused with
    save_original_format=False; find_experts recognises each family."""
    for name, family in FAMILY.items():
        ckpt = Checkpoint.open(hf[name])
        table = find_experts(ckpt)
        assert table.family.name == family
        assert table.per_expert and not table.fused
        assert len(ckpt.files) > 1 and os.path.isfile(
            os.path.join(hf[name], "model.safetensors.index.json")
        )
    dsv3 = find_experts(Checkpoint.open(hf["dsv3"]))
    assert dsv3.layers == [1, 2] and dsv3.num_experts == 8  # layer 0 is dense
    assert set(dsv3.per_expert[1][0]) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    mixtral = find_experts(Checkpoint.open(hf["mixtral"]))
    assert set(mixtral.per_expert[0][3]) == {"w1.weight", "w2.weight", "w3.weight"}
    fused = find_experts(Checkpoint.open(hf["qwen3fused"]))
    assert not fused.per_expert and set(fused.fused[0]) == {"gate_up_proj", "down_proj"}
    assert fused.fused[0]["gate_up_proj"].shape == (4, 32, 32)


def test_one_model_family_table():
    """Export's naming groups and the transformers integration's rows come from the core's
    one table (eplb_plugin.families)."""
    from eplb_plugin import checkpoint, families

    grouped = {t: fam.name for fam in checkpoint.FAMILIES for t in fam.model_types}
    assert set(grouped) == set(families.FAMILIES)
    for name, row in families.FAMILIES.items():
        assert grouped[name] == row.naming
        group = next(f for f in checkpoint.FAMILIES if f.name == row.naming)
        assert (group.module, group.num_experts_key) == (row.disk_module, row.num_experts_key)
    pytest.importorskip("transformers")
    from eplb_plugin.integrations.transformers import models

    assert models.FAMILIES == {n: f for n, f in families.FAMILIES.items() if f.transformers}
    assert all(models.FAMILIES[n] is families.FAMILIES[n] for n in models.FAMILIES)


def test_fp8_checkpoint_table(fp8_ckpt):
    table = find_experts(Checkpoint.open(fp8_ckpt))
    assert table.family.name == "deepseek"
    assert table.layers == [1, 2, 3]  # dense layer 0 and MTP layer 4 are not in the layout
    tails = set(table.per_expert[2][5])
    assert "gate_proj.weight_scale_inv" in tails and "down_proj.weight" in tails
    assert table.per_expert[2][5]["up_proj.weight"].dtype == "F8_E4M3"


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", ["dsv3", "mixtral", "qwen2moe", "qwen3moe", "qwen3fused"])
def test_round_trip_hf_checkpoints(hf, tmp_path, name):
    src = hf[name]
    layout = layout_for(src)
    summary = export_checkpoint(src, layout, tmp_path / "out", CFG)
    assert summary.nbytes > 0
    report = verify_export(src, tmp_path / "out", progress=False)
    assert report.ok, report.errors
    _check_export_against_source(src, tmp_path / "out", layout)


def test_round_trip_fp8_with_scales_and_mtp(fp8_ckpt, tmp_path):
    layout = layout_for(fp8_ckpt)
    export_checkpoint(fp8_ckpt, layout, tmp_path / "out", CFG)
    assert verify_export(fp8_ckpt, tmp_path / "out", progress=False).ok
    _check_export_against_source(fp8_ckpt, tmp_path / "out", layout)
    ex = open_export(tmp_path / "out")
    shared = ex.shared_tensors()
    # the MTP layer past num_hidden_layers keeps its logical experts, unbalanced, in shared
    assert "model.layers.4.mlp.experts.7.up_proj.weight_scale_inv" in shared
    assert "model.layers.0.mlp.gate_proj.weight_scale_inv" in shared
    rank0 = ex.rank_tensors(0)
    scales = [k for k in rank0 if k.endswith("weight_scale_inv")]
    assert len(scales) == 3 * 3 * ex.slots_per_rank  # 3 layers x 3 projections x local slots
    assert rank0[scales[0]].dtype == torch.float32
    assert any(v.dtype == torch.float8_e4m3fn for v in rank0.values())
    # side files are copied unchanged
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["config.json", "tokenizer.json", EXPORT_INDEX, "layout.safetensors",
         "expert_location.json", "shared-00001-of-00001.safetensors"]
        + [f"experts-rank{r:05d}-00001-of-00001.safetensors" for r in range(4)]
    )  # fmt: skip


def _check_export_against_source(src, out, layout):
    """Every slot holds its logical expert's exact tensors; shared tensors are unchanged."""
    source = source_tensors(src)
    ex = open_export(out)
    table = find_experts(Checkpoint.open(src))
    assert ex.layout.equals(layout) and ex.ep_size == 4
    assert ex.slots_per_rank * 4 == layout.num_slots
    for rank in range(ex.ep_size):
        local = ex.rank_state_dict(rank)
        experts = ex.rank_experts(rank)  # [MoE layers, S]
        for i, layer in enumerate(table.layers):
            head = table.heads[layer]
            for j, expert in enumerate(experts[i].tolist()):
                assert expert == int(layout.phy2log[i, rank * ex.slots_per_rank + j])
                if layer in table.fused:
                    for tail in table.fused[layer]:
                        want = source[f"{head}.{tail}"][expert]
                        assert torch.equal(local[f"{head}.{tail}"][j], want)
                    continue
                for tail in table.per_expert[layer][expert]:
                    got = local[f"{head}.{j}.{tail}"]
                    want = source[f"{head}.{expert}.{tail}"]
                    assert got.dtype == want.dtype
                    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    shared = ex.shared_tensors()
    assert set(shared) == set(source) - table.names()
    for k, v in shared.items():
        assert torch.equal(v.view(torch.uint8), source[k].view(torch.uint8))
    rebuilt = ex.original_state_dict()
    assert set(rebuilt) == set(source)
    for k, v in rebuilt.items():
        assert torch.equal(v.view(torch.uint8), source[k].view(torch.uint8)), k
    # SGLang's form: one row per hidden layer
    with open(os.path.join(out, "expert_location.json")) as f:
        sgl = torch.tensor(json.load(f)["physical_to_logical_map"])
    num_hidden = Checkpoint.open(src).text_config["num_hidden_layers"]
    assert sgl.shape == (num_hidden, layout.num_slots)
    assert torch.equal(sgl[table.layers], layout.phy2log)


@pytest.mark.parametrize("name", ["dsv3", "mixtral"])
def test_export_loads_back_into_transformers_with_identical_tokens(hf, tmp_path, name):
    """The export rebuilt through the reader is the same model: greedy tokens and logits
    match; rebuilding with the slots' experts mislabelled (a negative control) does not."""
    transformers = pytest.importorskip("transformers")
    src = hf[name]
    export_checkpoint(src, layout_for(src), tmp_path / "out", CFG)
    state = open_export(tmp_path / "out").original_state_dict()
    table = find_experts(Checkpoint.open(src))
    head = table.heads[table.layers[-1]]
    wrong = dict(state)  # experts of the last MoE layer rotated by one
    for e in range(table.num_experts):
        for tail in table.per_expert[table.layers[-1]][e]:
            wrong[f"{head}.{e}.{tail}"] = state[f"{head}.{(e + 1) % table.num_experts}.{tail}"]
    prompt = torch.tensor([[1, 5, 9, 14, 3, 22]])
    results = []
    for label, tensors in (("source", None), ("rebuilt", state), ("wrong", wrong)):
        folder = src
        if tensors is not None:
            folder = tmp_path / label
            folder.mkdir()
            save_file(tensors, folder / "model.safetensors")
            shutil.copy(tmp_path / "out" / "config.json", folder / "config.json")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(prompt).logits
            tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
        results.append((logits, tokens))
    (src_logits, src_tokens), (logits, tokens), (bad_logits, _) = results
    assert torch.equal(tokens, src_tokens)
    assert torch.equal(logits, src_logits)
    assert not torch.equal(bad_logits, src_logits)


def test_rank_reads_only_its_own_files(fp8_ckpt, tmp_path, monkeypatch):
    export_checkpoint(fp8_ckpt, layout_for(fp8_ckpt), tmp_path / "out", CFG)
    ex = open_export(tmp_path / "out")
    opened = []
    real = safe_open

    def spy(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr("safetensors.safe_open", spy)
    tensors = ex.rank_tensors(2)
    assert opened == ["experts-rank00002-00001-of-00001.safetensors"]
    assert all(".experts." in k for k in tensors)
    slots = {int(k.split(".experts.")[1].split(".")[0]) for k in tensors}
    assert slots == set(ex.local_slots(2))
    opened.clear()
    ex.state_dict(1)
    assert sorted(opened) == [
        "experts-rank00001-00001-of-00001.safetensors",
        "shared-00001-of-00001.safetensors",
    ]
    with pytest.raises(ValueError, match="rank must be in"):
        ex.rank_tensors(4)


@pytest.mark.parametrize("mode", ["auto", "read", "safe_open"])
def test_copy_modes_write_identical_files(fp8_ckpt, tmp_path, mode):
    layout = layout_for(fp8_ckpt)
    export_checkpoint(fp8_ckpt, layout, tmp_path / "ref", CFG)
    cfg = ExportConfig(progress=False, copy_mode=mode, chunk_bytes=1000)  # many chunks/tensor
    export_checkpoint(fp8_ckpt, layout, tmp_path / "out", cfg)
    a, b = snapshot(tmp_path / "ref"), snapshot(tmp_path / "out")
    # safetensors orders metadata keys at random: compare the layout file by content
    a.pop("layout.safetensors"), b.pop("layout.safetensors")
    assert a == b and len(a) == 10  # 9 files and "."
    assert open_export(tmp_path / "out").layout.equals(layout)


def test_whole_page_tensors_start_page_aligned(tmp_path):
    src = write_fp8_deepseek(tmp_path / "src", hidden=256, inter=256)  # 64 KiB fp8 weights
    export_checkpoint(src, layout_for(src), tmp_path / "out", CFG)
    ex = open_export(tmp_path / "out")
    for path in ex.rank_files(1) + ex.shared_files():
        infos = read_header(path)[0].values()
        big = [t for t in infos if t.nbytes % 4096 == 0]
        assert big and all(t.start % 4096 == 0 for t in big)
    assert verify_export(src, tmp_path / "out", progress=False).ok


def test_shards_split_by_size_and_sglang_layout_rows(fp8_ckpt, tmp_path):
    table = find_experts(Checkpoint.open(fp8_ckpt))
    # SGLang's form: one row per hidden layer (dense layer 0 included)
    layout = make_layout(4, table.num_experts, seed=3)
    cfg = ExportConfig(progress=False, max_shard_bytes=20_000)
    export_checkpoint(fp8_ckpt, layout, tmp_path / "out", cfg)
    ex = open_export(tmp_path / "out")
    assert ex.layout_rows == {1: 1, 2: 2, 3: 3}
    assert all(len(ex.rank_files(r)) > 1 for r in range(4))
    assert len(ex.shared_files()) > 1
    for path in ex.rank_files(0) + ex.shared_files():
        sizes = [t.nbytes for t in read_header(path)[0].values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    assert verify_export(fp8_ckpt, tmp_path / "out", progress=False).ok
    _, experts = ex.rank_experts(3).shape, ex.rank_experts(3)
    assert torch.equal(experts, layout.phy2log[1:, 9:12])


def test_memory_stays_bounded(tmp_path):
    """Python-side peak memory does not grow with the checkpoint (read mode, 64 KiB chunks)."""
    src = write_fp8_deepseek(tmp_path / "big", hidden=256, inter=256)
    layout = layout_for(src)
    cfg = ExportConfig(progress=False, copy_mode="read", chunk_bytes=64 * 1024, fsync=False)
    plan_bytes = plan_export(Checkpoint.open(src), layout, cfg).nbytes
    tracemalloc.start()
    try:
        export_checkpoint(src, layout, tmp_path / "out", cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan_bytes > 6 * 2**20
    assert peak < 1.5 * 2**20, peak  # one 64 KiB buffer + headers and index, not the 6+ MiB


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_export_folder_and_files_follow_the_umask(fp8_ckpt, tmp_path, mask):
    layout = layout_for(fp8_ckpt)
    old = os.umask(mask)
    try:
        export_checkpoint(fp8_ckpt, layout, tmp_path / "out", CFG)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    names = sorted(os.listdir(out))
    assert {"layout.safetensors", "expert_location.json", EXPORT_INDEX} <= set(names)
    assert any(n.startswith("experts-rank") for n in names) and "config.json" in names
    modes = {n: stat.S_IMODE((out / n).stat().st_mode) for n in names}
    assert modes == {n: 0o666 & ~mask for n in names}


# ------------------------------------------------------------------ interruption
def _cli_export(src, layout_path, out, *extra, **popen):
    cmd = [sys.executable, "-m", "eplb_plugin.cli.main", "export", "--checkpoint", str(src),
           "--layout", str(layout_path), "--out", str(out), "--no-progress", *extra]  # fmt: skip
    # not from the repository root: `-m` puts the working directory on sys.path, where our
    # kernels/ folder would shadow Hugging Face's `kernels` package that transformers imports
    popen.setdefault("cwd", out.parent)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _wait_for_partial_data(parent, deadline_s=60):
    """Block until a temp export folder holds a rank file with data past its header."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for name in os.listdir(parent):
            if ".eplb-partial-" in name:
                folder = os.path.join(parent, name)
                try:
                    files = os.listdir(folder)
                    if any(f.startswith("experts-rank") and os.path.getsize(
                            os.path.join(folder, f)) > 50_000 for f in files):  # fmt: skip
                        return folder
                except FileNotFoundError:
                    pass
        time.sleep(0.02)
    raise AssertionError("the export never started writing")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_export_leaves_nothing_visible_and_reruns(tmp_path, sig):
    src = write_fp8_deepseek(tmp_path / "src", hidden=256, inter=256)
    layout = layout_for(src)
    layout.save(tmp_path / "layout.safetensors")
    parent = tmp_path / "exports"
    parent.mkdir()
    proc = _cli_export(src, tmp_path / "layout.safetensors", parent / "out", "--max-rate", "2MB")
    try:
        partial = _wait_for_partial_data(parent)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not (parent / "out").exists()
    assert [n for n in os.listdir(parent) if not n.startswith(".")] == []
    if sig == signal.SIGTERM:  # unwinds and removes its temp folder
        assert os.listdir(parent) == []
    else:  # SIGKILL cannot be caught: a hidden temp folder stays until the next run
        assert os.path.isdir(partial)
    export_checkpoint(src, layout, parent / "out", CFG)
    assert os.listdir(parent) == ["out"]
    assert verify_export(src, parent / "out", progress=False).ok


def test_ctrl_c_in_export_exits_130_in_one_line_and_leaves_nothing(tmp_path):
    src = write_fp8_deepseek(tmp_path / "src", hidden=256, inter=256)
    layout_for(src).save(tmp_path / "layout.safetensors")
    parent = tmp_path / "exports"
    parent.mkdir()
    # SIGINT as a terminal sends it (a runner started in the background may ignore SIGINT,
    # which the child would inherit and Python would keep)
    proc = _cli_export(
        src, tmp_path / "layout.safetensors", parent / "out", "--max-rate", "2MB",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        _wait_for_partial_data(parent)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err.decode() == "eplb export: interrupted\n"
    assert os.listdir(parent) == []  # no output and no hidden partial folder


# ------------------------------------------------------------------ bad input
def _expect_refusal(src, layout, out, message, config=CFG):
    parent = os.path.dirname(os.path.abspath(out))
    before, src_before = snapshot(parent), snapshot(src)
    with pytest.raises(ValueError, match=message):
        export_checkpoint(src, layout, out, config)
    assert snapshot(parent) == before and snapshot(src) == src_before


def test_missing_expert_tensor(fp8_ckpt, tmp_path):
    path = os.path.join(fp8_ckpt, "model-00004-of-00006.safetensors")  # layer 2
    tensors = load_file(path)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, path)
    with open(os.path.join(fp8_ckpt, "model.safetensors.index.json")) as f:
        index = json.load(f)
    del index["weight_map"]["model.layers.2.mlp.experts.5.up_proj.weight"]
    with open(os.path.join(fp8_ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    layout = make_layout(3, 8)
    message = r"missing expert tensor model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"
    _expect_refusal(fp8_ckpt, layout, tmp_path / "out", message)


def test_expert_count_disagrees_with_layout(fp8_ckpt, tmp_path):
    _expect_refusal(fp8_ckpt, make_layout(3, 16), tmp_path / "out",
                    "layout has 16 experts per layer but checkpoint .* has 8")  # fmt: skip


def test_layer_count_disagrees_with_layout(fp8_ckpt, tmp_path):
    _expect_refusal(fp8_ckpt, make_layout(5, 8), tmp_path / "out",
                    "layout has 5 layers but the checkpoint has 3 MoE layers")  # fmt: skip


def test_ep_size_disagrees_with_layout(fp8_ckpt, tmp_path):
    _expect_refusal(fp8_ckpt, make_layout(3, 8), tmp_path / "out", "ep_size=2 disagrees",
                    ExportConfig(progress=False, ep_size=2))  # fmt: skip


def test_truncated_safetensors_file(fp8_ckpt, tmp_path):
    path = os.path.join(fp8_ckpt, "model-00003-of-00006.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    _expect_refusal(fp8_ckpt, make_layout(3, 8), tmp_path / "out",
                    "model-00003-of-00006.safetensors' is truncated")  # fmt: skip


def test_corrupt_safetensors_header(fp8_ckpt, tmp_path):
    path = os.path.join(fp8_ckpt, "model-00002-of-00006.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    _expect_refusal(fp8_ckpt, make_layout(3, 8), tmp_path / "out", "header is not JSON")


def test_moe_layer_without_any_expert_tensor(fp8_ckpt, tmp_path):
    # config.json makes layers 1..3 MoE layers; layer 2's experts are all gone (a 2-layer
    # layout would otherwise be taken for a shorter model and the export would succeed)
    path = os.path.join(fp8_ckpt, "model-00004-of-00006.safetensors")  # layer 2
    tensors = {k: v for k, v in load_file(path).items() if ".mlp.experts." not in k}
    save_file(tensors, path)
    with open(os.path.join(fp8_ckpt, "model.safetensors.index.json")) as f:
        index = json.load(f)
    index["weight_map"] = {
        k: v
        for k, v in index["weight_map"].items()
        if not k.startswith("model.layers.2.mlp.experts.")
    }
    with open(os.path.join(fp8_ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    message = r"MoE layers \[2\] have no expert tensors \('model\.layers\.2\.mlp\.experts\.\*'\)"
    _expect_refusal(fp8_ckpt, make_layout(2, 8), tmp_path / "out", message)


def test_index_names_a_missing_shard(fp8_ckpt, tmp_path):
    os.remove(os.path.join(fp8_ckpt, "model-00006-of-00006.safetensors"))
    _expect_refusal(fp8_ckpt, make_layout(3, 8), tmp_path / "out",
                    "names 'model-00006-of-00006.safetensors', which does not exist")  # fmt: skip


def test_config_expert_count_disagrees(fp8_ckpt, tmp_path):
    path = os.path.join(fp8_ckpt, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["n_routed_experts"] = 16
    with open(path, "w") as f:
        json.dump(config, f)
    _expect_refusal(fp8_ckpt, make_layout(3, 8), tmp_path / "out",
                    "config.json says n_routed_experts=16")  # fmt: skip


def test_output_directory_that_exists(fp8_ckpt, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _expect_refusal(fp8_ckpt, make_layout(3, 8), tmp_path / "out", "already exists")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .safetensors files"):
        export_checkpoint(tmp_path / "empty", make_layout(3, 8), tmp_path / "out", CFG)
    with pytest.raises(ValueError, match="is not a directory"):
        export_checkpoint(tmp_path / "nope", make_layout(3, 8), tmp_path / "out", CFG)
    assert not (tmp_path / "out").exists()


def test_header_checks(tmp_path):
    save_file({"a": torch.zeros(4, 4)}, tmp_path / "a.safetensors")
    assert set(read_header(str(tmp_path / "a.safetensors"))[0]) == {"a"}
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data + b"extra")
    with pytest.raises(ValueError, match="longer than its header says"):
        read_header(str(tmp_path / "b.safetensors"))
    (tmp_path / "c.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match="shorter than the 8-byte"):
        read_header(str(tmp_path / "c.safetensors"))
    (tmp_path / "d.safetensors").write_bytes((10**12).to_bytes(8, "little") + data[8:])
    with pytest.raises(ValueError, match="does not fit"):
        read_header(str(tmp_path / "d.safetensors"))


def test_config_validation():
    with pytest.raises(ValueError, match="copy_mode"):
        ExportConfig(copy_mode="mmap")
    with pytest.raises(ValueError, match="max_shard_bytes"):
        ExportConfig(max_shard_bytes=0)
    with pytest.raises(ValueError, match="ep_size"):
        ExportConfig(ep_size=0)
    with pytest.raises(ValueError, match="max_bytes_per_s"):
        ExportConfig(max_bytes_per_s=-1.0)


# ------------------------------------------------------------------ verify
@pytest.fixture
def exported(fp8_ckpt, tmp_path):
    export_checkpoint(fp8_ckpt, layout_for(fp8_ckpt), tmp_path / "out", CFG)
    return fp8_ckpt, tmp_path / "out"


def test_verify_detects_a_changed_byte(exported):
    src, out = exported
    path = out / "experts-rank00001-00001-of-00001.safetensors"
    tensors, _ = read_header(str(path))
    victim = next(t for t in tensors.values() if t.name.endswith("down_proj.weight"))
    with open(path, "r+b") as f:
        f.seek(victim.start + 3)
        byte = f.read(1)
        f.seek(victim.start + 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = verify_export(src, out, progress=False)
    assert not report.ok
    assert len(report.errors) == 1 and victim.name in report.errors[0]
    assert "differs from its source" in report.errors[0]


def test_verify_detects_tampering_outside_the_slot_tensors(exported):
    src, out = exported
    assert verify_export(src, out, progress=False).ok
    sglang = json.loads((out / "expert_location.json").read_text())
    row = next(i for i, r in enumerate(sglang["physical_to_logical_map"]) if r != sorted(r))
    sglang["physical_to_logical_map"][row].reverse()
    (out / "expert_location.json").write_text(json.dumps(sglang))
    index = json.loads((out / "eplb_export.json").read_text())
    entry = next(e for e in index["tensors"] if e.get("experts"))
    entry["experts"] = [0] * len(entry["experts"])
    (out / "eplb_export.json").write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    config["hidden_size"] += 1
    (out / "config.json").write_text(json.dumps(config))
    errors = verify_export(src, out, progress=False).errors
    assert any("expert_location.json disagrees with layout.safetensors" in e for e in errors)
    assert any(f"index entry of {entry['name']}" in e and "wrong experts" in e for e in errors)
    assert any("side file config.json differs" in e for e in errors)


def test_verify_detects_missing_file_and_foreign_layout(exported, tmp_path):
    src, out = exported
    os.remove(out / "experts-rank00003-00001-of-00001.safetensors")
    report = verify_export(src, out, progress=False)
    assert any(
        "experts-rank00003-00001-of-00001.safetensors is missing" in e for e in report.errors
    )
    assert any("is missing from rank 3" in e for e in report.errors)
    shutil.rmtree(out)
    export_checkpoint(src, layout_for(src), out, CFG)
    make_layout(3, 8, seed=5).save(out / "layout.safetensors")  # another layout, same shape
    report = verify_export(src, out, progress=False)
    assert not report.ok and any("differs from its source" in e for e in report.errors)


def test_verify_flags_an_absent_logical_expert(fp8_ckpt, tmp_path):
    # experts 0-3 replicated on slots 8-11; expert 7 lives only on slot 7 (rank 2)
    row = torch.tensor(list(range(8)) + [0, 1, 2, 3])
    layout = ExpertLayout.from_phy2log(row.expand(3, -1), Topology(12, 1, 1, 4), 8)
    export_checkpoint(fp8_ckpt, layout, tmp_path / "out", CFG)
    path = tmp_path / "out" / "experts-rank00002-00001-of-00001.safetensors"
    tensors = load_file(path)
    gone = [k for k in tensors if k.startswith("model.layers.2.mlp.experts.7.")]
    assert len(gone) == 6  # 3 weights + 3 scales
    save_file({k: v for k, v in tensors.items() if k not in gone}, path)
    report = verify_export(fp8_ckpt, tmp_path / "out", progress=False)
    assert "layer 2: logical experts [7] are absent from the export" in report.errors
    assert sum("is missing from rank 2" in e for e in report.errors) == 6
    assert len(report.errors) == 7


def test_cli_export_from_sglang_dump_then_verify(fp8_ckpt, tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    # SGLang counts every hidden layer (dense layer 0 stays zero)
    count = torch.randint(0, 100, (10, 4, 8), generator=g, dtype=torch.int32)
    count[:, 0] = 0
    write_sglang_dump(tmp_path / "dump.pt", count)
    rc = main(["export", "--checkpoint", fp8_ckpt, "--load", str(tmp_path / "dump.pt"),
               "--replicas", "12", "--gpus", "4", "--out", str(tmp_path / "out"),
               "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "exported" in capsys.readouterr().out
    assert main(["verify", "--checkpoint", fp8_ckpt, "--export", str(tmp_path / "out"),
                 "--no-progress"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("OK")
    # the SGLang layout written by the export goes straight back in, with --ep-size
    rc = main(["export", "--checkpoint", fp8_ckpt, "--layout",
               str(tmp_path / "out" / "expert_location.json"), "--ep-size", "4",
               "--out", str(tmp_path / "out2"), "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    a = open_export(tmp_path / "out").rank_tensors(1)
    b = open_export(tmp_path / "out2").rank_tensors(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8),
                                                    b[k].view(torch.uint8)) for k in a)  # fmt: skip


def test_cli_errors(fp8_ckpt, tmp_path, capsys):
    layout = make_layout(3, 8)
    write_sglang_layout(tmp_path / "loc.json", layout)
    rc = main(["export", "--checkpoint", fp8_ckpt, "--layout", str(tmp_path / "loc.json"),
               "--ep-size", "5", "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2 and "not divisible by ep_size=5" in capsys.readouterr().err
    rc = main(["export", "--checkpoint", fp8_ckpt, "--load", str(tmp_path / "loc.json"),
               "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2 and "--replicas" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    export_checkpoint(fp8_ckpt, layout, tmp_path / "out", CFG)
    os.remove(tmp_path / "out" / "experts-rank00002-00001-of-00001.safetensors")
    capsys.readouterr()
    rc = main(["verify", "--checkpoint", fp8_ckpt, "--export", str(tmp_path / "out"), "--json",
               "--no-progress"])  # fmt: skip
    assert rc == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["errors"]
