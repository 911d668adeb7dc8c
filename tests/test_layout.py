"""Topology and ExpertLayout: validation, derived maps, loads, save/load, diff."""

import pytest
import torch

from eplb_plugin import ExpertLayout, Topology, balancedness_of, plan


def test_topology_properties():
    t = Topology(num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert (t.slots_per_gpu, t.gpus_per_node, t.slots_per_node) == (2, 4, 8)
    assert t.hierarchical
    assert t.gpu_of_slot(5) == 2 and t.node_of_gpu(5) == 1 and t.node_of_slot(9) == 1
    assert t.gpu_of_slot(torch.arange(4)).tolist() == [0, 0, 1, 1]
    assert not Topology(16, 3, 2, 8).hierarchical


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_replicas=10, num_gpus=4), "num_replicas=10 must be divisible by num_gpus=4"),
        (
            dict(num_replicas=12, num_groups=4, num_nodes=4, num_gpus=6),
            "num_gpus=6 must be divisible by num_nodes=4",
        ),  # noqa: E501
        (dict(num_replicas=0), "num_replicas must be positive"),
        (dict(num_replicas=8, num_gpus=-2), "num_gpus must be positive"),
        (dict(num_replicas=8.0), "num_replicas must be an integer"),
    ],
)
def test_topology_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Topology(**kwargs)


def test_check_experts_errors():
    t = Topology(8, 3, 1, 4)
    with pytest.raises(ValueError, match="num_replicas=8 must be >= num_experts=9"):
        t.check_experts(9)
    with pytest.raises(ValueError, match="num_experts=8 must be divisible by num_groups=3"):
        t.check_experts(8)


def test_from_phy2log_builds_consistent_maps():
    t = Topology(6, 1, 1, 3)
    layout = ExpertLayout.from_phy2log(torch.tensor([[0, 1, 2, 3, 0, 0]]), t)
    assert layout.logcnt.tolist() == [[3, 1, 1, 1]]
    assert layout.log2phy.tolist() == [[[0, 4, 5], [1, -1, -1], [2, -1, -1], [3, -1, -1]]]
    assert torch.allclose(layout.replica_share, torch.tensor([[1 / 3, 1, 1, 1, 1 / 3, 1 / 3]]))
    assert layout.log2phy.dtype == torch.int64 and layout.replica_share.dtype == torch.float32


def test_validate_rejects_inconsistent_layouts():
    t = Topology(4, 1, 1, 2)
    good = ExpertLayout.from_phy2log(torch.tensor([[0, 1, 2, 0]]), t)
    bad_cnt = ExpertLayout(good.phy2log, good.log2phy, good.logcnt + 1, good.replica_share, t)
    with pytest.raises(ValueError, match="logcnt does not match"):
        bad_cnt.validate()
    share = good.replica_share.clone()
    share[0, 0] = 0.9
    with pytest.raises(ValueError, match="replica_share of expert 0 in layer 0 sums to"):
        good.with_share(share)
    swapped = good.log2phy.clone()
    swapped[0, 1, 0], swapped[0, 2, 0] = 2, 1
    with pytest.raises(ValueError, match="log2phy points at slots"):
        ExpertLayout(good.phy2log, swapped, good.logcnt, good.replica_share, t).validate()
    with pytest.raises(ValueError, match="has no slot"):
        ExpertLayout.from_phy2log(torch.tensor([[0, 1, 1, 0]]), t, num_experts=3)
    with pytest.raises(ValueError, match="4 slots but topology.num_replicas=6"):
        ExpertLayout.from_phy2log(torch.tensor([[0, 1, 2, 0]]), Topology(6, 1, 1, 2))


def test_gpu_loads_and_balancedness():
    t = Topology(4, 1, 1, 2)
    layout = ExpertLayout.from_phy2log(torch.tensor([[0, 1, 2, 0]]), t)
    weight = torch.tensor([[10.0, 4.0, 6.0]])
    # GPU0: slots 0,1 -> 5 + 4 ; GPU1: slots 2,3 -> 6 + 5
    assert layout.gpu_loads(weight).tolist() == [[9.0, 11.0]]
    assert layout.balancedness(weight) == pytest.approx(10.0 / 11.0)
    assert balancedness_of(torch.zeros(3, 4)) == 1.0
    with pytest.raises(ValueError, match="weight must have shape"):
        layout.gpu_loads(torch.ones(2, 3))


def test_save_load_roundtrip_and_diff(tmp_path):
    gen = torch.Generator().manual_seed(1)
    weight = torch.rand(3, 16, generator=gen) * 100
    topo = Topology(24, 4, 2, 8)
    layout = plan(weight, topo, policy="deepseek")
    path = tmp_path / "layout.safetensors"
    layout.save(path)
    again = ExpertLayout.load(path)
    assert again.equals(layout) and again.topology == topo
    other = plan(weight.flip(-1), topo, policy="deepseek")
    changed = layout.diff(other)
    assert changed.shape == (3, 24) and changed.dtype == torch.bool
    assert torch.equal(changed, layout.phy2log != other.phy2log)
    assert not layout.diff(again).any()


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(path), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not an eplb layout file"):
        ExpertLayout.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read layout file"):
        ExpertLayout.load(tmp_path / "junk.safetensors")
    layout = ExpertLayout.identity(1, 4, Topology(4, 1, 1, 2))
    layout.save(path, {"version": "99"})
    with pytest.raises(ValueError, match="format version 99"):
        ExpertLayout.load(path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    layout = ExpertLayout.identity(1, 4, Topology(4, 1, 1, 2))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        layout.save(tmp_path / "l.safetensors")
    assert list(tmp_path.iterdir()) == []
