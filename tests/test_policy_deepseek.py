"""DeepSeek policy: identical to deepseek-ai/EPLB on its reference outputs."""

import json
import pathlib

import pytest
import torch

from eplb_plugin import ExpertLayout, Topology, plan, rebalance_experts
from eplb_plugin.policies import LoadWarning
from eplb_plugin.policies.deepseek import balanced_packing, replicate_experts

# not imported from conftest: tests/sglang has a conftest of the same module name
DATA = pathlib.Path(__file__).resolve().parent / "data"
CASES = json.loads((DATA / "eplb_reference_cases.json").read_text())["cases"]


def _args(case):
    return case["num_replicas"], case["num_groups"], case["num_nodes"], case["num_gpus"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_reference(case):
    weight = torch.tensor(case["weight"], dtype=torch.float32)
    phy2log, log2phy, logcnt = rebalance_experts(weight, *_args(case), policy="deepseek")
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert logcnt.tolist() == case["logcnt"]
    layout = ExpertLayout.from_phy2log(phy2log, Topology(*_args(case)), weight.shape[1])
    max_load = layout.gpu_loads(weight).amax(-1)
    assert torch.allclose(max_load, torch.tensor(case["max_gpu_load"], dtype=torch.float64))
    if not case["has_ties"]:
        assert phy2log.tolist() == case["phy2log"]
        assert log2phy.tolist() == case["log2phy"]


def test_cases_cover_both_modes_and_dsv3_scale():
    assert len(CASES) == 65
    assert {c["hierarchical"] for c in CASES} == {True, False}
    big = [c for c in CASES if len(c["weight"]) == 58 and len(c["weight"][0]) == 256]
    assert len(big) == 2


def test_single_layer_example_logcnt():
    case = next(c for c in CASES if c["logcnt"] == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]])
    weight = torch.tensor(case["weight"])
    assert rebalance_experts(weight, *_args(case), policy="deepseek")[2].tolist() == case["logcnt"]


def test_balanced_packing_equal_counts_and_greedy():
    weight = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 1.0]])
    pack, rank = balanced_packing(weight, 2)
    counts = torch.bincount(pack[0], minlength=2)
    assert counts.tolist() == [3, 3]
    # each (pack, rank) position is used exactly once
    assert sorted(zip(pack[0].tolist(), rank[0].tolist())) == [
        (p, r) for p in (0, 1) for r in (0, 1, 2)
    ]  # noqa: E501
    loads = torch.zeros(2).index_add_(0, pack[0], weight[0])
    assert loads.tolist() == [8.0, 8.0]


def test_replicate_gives_redundant_slots_to_the_hottest():
    weight = torch.tensor([[100.0, 10.0, 1.0]])
    phy2log, rank, logcnt = replicate_experts(weight, 6)
    assert logcnt.tolist() == [[4, 1, 1]]
    assert phy2log[0, 3:].tolist() == [0, 0, 0]
    assert rank[0, 3:].tolist() == [1, 2, 3]


def test_all_zero_layer_gives_valid_layout():
    weight = torch.zeros(3, 8)
    weight[1] = torch.arange(8.0)
    with pytest.warns(LoadWarning, match=r"layers \[0, 2\] have no load"):
        layout = plan(weight, Topology(12, 2, 2, 4), policy="deepseek")
    layout.validate()
    assert layout.logcnt.sum(1).tolist() == [12, 12, 12]


def test_steps_input_equals_sum():
    gen = torch.Generator().manual_seed(0)
    steps = torch.randint(0, 50, (5, 4, 16), generator=gen)
    topo = Topology(24, 4, 2, 8)
    a = plan(steps, topo, policy="deepseek")
    b = plan(steps.sum(0), topo, policy="deepseek")
    assert a.equals(b)


def _reference_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "eplb_reference", DATA.parent / "eplb_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drop_in_accepts_exactly_the_topologies_deepseek_accepts():
    """Every small (experts, slots, groups, nodes, GPUs): where deepseek-ai/EPLB returns a
    plan ours returns the same plan; where it fails an assertion ours raises ValueError."""
    reference = _reference_module()
    gen = torch.Generator().manual_seed(7)
    accepted = refused = 0
    for experts in (4, 6):
        weight = torch.randint(1, 1000, (2, experts), generator=gen).float()
        for gpus in (1, 2, 3, 4, 6):
            for slots in range(gpus, 2 * experts + 1, gpus):
                for groups in (1, 2, 3, 4):
                    for nodes in (1, 2, 3, 4):
                        args = (slots, groups, nodes, gpus)
                        try:
                            want = reference.rebalance_experts(weight, *args)
                        except AssertionError:
                            with pytest.raises(ValueError):
                                rebalance_experts(weight, *args, policy="deepseek")
                            refused += 1
                            continue
                        got = rebalance_experts(weight, *args, policy="deepseek")
                        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), args
                        accepted += 1
    assert accepted > 50 and refused > 50
