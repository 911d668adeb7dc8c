"""Recording a live balancer's load window (eplb_plugin.record): periodic, atomic, readable by
`eplb export --load`, summed over ranks, in the plugin's and SGLang's forms."""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_ranks
from test_executor import make_tensors

from eplb_plugin.balancer import Balancer
from eplb_plugin.config import EplbConfig
from eplb_plugin.formats import read_sglang_dump
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.record import EPLB_FILE, LoadWindowWriter
from eplb_plugin.recorder import LoadRecorder
from eplb_plugin.traces import read_load

L, E, P = 2, 4, 6


def _recorder(window: int = 3) -> LoadRecorder:
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 1]] * L)
    return LoadRecorder(L, P, E, window, phy2log)


def _step(rec: LoadRecorder, step: int) -> None:
    rec.counts.copy_(torch.arange(L * P, dtype=torch.int32).view(L, P) * step)
    rec.record()


def test_writes_every_interval_atomically_in_the_load_trace_format(tmp_path):
    rec = _recorder(window=3)
    writer = LoadWindowWriter(rec, tmp_path / "rec", interval=2)
    wrote = []
    for step in range(1, 6):
        _step(rec, step)
        wrote.append(writer.maybe_write(step))
        if wrote[-1]:
            expected = rec.logical_window()
    writer.flush()
    assert wrote == [False, True, False, True, False]
    path = tmp_path / "rec" / EPLB_FILE
    assert writer.written == [str(path)] * 2
    load = read_load(path)  # what `eplb export --load` reads
    assert load.shape == (3, L, E)
    assert torch.equal(load, expected)  # steps 2..4, slots folded onto experts
    # slots 4 and 5 hold replicas of experts 0 and 1: their counts add up on the expert
    assert load[0, 0].tolist() == [2 * (0 + 4), 2 * (1 + 5), 2 * 2, 2 * 3]
    assert [f for f in os.listdir(tmp_path / "rec") if f.startswith(".")] == []


def test_sglang_dumps_one_file_per_write_with_model_layers(tmp_path):
    rec = _recorder(window=2)
    writer = LoadWindowWriter(rec, tmp_path, interval=2, fmt="sglang")
    writer.layer_ids, writer.num_layers = [1, 3], 4  # layers 0 and 2 are dense
    for step in range(1, 5):
        _step(rec, step)
        writer.maybe_write(step)
    writer.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["expert_distribution_recorder_000000000002.pt",
                     "expert_distribution_recorder_000000000004.pt"]  # fmt: skip
    dump = torch.load(tmp_path / names[1], weights_only=True)
    assert dump["rank"] == 0 and dump["logical_count"].shape == (2, 4, E)
    assert dump["logical_count"][:, [0, 2]].abs().sum() == 0
    assert torch.equal(dump["logical_count"][:, [1, 3]].float(), rec.logical_window())
    both = read_sglang_dump(tmp_path)  # the folder is one load: windows in file-name order
    assert both.shape == (4, 4, E)


def test_a_failed_write_is_counted_and_serving_goes_on(tmp_path):
    rec = _recorder()
    writer = LoadWindowWriter(rec, tmp_path, interval=1)
    (tmp_path / EPLB_FILE).mkdir()  # a folder where the file should go: rename fails
    _step(rec, 1)
    assert writer.maybe_write(1)
    writer.flush()
    assert writer.failures == 1 and writer.written == []


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    rec = _recorder()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="record_dir"):
        LoadWindowWriter(rec, tmp_path / "file" / "sub", interval=1)
    with pytest.raises(ValueError, match="interval"):
        LoadWindowWriter(rec, tmp_path, interval=0)
    with pytest.raises(ValueError, match="record_format"):
        EplbConfig(record_dir=str(tmp_path), record_format="csv")
    with pytest.raises(ValueError, match="record_interval"):
        EplbConfig(record_interval=-1)
    assert LoadWindowWriter.from_config(EplbConfig(), rec) is None
    writer = LoadWindowWriter.from_config(EplbConfig(window=7, record_dir=str(tmp_path)), rec)
    assert writer.interval == 7  # record_interval 0: one write per window


