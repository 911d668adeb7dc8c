"""plan() and rebalance_experts(): bad input is refused with a clear ValueError."""

import numpy as np
import pytest
import torch

from eplb_plugin import Topology, available_policies, plan, rebalance_experts, register_policy

TOPO = Topology(num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)


@pytest.mark.parametrize(
    "weight, match",
    [
        (torch.tensor([[1.0, float("nan")] * 6]), "weight contains NaN"),
        (torch.tensor([[1.0, float("inf")] * 6]), "weight contains inf"),
        (torch.tensor([[1.0, -2.0] * 6]), "weight contains negative loads"),
        (torch.ones(12), "got 1 dims"),
        (torch.ones(1, 1, 1, 12), "got 4 dims"),
        (torch.ones(0, 12), "weight is empty"),
        (torch.ones(2, 12, dtype=torch.bool), "must hold real numbers"),
    ],
)
def test_bad_weights(weight, match):
    with pytest.raises(ValueError, match=match):
        plan(weight, TOPO)


@pytest.mark.parametrize(
    "args, match",
    [
        ((8, 4, 2, 8), "num_replicas=8 must be >= num_experts=12"),
        ((16, 4, 2, 6), "num_replicas=16 must be divisible by num_gpus=6"),
        ((16, 5, 1, 8), "num_experts=12 must be divisible by num_groups=5"),
        ((18, 4, 4, 6), "num_gpus=6 must be divisible by num_nodes=4"),
    ],
)
def test_bad_topology(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(torch.ones(2, 12), *args)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown policy 'nope'; available: .*deepseek"):
        plan(torch.ones(2, 12), TOPO, policy="nope")


def test_accepts_numpy_lists_and_integers():
    expected = plan(torch.ones(2, 12), TOPO, policy="deepseek")
    for weight in (np.ones((2, 12), dtype=np.int64), [[1] * 12] * 2):
        assert plan(weight, TOPO, policy="deepseek").equals(expected)


def test_previous_of_wrong_shape_is_refused():
    previous = plan(torch.ones(3, 12), TOPO, policy="deepseek")
    with pytest.raises(ValueError, match="previous layout has 3 layers"):
        plan(torch.ones(2, 12), TOPO, previous=previous)


def test_registry_adds_policies_without_touching_callers():
    calls = []

    def mine(weight, topology, previous=None, **options):
        calls.append(options)
        return plan(weight, topology, policy="deepseek")

    register_policy("test-mine", mine)
    assert "test-mine" in available_policies()
    phy2log, _, _ = rebalance_experts(torch.ones(1, 12), 16, 4, 2, 8, policy="test-mine")
    assert phy2log.shape == (1, 16) and calls == [{}]
    with pytest.raises(ValueError, match="already registered"):
        register_policy("test-mine", lambda *a, **k: None)


def test_drop_in_returns_reference_types():
    phy2log, log2phy, logcnt = rebalance_experts(torch.rand(3, 12), 16, 4, 2, 8)
    assert phy2log.shape == (3, 16) and logcnt.shape == (3, 12)
    assert log2phy.shape[:2] == (3, 12) and log2phy.shape[2] == int(logcnt.max())
    assert all(
        t.dtype == torch.int64 and t.device.type == "cpu" for t in (phy2log, log2phy, logcnt)
    )
