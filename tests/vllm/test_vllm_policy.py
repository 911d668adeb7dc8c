"""The policy swap against vLLM's real EPLB policy registry (no engine needed).

vLLM's own EPLB refuses to run on CPU, so the swap is checked where vLLM looks the policy
up: ``EPLB_POLICIES[eplb_config.policy]``, the dict ``EplbState`` reads.
"""

from __future__ import annotations

import importlib.util

import pytest

# `tests/` is on sys.path during the test run, which makes this folder importable as a
# namespace package named "vllm": only a spec with a file is the real vLLM.
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    pytest.skip("vLLM is not installed (these tests run in .venv-vllm: .ci/vllm.sh)",
                allow_module_level=True)  # fmt: skip
pytest.importorskip("vllm")

import torch  # noqa: E402

from eplb_plugin import plan  # noqa: E402
from eplb_plugin.integrations.vllm import disable, enable_policy_swap  # noqa: E402
from eplb_plugin.layout import ExpertLayout, Topology  # noqa: E402


def test_swap_replaces_what_vllm_runs_for_default_and_restores_it():
    from vllm.config.parallel import EPLBConfig
    from vllm.distributed.eplb import eplb_state
    from vllm.distributed.eplb.policy import EPLB_POLICIES, DefaultEplbPolicy

    assert EPLB_POLICIES["default"] is DefaultEplbPolicy
    g = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 1000, (3, 16), generator=g)
    try:
        enable_policy_swap("deepseek")
        enable_policy_swap("deepseek")  # idempotent
        # vLLM validates the name ("default" only) and EplbState looks it up in this dict
        chosen = eplb_state.EPLB_POLICIES[EPLBConfig(policy="default").policy]
        assert chosen is not DefaultEplbPolicy and chosen.eplb_plugin_policy == "deepseek"

        got = chosen.rebalance_experts(weight, 24, 4, 2, 4)
        topology = Topology(24, 4, 2, 4)
        assert torch.equal(got, plan(weight.float(), topology, policy="deepseek").phy2log)
        # DeepSeek's algorithm: the same placement vLLM's numpy port computes
        assert torch.equal(got, DefaultEplbPolicy.rebalance_experts(weight, 24, 4, 2, 4))

        # with the map in service: vLLM's slot keeping applies on top of our placement
        old = DefaultEplbPolicy.rebalance_experts(weight.flip(1), 24, 4, 2, 4)
        kept = chosen.rebalance_experts(weight, 24, 4, 2, 4, old)
        previous = ExpertLayout.from_phy2log(old, topology, 16)
        mine = plan(weight.float(), topology, policy="deepseek", previous=previous).phy2log
        want = DefaultEplbPolicy.preserve_intragpu_slots(mine.numpy(), 4, old.numpy())
        assert torch.equal(kept, torch.from_numpy(want))
        # every GPU holds the same experts either way: only the order inside a GPU differs
        assert torch.equal(kept.view(3, 4, 6).sort(-1).values, mine.view(3, 4, 6).sort(-1).values)
    finally:
        disable()
    assert EPLB_POLICIES["default"] is DefaultEplbPolicy