def _balancer_records(rank: int, world_size: int, folder: str) -> torch.Tensor:
    topo = Topology(8, num_gpus=world_size)
    layout = ExpertLayout.identity(L, 6, topo)
    tensors = make_tensors(layout.phy2log, rank, topo.slots_per_gpu)
    config = EplbConfig(num_redundant_experts=2, window=4, interval=100, record_dir=folder,
                        record_interval=4, timeout_s=60)  # fmt: skip
    bal = Balancer(config, layout, tensors)
    for step in range(1, 5):
        ids = torch.tensor([[rank, 5], [step % 6, 0]])  # [tokens, top_k]
        for layer in range(L):
            bal.route(ids, layer)
        bal.step()
    bal.close()  # waits for the write
    return bal.recorder.logical_window()


def test_balancer_records_the_window_summed_over_ranks(tmp_path):
    windows = run_ranks(_balancer_records, 2, str(tmp_path), timeout=120,
                        env={"EPLB_KERNELS": "torch"})  # fmt: skip
    load = read_load(tmp_path / EPLB_FILE)
    assert load.shape == (4, L, 6)
    assert torch.equal(load, windows[0] + windows[1])
    # every routed (token, k) entry counted once: 2 ranks x 4 tokens-entries per step
    assert load.sum(-1).flatten().tolist() == [8.0] * (4 * L)


def test_initial_layout_from_an_export_folder_or_a_file(tmp_path):
    from eplb_plugin.record import check_initial_layout_path, read_initial_layout

    topo = Topology(P, num_gpus=2)
    phy2log = torch.tensor([[3, 0, 1, 2, 1, 0], [0, 1, 3, 2, 3, 3]])
    ExpertLayout.from_phy2log(phy2log, topo, E).save(tmp_path / "layout.safetensors")
    for path in (tmp_path, tmp_path / "layout.safetensors"):
        assert torch.equal(read_initial_layout(path, L, E, P, 2), phy2log)
    with pytest.raises(ValueError, match="num_redundant_experts must be 2"):
        read_initial_layout(tmp_path, L, E, E, 2)
    with pytest.raises(ValueError, match="ep_size=1"):
        read_initial_layout(tmp_path, L, E, P, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an `eplb export` folder"):
        read_initial_layout(tmp_path / "empty", L, E, P, 2)
    with pytest.raises(ValueError, match="does not exist"):
        check_initial_layout_path(str(tmp_path / "nope"))
    check_initial_layout_path("")


def test_sglang_runtime_records_dumps_with_a_row_per_hidden_layer(tmp_path):
    from eplb_plugin.integrations.sglang.runtime import SglangEplb

    # SGLang's map has a row per hidden layer; layer 0 is dense, layers 1 and 2 are MoE
    phy2log = (torch.arange(12) % 8).expand(3, -1).contiguous()
    config = EplbConfig(num_redundant_experts=4, window=2, interval=100, record_dir=str(tmp_path),
                        record_format="sglang")  # fmt: skip
    tensors = [[torch.zeros(12, 2)] for _ in range(2)]
    runtime = SglangEplb(config, phy2log, 8, [1, 2], tensors, 0, 1)
    for _ in range(2):
        runtime.begin_forward(2)
        runtime.count_select_experts(2, torch.tensor([[3, 11], [5, 5]]))  # physical ids
        runtime.end_forward()
        runtime.step()
    runtime.balancer.close()
    (name,) = os.listdir(tmp_path)
    count = torch.load(tmp_path / name, weights_only=True)["logical_count"]
    assert count.shape == (2, 3, 8)  # [steps, hidden layers, experts]
    assert count[:, :2].abs().sum() == 0  # the dense layer and the MoE layer with no tokens
    assert count[0, 2].tolist() == [0, 0, 0, 2, 0, 2, 0, 0]  # slot 11 holds expert 3
