"""SGLang / vLLM statistics and layout interop (eplb_plugin.formats, read_load, CLI)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb_plugin.cli.main import main
from eplb_plugin.formats import (
    SGLANG_LAYOUT_KEY,
    check_counts,
    physical_to_logical_count,
    read_layout,
    read_sglang_dump,
    read_sglang_layout,
    read_vllm_window,
    read_vllm_window_file,
    sglang_phy2log,
    write_sglang_dump,
    write_sglang_layout,
)
from eplb_plugin.layout import ExpertLayout, Topology
from eplb_plugin.policies import plan
from eplb_plugin.traces import read_load


def _stat_dump(path, count, rank=0, util=None):
    # exactly what SGLang's _StatAccumulator.dump writes with output_mode="file"
    torch.save(
        {"rank": rank, "logical_count": count, "average_utilization_rate_over_window": util},
        str(path),
    )


def _counts(steps=5, layers=3, experts=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (steps, layers, experts), generator=g, dtype=torch.int32)


def _layout(layers=3, experts=8, slots=12, gpus=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return plan(torch.rand(layers, experts, generator=g) * 100, Topology(slots, 1, 1, gpus))


# ------------------------------------------------------------------ statistics
def test_physical_to_logical_count_matches_a_loop():
    layout = _layout()
    g = torch.Generator().manual_seed(1)
    phys = torch.randint(0, 9, (4, 3, 12), generator=g)
    got = physical_to_logical_count(phys, layout.phy2log, layout.num_experts)
    want = torch.zeros(4, 3, 8, dtype=torch.int64)
    for w in range(4):
        for layer in range(3):
            for slot in range(12):
                want[w, layer, layout.phy2log[layer, slot]] += phys[w, layer, slot]
    assert torch.equal(got, want)
    assert torch.equal(got.sum(-1), phys.sum(-1))


def test_stat_dump_is_read_as_logical_counts(tmp_path):
    count = _counts()
    _stat_dump(tmp_path / "expert_distribution_recorder_1.pt", count, util=0.7)
    got = read_sglang_dump(tmp_path / "expert_distribution_recorder_1.pt")
    assert got.dtype == torch.int64 and torch.equal(got, count.long())
    # read_load (hence eplb plan / simulate) takes the same file
    assert torch.equal(read_load(tmp_path / "expert_distribution_recorder_1.pt"), count.float())


def test_two_dimensional_stat_dump_gets_a_step_axis(tmp_path):
    count = _counts()[0]
    _stat_dump(tmp_path / "d.pt", count)
    assert read_sglang_dump(tmp_path / "d.pt").shape == (1, 3, 8)


def test_folder_of_stat_dumps_is_concatenated_in_time_order(tmp_path):
    a, b = _counts(seed=1), _counts(steps=2, seed=2)
    _stat_dump(tmp_path / "expert_distribution_recorder_1700000002.5.pt", b)
    _stat_dump(tmp_path / "expert_distribution_recorder_1700000001.5.pt", a)
    got = read_load(tmp_path)
    assert torch.equal(got, torch.cat([a, b]).float())


def test_per_pass_dumps_are_summed_over_ranks_and_mapped(tmp_path):
    layout = _layout()
    g = torch.Generator().manual_seed(3)
    per_rank = {r: torch.randint(0, 5, (6, 3, 12), generator=g) for r in range(2)}
    for rank, counts in per_rank.items():
        records = [
            {"forward_pass_id": i, "rank": rank, "gatherer_key": "primary",
             "global_physical_count": counts[i]}
            for i in range(6)
        ]  # fmt: skip
        torch.save(
            {"records": records, "last_physical_to_logical_map": layout.phy2log},
            str(tmp_path / f"expert_distribution_recorder_1.0_{rank}.pt"),
        )
    want = physical_to_logical_count(per_rank[0] + per_rank[1], layout.phy2log)
    assert torch.equal(read_sglang_dump(tmp_path), want)
    one = read_load(tmp_path / "expert_distribution_recorder_1.0_0.pt")
    assert torch.equal(one, physical_to_logical_count(per_rank[0], layout.phy2log).float())


def test_json_logical_count_is_read(tmp_path):
    count = _counts(steps=1)[0]
    (tmp_path / "c.json").write_text(json.dumps({"logical_count": count.tolist()}))
    assert torch.equal(read_load(tmp_path / "c.json"), count.float().unsqueeze(0))


def test_vllm_window_with_its_map(tmp_path):
    layout = _layout()
    window = torch.randint(0, 9, (10, 3, 12), dtype=torch.int32)
    torch.save({"expert_load_window": window, "physical_to_logical_map": layout.phy2log},
               str(tmp_path / "w.pt"))  # fmt: skip
    want = physical_to_logical_count(window, layout.phy2log)
    assert torch.equal(read_load(tmp_path / "w.pt"), want.float())
    assert torch.equal(read_vllm_window_file(tmp_path / "w.pt"), want)
    assert torch.equal(read_vllm_window(window, layout), want)
    # a logical [W, L, E] window needs no layout
    assert torch.equal(read_vllm_window(want), want)


def test_vllm_window_without_map_needs_a_layout(tmp_path):
    layout = _layout()
    window = torch.randint(0, 9, (10, 3, 12), dtype=torch.int32)
    torch.save({"global_expert_load_window": window}, str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="physical_to_logical_map"):
        read_load(tmp_path / "w.pt")
    got = read_vllm_window_file(tmp_path / "w.pt", layout)
    assert torch.equal(got, physical_to_logical_count(window, layout.phy2log))


def test_vllm_window_of_wrong_width_is_refused():
    layout = _layout()
    with pytest.raises(ValueError, match=r"do not match physical_to_logical_map"):
        read_vllm_window(torch.zeros(2, 3, 10, dtype=torch.int32), layout)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(4, 3, 8), "integer counts, got dtype torch.float32"),
        (torch.zeros(2, 4, 3, 8, dtype=torch.int32), r"2-D or 3-D, got shape \(2, 4, 3, 8\)"),
        (torch.zeros(8, dtype=torch.int32), "got shape"),
        (torch.full((2, 3, 8), -1, dtype=torch.int32), "negative count"),
        (torch.zeros(2, 3, 8, dtype=torch.bool), "integer counts"),
        (torch.zeros(0, 3, 8, dtype=torch.int32), "empty"),
        ("text", "must be a tensor"),
    ],
)
def test_bad_dumps_get_clear_errors(tmp_path, bad, message):
    _stat_dump(tmp_path / "bad.pt", bad)
    with pytest.raises(ValueError, match=message) as info:
        read_load(tmp_path / "bad.pt")
    assert "logical_count" in str(info.value) and "bad.pt" in str(info.value)


def test_dump_that_is_not_a_dict_or_has_other_keys(tmp_path):
    torch.save({"foo": torch.zeros(2, 3, dtype=torch.int32), "bar": 1}, str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="logical_count"):
        read_sglang_dump(tmp_path / "x.pt")
    torch.save([1, 2, 3], str(tmp_path / "y.pt"))
    with pytest.raises(ValueError, match="not an SGLang dump"):
        read_sglang_dump(tmp_path / "y.pt")
    (tmp_path / "z.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        read_sglang_dump(tmp_path / "z.pt")
    with pytest.raises(ValueError, match="does not exist"):
        read_sglang_dump(tmp_path / "missing.pt")
    os.mkdir(tmp_path / "empty")
    with pytest.raises(ValueError, match="no .pt dumps"):
        read_load(tmp_path / "empty")


def test_folder_with_mismatched_dumps_is_refused(tmp_path):
    _stat_dump(tmp_path / "a.pt", _counts(layers=3))
    _stat_dump(tmp_path / "b.pt", _counts(layers=4))
    with pytest.raises(ValueError, match="disagree on"):
        read_sglang_dump(tmp_path)


def test_write_sglang_dump_round_trip(tmp_path):
    load = _counts().float()
    write_sglang_dump(tmp_path / "d.pt", load)
    raw = torch.load(tmp_path / "d.pt", weights_only=True)
    assert set(raw) == {"rank", "logical_count", "average_utilization_rate_over_window"}
    assert raw["logical_count"].dtype == torch.int64
    assert torch.equal(read_load(tmp_path / "d.pt"), load)
    with pytest.raises(ValueError, match="whole-number"):
        write_sglang_dump(tmp_path / "e.pt", load + 0.5)
    assert not (tmp_path / "e.pt").exists()


def test_check_counts_accepts_numpy_and_lists():
    assert check_counts(np.ones((2, 3), dtype=np.int32), "x").dtype == torch.int64
    assert check_counts([[1, 2], [3, 4]], "x").shape == (2, 2)
    with pytest.raises(ValueError, match="rectangular"):
        check_counts([[1, 2], [3]], "x")


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_sglang_layout_round_trip(tmp_path, suffix):
    layout = _layout()
    path = tmp_path / f"loc{suffix}"
    write_sglang_layout(path, layout)
    raw = torch.load(path, weights_only=True) if suffix == ".pt" else json.loads(path.read_text())
    # SGLang calls init_by_mapping(**data_dict): the file must hold this one key only
    assert list(raw) == [SGLANG_LAYOUT_KEY]
    assert torch.equal(torch.as_tensor(raw[SGLANG_LAYOUT_KEY]), layout.phy2log)
    back = read_sglang_layout(path, ep_size=4)
    assert torch.equal(back.phy2log, layout.phy2log)
    assert torch.equal(back.logcnt, layout.logcnt)
    assert back.topology == Topology(12, 1, 1, 4)
    assert torch.equal(read_layout(path, ep_size=4).phy2log, layout.phy2log)


def test_sglang_form_has_a_row_per_hidden_layer():
    layout = _layout(layers=2)
    full = sglang_phy2log(layout, layer_ids=[1, 3], num_layers=5)
    assert full.shape == (5, 12)
    assert torch.equal(full[[1, 3]], layout.phy2log)
    trivial = torch.arange(12) % 8
    for dense in (0, 2, 4):
        assert torch.equal(full[dense], trivial)
    with pytest.raises(ValueError, match="layer_ids"):
        sglang_phy2log(layout, layer_ids=[1], num_layers=5)
    with pytest.raises(ValueError, match="do not fit"):
        sglang_phy2log(layout, layer_ids=[1, 7], num_layers=5)


def test_slots_not_divisible_by_ep_size(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps({SGLANG_LAYOUT_KEY: [list(range(8)) * 2 + [0, 1]]}))
    with pytest.raises(ValueError, match=r"18 physical slots, not divisible by ep_size=4"):
        read_sglang_layout(tmp_path / "l.json", ep_size=4)
    assert read_sglang_layout(tmp_path / "l.json", ep_size=3).num_slots == 18


@pytest.mark.parametrize(
    "content, message",
    [
        ({SGLANG_LAYOUT_KEY: [[0.0, 1.0]]}, "integer"),
        ({SGLANG_LAYOUT_KEY: [0, 1, 2, 3]}, "2-D"),
        ({SGLANG_LAYOUT_KEY: [[0, 1, 1, 3]]}, "has no slot"),
        ({"logical_count": [[1, 2]]}, "statistics dump: pass it as --load"),
    ],
)
def test_bad_sglang_layouts(tmp_path, content, message):
    (tmp_path / "l.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_sglang_layout(tmp_path / "l.json", ep_size=2, num_experts=4)


def test_read_layout_needs_ep_size_for_sglang_and_checks_it_for_eplb(tmp_path):
    layout = _layout()
    write_sglang_layout(tmp_path / "l.pt", layout)
    layout.save(tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="give the EP size"):
        read_layout(tmp_path / "l.pt")
    with pytest.raises(ValueError, match="ep_size=2 disagrees"):
        read_layout(tmp_path / "l.safetensors", ep_size=2)
    assert read_layout(tmp_path / "l.safetensors").equals(layout)


# ------------------------------------------------------------------ CLI
def test_eplb_plan_takes_an_sglang_dump(tmp_path, capsys):
    _stat_dump(tmp_path / "dump.pt", _counts(steps=20, layers=4, experts=16))
    out = tmp_path / "layout.safetensors"
    rc = main(["plan", "--load", str(tmp_path / "dump.pt"), "--replicas", "20", "--gpus", "4",
               "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert ExpertLayout.load(out).phy2log.shape == (4, 20)


def test_eplb_plan_reports_a_bad_dump(tmp_path, capsys):
    _stat_dump(tmp_path / "dump.pt", torch.rand(4, 16))
    rc = main(["plan", "--load", str(tmp_path / "dump.pt"), "--replicas", "16", "--gpus", "4"])
    assert rc == 2
    assert "integer counts" in capsys.readouterr().err


def test_convert_load_and_layout(tmp_path, capsys):
    count = _counts()
    _stat_dump(tmp_path / "dump.pt", count)
    assert main(["convert", "load", str(tmp_path / "dump.pt"), str(tmp_path / "l.npy")]) == 0
    assert torch.equal(read_load(tmp_path / "l.npy"), count.float())
    assert main(["convert", "load", str(tmp_path / "l.npy"), str(tmp_path / "s.pt"),
                 "--sglang"]) == 0  # fmt: skip
    assert torch.equal(read_sglang_dump(tmp_path / "s.pt"), count.long())

    layout = _layout()
    window = torch.randint(0, 9, (10, 3, 12), dtype=torch.int32)
    torch.save(window, str(tmp_path / "win.pt"))
    layout.save(tmp_path / "lay.safetensors")
    assert main(["convert", "load", str(tmp_path / "win.pt"), str(tmp_path / "w.npz"),
                 "--layout", str(tmp_path / "lay.safetensors")]) == 0  # fmt: skip
    want = physical_to_logical_count(window, layout.phy2log).float()
    assert torch.equal(read_load(tmp_path / "w.npz"), want)

    args = ["convert", "layout", str(tmp_path / "lay.safetensors"), str(tmp_path / "loc.json"),
            "--layer-ids", "1,2,3", "--num-layers", "4"]  # fmt: skip
    assert main(args) == 0
    full = torch.tensor(json.loads((tmp_path / "loc.json").read_text())[SGLANG_LAYOUT_KEY])
    assert full.shape == (4, 12) and torch.equal(full[1:], layout.phy2log)
    back = str(tmp_path / "back.safetensors")
    assert main(["convert", "layout", str(tmp_path / "loc.json"), back, "--ep-size", "4"]) == 0
    assert torch.equal(ExpertLayout.load(back).phy2log, full)
    capsys.readouterr()
    assert main(["convert", "layout", str(tmp_path / "loc.json"), str(tmp_path / "x.safetensors"),
                 "--ep-size", "5"]) == 2  # fmt: skip
    assert "not divisible by ep_size=5" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ against SGLang itself
# SGLang cannot be installed with its dependencies here, but `pip install --no-deps sglang`
# (plus torch) imports its expert-location module. The helper below runs in such a venv and
# loads our files through SGLang's own `compute_initial_expert_location_metadata`, with its
# global server config replaced by plain namespaces.
SGLANG_PYTHON = os.environ.get(
    "EPLB_SGLANG_PYTHON", str(Path(__file__).resolve().parent.parent / ".venv-sglang/bin/python")
)
SGLANG_HELPER = r'''
"""Run inside a venv with sglang: load files with SGLang's own expert-location code."""
import json
import sys
import warnings
from types import SimpleNamespace

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import sglang.srt.eplb.expert_location as el  # noqa: E402

