"""Layout and statistics files through SGLang's own readers and writers (.venv-sglang)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

pytest.importorskip("sglang.srt.eplb")

from eplb_plugin import Topology  # noqa: E402
from eplb_plugin.cli.main import main as eplb_main  # noqa: E402
from eplb_plugin.formats import (  # noqa: E402
    read_sglang_dump,
    read_sglang_layout,
    sglang_phy2log,
    write_sglang_layout,
)
from eplb_plugin.policies import plan  # noqa: E402
from eplb_plugin.traces import read_load  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
# DeepSeek-V2-Lite: 27 layers, layer 0 dense; 26 MoE layers of 64 routed experts.
NUM_LAYERS, MOE_LAYERS, EXPERTS = 27, list(range(1, 27)), 64


@pytest.fixture(scope="module")
def layout():
    load = torch.from_numpy(np.load(ROOT / "examples" / "dsv2lite_intent_load.npy"))
    return plan(load.sum(0), Topology(80, 1, 1, 4), policy="deepseek")


@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_our_layout_file_is_read_by_sglang_init_expert_location(
    sglang_eplb, model, server_args, layout, tmp_path, suffix
):
    path = tmp_path / f"layout{suffix}"
    write_sglang_layout(path, layout, layer_ids=MOE_LAYERS, num_layers=NUM_LAYERS)
    model(NUM_LAYERS, EXPERTS)
    with server_args(ep_size=4, ep_num_redundant_experts=16, init_expert_location=str(path),
                     moe_a2a_backend="deepep", ep_dispatch_algorithm="static"):  # fmt: skip
        metadata = sglang_eplb.location.compute_initial_expert_location_metadata(None, 1)
    got = metadata.physical_to_logical_map_cpu
    assert got.shape == (NUM_LAYERS, 80)
    assert torch.equal(got[MOE_LAYERS], layout.phy2log)
    assert torch.equal(got[0], torch.arange(80) % EXPERTS)  # the dense layer: trivial row
    assert torch.equal(got, sglang_phy2log(layout, MOE_LAYERS, NUM_LAYERS))
    # SGLang's per-rank dispatch table (rank 1) picks, for each expert, one of its slots
    table = metadata.logical_to_rank_dispatch_physical_map
    rows = got.gather(1, table.cpu())
    assert torch.equal(rows, torch.arange(EXPERTS).expand(NUM_LAYERS, -1))
    # and the file reads back into the same layout (rows of the MoE layers)
    back = read_sglang_layout(path, ep_size=4, num_experts=EXPERTS)
    assert torch.equal(back.phy2log[MOE_LAYERS], layout.phy2log)


def _recorder(sglang_eplb, phy2log: torch.Tensor):
    location, distribution = sglang_eplb.location, sglang_eplb.distribution
    metadata = location.ExpertLocationMetadata.init_by_mapping(None, phy2log, moe_ep_rank=0)
    return distribution.ExpertDistributionRecorder.init_new(metadata, rank=0)


def _drive(recorder, passes):
    for pass_id, layers in enumerate(passes):
        with recorder.with_forward_pass(pass_id, None):
            for layer, topk_ids in enumerate(layers):
                with recorder.with_current_layer(layer):
                    recorder.on_select_experts(topk_ids=topk_ids)


def _passes(num_passes, num_layers, num_slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_passes):
        layers = []
        for _ in range(num_layers):
            ids = torch.randint(0, num_slots, (12, 3), generator=g)
            ids[-2:] = -1  # padded rows, as SGLang masks them
            layers.append(ids)
        out.append(layers)
    return out


def _logical(passes, phy2log, num_experts):
    count = torch.zeros(len(passes), phy2log.shape[0], num_experts, dtype=torch.int64)
    for step, layers in enumerate(passes):
        for layer, ids in enumerate(layers):
            ids = ids.reshape(-1)
            ids = ids[ids >= 0]
            count[step, layer].index_add_(0, phy2log[layer, ids], torch.ones_like(ids))
    return count


@pytest.fixture
def dump_dir(tmp_path, monkeypatch):
    folder = tmp_path / "dumps"
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(folder))
    return folder


def test_sglang_stat_dump_is_read_as_our_load_trace(
    sglang_eplb, model, server_args, dump_dir, capsys
):
    """SGLang's recorder writes the dump (stat mode, file output, as its
    /dump_expert_distribution_record endpoint does); eplb-plugin reads it."""
    num_layers, experts, slots = 3, 8, 12
    model(num_layers, experts)
    phy2log = torch.stack([torch.randperm(slots) % experts for _ in range(num_layers)])
    passes = [_passes(4, num_layers, slots, seed=1), _passes(2, num_layers, slots, seed=2)]
    with server_args(ep_size=2, ep_num_redundant_experts=4, moe_a2a_backend="deepep",
                     deepep_mode="normal", expert_distribution_recorder_mode="stat",
                     expert_distribution_recorder_buffer_size=-1):  # fmt: skip
        recorder = _recorder(sglang_eplb, phy2log)
        for chunk in passes:
            recorder.start_record()
            _drive(recorder, chunk)
            recorder.dump_record(output_mode="file")
    files = sorted(dump_dir.glob("*.pt"))
    assert len(files) == 2
    raw = torch.load(files[0], weights_only=True)
    assert sorted(raw) == ["average_utilization_rate_over_window", "logical_count", "rank"]
    first = read_sglang_dump(files[0])
    assert torch.equal(first, _logical(passes[0], phy2log, experts))
    both = read_sglang_dump(dump_dir)  # a folder of dumps, in file-name (time) order
    expected = torch.cat([_logical(p, phy2log, experts) for p in passes])
    assert torch.equal(both, expected)
    # the load reader of `eplb plan` takes the dump file as it is
    assert torch.equal(read_load(files[0]), first.to(torch.float32))
    assert eplb_main(["plan", "--load", str(files[0]), "--replicas", "12", "--gpus", "2"]) == 0
    assert "balancedness" in capsys.readouterr().out


def test_sglang_per_pass_dump_is_read_as_our_load_trace(sglang_eplb, model, server_args, dump_dir):
    num_layers, experts, slots = 2, 4, 6
    model(num_layers, experts)
    phy2log = torch.stack([torch.randperm(slots) % experts for _ in range(num_layers)])
    passes = _passes(3, num_layers, slots, seed=3)
    args = dict(moe_a2a_backend="deepep", deepep_mode="normal")
    with server_args(ep_size=2, ep_num_redundant_experts=2,
                     expert_distribution_recorder_mode="per_pass", **args):  # fmt: skip
        recorder = _recorder(sglang_eplb, phy2log)
        recorder.start_record()
        _drive(recorder, passes)
        recorder.dump_record(output_mode="file")
    (path,) = dump_dir.glob("*.pt")
    assert torch.equal(read_sglang_dump(path), _logical(passes, phy2log, experts))


def test_layout_whose_slots_do_not_divide_the_ep_size_is_refused(layout, tmp_path):
    path = tmp_path / "layout.json"
    write_sglang_layout(path, layout)
    with pytest.raises(ValueError, match="not divisible by ep_size=3"):
        read_sglang_layout(path, ep_size=3)
