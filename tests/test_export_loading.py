"""Loading an ``eplb export`` folder: the transformers integration and the reference engine
(``eplb demo --model EXPORT``) read only their rank's expert files and give the tokens of the
original checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from eplb_plugin.checkpoint import Checkpoint, find_experts  # noqa: E402
from eplb_plugin.cli.main import main  # noqa: E402
from eplb_plugin.config import EplbConfig  # noqa: E402
from eplb_plugin.export import ExportConfig, export_checkpoint, open_export  # noqa: E402
from eplb_plugin.integrations.transformers import apply_eplb  # noqa: E402
from eplb_plugin.integrations.transformers import engine as engine_mod  # noqa: E402
from eplb_plugin.integrations.transformers.engine import (  # noqa: E402
    EngineSpec,
    RunSpec,
    greedy_decode,
    load_model,
    run_engine,
)
from eplb_plugin.integrations.transformers.loading import (  # noqa: E402
    check_export,
    load_export_model,
)
from eplb_plugin.integrations.transformers.models import FAMILIES, moe_layers  # noqa: E402
from eplb_plugin.integrations.transformers.tiny import save_tiny_model  # noqa: E402
from eplb_plugin.layout import ExpertLayout, Topology  # noqa: E402
from eplb_plugin.policies import plan  # noqa: E402
from eplb_plugin.traces import write_load  # noqa: E402

RANKS = 2
EXTRA = 4  # redundant slots: the layouts replicate hot experts
TIMEOUT = 240
OFF = EplbConfig(enable=False)


def skewed_load(num_layers: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """[L, E] float32 load with a few hot experts (so the planned layout has replicas)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_layers, num_experts, generator=gen) ** 4 * 1000


def rank_files(export_dir, rank: int) -> list[str]:
    return sorted(os.path.basename(p) for p in open_export(export_dir).rank_files(rank))