results = []
for args in json.loads(sys.argv[1]):
    moe = SimpleNamespace(
        init_expert_location=None, ep_num_redundant_experts=args["redundant"],
        ep_dispatch_algorithm="dynamic", moe_a2a_backend="none", ep_join_mode=None,
        eplb_algorithm=args.get("algorithm", "deepseek"),
    )
    el.get_exec = lambda moe=moe: SimpleNamespace(moe=moe)
    el.get_parallel = lambda args=args: SimpleNamespace(
        ep_size=args["ep_size"], elastic_ep_initial_size=None, nnodes=args.get("nnodes", 1),
        tp_size=args["ep_size"],
    )
    el.get_device = lambda: SimpleNamespace(device="cpu")
    config = el.ModelConfigForExpertLocation(
        num_layers=args["num_layers"], num_logical_experts=args["num_experts"],
        num_groups=args.get("num_groups"),
    )
    el.ModelConfigForExpertLocation.from_model_config = staticmethod(lambda mc, c=config: c)
    out = {}
    for key, path in args["files"].items():
        moe.init_expert_location = path
        meta = el.compute_initial_expert_location_metadata(model_config=None, moe_ep_rank=0)
        out[key] = {
            "phy2log": meta.physical_to_logical_map.tolist(),
            "log2all": meta.logical_to_all_physical_map.tolist(),
            "num_valid": meta.logical_to_all_physical_map_num_valid.tolist(),
        }
    results.append(out)