def shared_files(export_dir) -> list[str]:
    return sorted(os.path.basename(p) for p in open_export(export_dir).shared_files())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, export): a tiny DeepSeek-V3 written by save_pretrained and exported by
    ``eplb export`` from a load file: 16 experts + 4 replicas over 2 ranks."""
    root = tmp_path_factory.mktemp("dsv3")
    src = save_tiny_model("deepseek_v3", str(root / "src"), seed=5)
    table = find_experts(Checkpoint.open(src))
    write_load(str(root / "load.npy"), skewed_load(len(table.layers), table.num_experts))
    out = str(root / "export")
    code = main(["export", "--checkpoint", src, "--load", str(root / "load.npy"),
                 "--replicas", str(table.num_experts + EXTRA), "--gpus", str(RANKS),
                 "--out", out, "--no-progress"])  # fmt: skip
    assert code == 0
    return src, out


@pytest.fixture
def no_processes(monkeypatch):
    def refuse(mp):
        raise AssertionError("a process was about to start")

    monkeypatch.setattr(engine_mod, "_context", refuse)


def prompts(num: int = 4, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 128, (num, length), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ one rank, one process
@pytest.mark.parametrize(
    "family,variant",
    [("deepseek_v3", ""), ("mixtral", ""), ("qwen2_moe", ""), ("qwen3_moe", "tied"),
     ("qwen3_moe", "fused")],
)  # fmt: skip
def test_rank_model_holds_exactly_its_slots(family, variant, tmp_path, monkeypatch):
    """Every weight and buffer of a rank loaded from the export equals from_pretrained's
    (experts: the rank's slots of the layout, replicas included); the rank opens the shared
    files and its own expert files, nothing else, and its record says so."""
    import safetensors

    overrides = {"tie_word_embeddings": True} if variant == "tied" else {}
    src = save_tiny_model(family, str(tmp_path / "src"), seed=3, **overrides)
    reference = load_model(src)
    if variant == "fused":  # experts.gate_up_proj [E, 2I, H] on disk
        src = str(tmp_path / "fused")
        reference.save_pretrained(src, save_original_format=False)
    table = find_experts(Checkpoint.open(src))
    num_experts = table.num_experts
    layout = plan(
        skewed_load(len(table.layers), num_experts), Topology(num_experts + EXTRA, 1, 1, RANKS)
    )
    assert int(layout.logcnt.max()) > 1  # replicas exist
    out = tmp_path / "export"
    export_checkpoint(src, layout, out, ExportConfig(progress=False))
    want = reference.state_dict()
    buffers = dict(reference.named_buffers())
    fam = FAMILIES[family]
    moe_row = {layer: row for row, (layer, _) in enumerate(moe_layers(reference, fam))}
    slots = layout.num_slots // RANKS
    real = safetensors.safe_open
    opened = []

    def spy(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    for rank in range(RANKS):
        opened.clear()
        monkeypatch.setattr(safetensors, "safe_open", spy)
        model = load_export_model(out, rank)
        monkeypatch.setattr(safetensors, "safe_open", real)
        weights = [name for name in opened if name != "layout.safetensors"]
        assert sorted(weights) == sorted(rank_files(out, rank) + shared_files(out))
        assert model.eplb_export.files_read == weights
        assert model.eplb_export.layout.equals(layout)
        held = layout.phy2log[:, rank * slots : (rank + 1) * slots]
        got = model.state_dict()
        assert set(got) == set(want)
        for name, tensor in got.items():
            expected = want[name]
            if name.rsplit(".", 1)[-1] in fam.expert_params:
                layer = int(name.split(".layers.")[1].split(".")[0])
                expected = expected[held[moe_row[layer]]]
                assert tensor.shape[0] == slots
            assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, buffers[name]), name
        if variant == "tied":
            assert model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------------ engine, 2 ranks
def test_engine_on_export_generates_the_checkpoints_tokens(exported):
    """The same launch from the checkpoint (sharded by the export's layout) and from the
    export: identical tokens and bit-identical logits; with EPLB on, rebalancing from the
    loaded slots, identical tokens again; each rank read only its own expert files."""
    src, out = exported
    layout = open_export(out).moe_layout()
    toks, steps = prompts(), 6
    on = EplbConfig(num_redundant_experts=EXTRA, window=2, interval=2, plan_delay=0,
                    min_gain=0.0)  # fmt: skip
    common = dict(ranks=RANKS, prompts=toks, steps=steps, timeout_s=TIMEOUT, kernels="torch")
    sharded = [RunSpec("static", OFF, record_logits=True, layout=layout)]
    (from_checkpoint,) = run_engine(EngineSpec(src, runs=sharded, **common), progress=False)
    runs = [RunSpec("static", OFF, record_logits=True), RunSpec("eplb on", on)]
    static, rebalanced = run_engine(EngineSpec(out, runs=runs, **common), progress=False)
    assert torch.equal(static.tokens, from_checkpoint.tokens)
    assert torch.equal(static.logits, from_checkpoint.logits)
    assert torch.equal(rebalanced.tokens, from_checkpoint.tokens)
    assert rebalanced.stats["rebalances"] >= 1 and rebalanced.stats["slots_moved"] > 0
    assert torch.equal(static.layouts[0], layout.phy2log)
    # and the unsharded original model in one process
    tokens, logits = greedy_decode(load_model(src), toks, steps, record_logits=True)
    assert torch.equal(static.tokens, tokens)
    assert torch.allclose(static.logits, logits, atol=1e-5, rtol=0)
    assert from_checkpoint.files_read is None
    for result in (static, rebalanced):
        for rank, files in enumerate(result.files_read):
            assert sorted(files) == sorted(rank_files(out, rank) + shared_files(out))


def test_demo_on_an_export(exported, capsys, monkeypatch):
    """``eplb demo --model EXPORT``: ranks default to the export's EP size, the slots and
    topology come from the export, tokens are identical with EPLB on and off."""
    monkeypatch.setenv("EPLB_KERNELS", "torch")
    _, out = exported
    code = main(["demo", "--model", out, "--steps", "5", "--prompts", "4", "--prompt-len", "4",
                 "--no-report", "--json", "--eplb-window", "2", "--eplb-interval", "2",
                 "--eplb-plan-delay", "0"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["tokens_identical"] is True
    assert summary["ranks"] == RANKS and summary["family"] == "deepseek_v3"
    assert summary["eplb"]["num_redundant_experts"] == EXTRA
    assert summary["export"]["ep_size"] == RANKS
    for rank, files in enumerate(summary["export"]["files_read"]):
        assert sorted(files) == sorted(rank_files(out, rank) + shared_files(out))


# ------------------------------------------------------------------ bad input
def test_ep_size_mismatch_fails_before_any_process(exported, no_processes, capsys):
    _, out = exported
    spec = EngineSpec(out, ranks=4, prompts=prompts(), steps=2, runs=[RunSpec("x", OFF)])
    with pytest.raises(ValueError, match="EP size 4 disagrees with export .* ep_size=2"):
        run_engine(spec, progress=False)
    assert main(["demo", "--model", out, "--ranks", "4", "--no-report"]) == 2
    captured = capsys.readouterr()
    assert "EP size 4 disagrees with export" in captured.err
    assert "ranks;" not in captured.out


def test_missing_or_truncated_rank_file_fails_before_any_process(
    exported, tmp_path, no_processes, capsys
):
    _, out = exported
    broken = tmp_path / "export"
    shutil.copytree(out, broken)
    (victim,) = rank_files(broken, 1)
    os.remove(broken / victim)
    spec = EngineSpec(str(broken), ranks=RANKS, prompts=prompts(), steps=2,
                      runs=[RunSpec("x", OFF)])  # fmt: skip
    with pytest.raises(ValueError, match=f"rank 1's file {victim} is missing"):
        run_engine(spec, progress=False)
    assert main(["demo", "--model", str(broken), "--no-report"]) == 2
    assert f"rank 1's file {victim} is missing" in capsys.readouterr().err
    shutil.copy(os.path.join(out, victim), broken / victim)
    with open(broken / victim, "r+b") as f:
        f.truncate(os.path.getsize(broken / victim) - 100)
    with pytest.raises(ValueError, match="truncated"):
        run_engine(spec, progress=False)


def test_run_that_disagrees_with_the_export_fails_before_any_process(exported, no_processes):
    _, out = exported
    layout = open_export(out).moe_layout()
    base = dict(ranks=RANKS, prompts=prompts(), steps=2)
    wrong_slots = EplbConfig(num_redundant_experts=EXTRA + 2)
    with pytest.raises(ValueError, match=r"num_redundant_experts=6.*disagree with export"):
        run_engine(EngineSpec(out, runs=[RunSpec("on", wrong_slots)], **base), progress=False)
    other = ExpertLayout.from_phy2log(layout.phy2log.flip(1), layout.topology, 16)
    with pytest.raises(ValueError, match="a layout other than export"):
        run_engine(EngineSpec(out, runs=[RunSpec("x", OFF, layout=other)], **base), progress=False)


def test_apply_eplb_on_a_loaded_rank_checks_the_run(exported):
    _, out = exported
    model = load_export_model(out, 1)
    with pytest.raises(ValueError, match="EP size 1 disagrees with export"):
        apply_eplb(model, OFF, rank=0, world_size=1)
    with pytest.raises(ValueError, match="rank 0 was given a model loaded for rank 1"):
        apply_eplb(model, OFF, rank=0, world_size=RANKS)
    other = open_export(out).moe_layout()
    other = ExpertLayout.from_phy2log(other.phy2log.flip(1), other.topology, 16)
    with pytest.raises(ValueError, match="another initial layout"):
        apply_eplb(model, OFF, rank=1, world_size=RANKS, layout=other)
    with pytest.raises(ValueError, match="rank must be in"):
        load_export_model(out, RANKS)
    family, config, export = check_export(out)
    assert family.name == "deepseek_v3" and export.ep_size == RANKS