print(json.dumps(results))
'''


def _sglang_load(tmp_path, jobs: list[dict]) -> list[dict]:
    script = tmp_path / "sgl_load.py"
    script.write_text(SGLANG_HELPER)
    done = subprocess.run(
        [SGLANG_PYTHON, str(script), json.dumps(jobs)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not os.path.isfile(SGLANG_PYTHON), reason="needs a venv with `pip install --no-deps sglang`"
)
def test_sglang_loads_our_layouts_and_dumps(tmp_path):
    layers, experts, redundant, ep_size = 5, 16, 8, 4
    cases, jobs = [], []
    for hierarchical in (False, True):
        groups, nodes = (4, 2) if hierarchical else (1, 1)
        g = torch.Generator().manual_seed(11 + hierarchical)
        count = torch.randint(0, 1000, (6, layers, experts), generator=g, dtype=torch.int64)
        topology = Topology(experts + redundant, groups, nodes, ep_size)
        layout = plan(count.float(), topology, policy="deepseek")
        folder = tmp_path / f"h{int(hierarchical)}"
        folder.mkdir()
        write_sglang_layout(folder / "loc.pt", layout)
        write_sglang_layout(folder / "loc.json", layout)
        write_sglang_dump(folder / "dump.pt", count)
        cases.append((folder, layout))
        jobs.append(
            dict(
                files={k: str(folder / k) for k in ("loc.pt", "loc.json", "dump.pt")},
                redundant=redundant,
                ep_size=ep_size,
                num_layers=layers,
                num_experts=experts,
                num_groups=groups if hierarchical else None,
                nnodes=nodes,
                algorithm="deepseek_hierarchical" if hierarchical else "deepseek",
            )  # fmt: skip
        )
    for (folder, layout), got in zip(cases, _sglang_load(tmp_path, jobs)):
        width = layout.log2phy.shape[-1]
        for key in ("loc.pt", "loc.json"):
            assert torch.equal(torch.tensor(got[key]["phy2log"]), layout.phy2log)
            log2all = torch.tensor(got[key]["log2all"])  # SGLang pads to P with -1
            assert (log2all[..., width:] == -1).all()
            # a phy2log file carries no replica order: both sides list slots in slot order
            ours = read_sglang_layout(folder / key, ep_size=ep_size)
            assert torch.equal(log2all[..., :width], ours.log2phy)
            big = layout.num_slots
            assert torch.equal(
                log2all[..., :width].masked_fill(log2all[..., :width] < 0, big).sort(-1).values,
                layout.log2phy.masked_fill(layout.log2phy < 0, big).sort(-1).values,
            )
            assert torch.equal(torch.tensor(got[key]["num_valid"]), layout.logcnt)
        # our dump through SGLang's start-up planner (its copy of DeepSeek's algorithm)
        # gives the layout our own DeepSeek policy plans from the same counts
        assert torch.equal(torch.tensor(got["dump.pt"]["phy2log"]), layout.phy2log)


def test_layer_ids_ranges_and_their_errors():
    from eplb_plugin.cli.convert import parse_layer_ids

    assert parse_layer_ids("0,2,4-7") == [0, 2, 4, 5, 6, 7]
    assert parse_layer_ids("3-60") == list(range(3, 61))
    for text, match in (
        ("1,1", "layer 1 more than once"),
        ("0-3,2", "layer 2 more than once"),
        ("5-2", "rising range"),
        ("a", "not a layer id"),
        ("-1", "not a layer id"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_layer_ids(text)


def test_a_folder_of_foreign_pt_files_names_a_few_keys(tmp_path) -> None:
    from eplb_plugin.formats import read_sglang_dump

    torch.save({f"key{i:02d}": i for i in range(20)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds keys \['key00'.*'key07'\] and 12 more\)"):
        read_sglang_dump(tmp_path)
    torch.save([1, 2], tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds a list\)"):
        read_sglang_dump(tmp_path)
