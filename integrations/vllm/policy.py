"""The policy swap: vLLM's built-in EPLB places experts with an eplb-plugin policy.

vLLM's EPLB calls ``policy.rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_global_expert_indices)`` and expects ``phy2log`` [L, P]. :func:`plan_phy2log`
answers that call with :func:`eplb_plugin.plan` (the same placement ``rebalance_experts``
gives) and keeps vLLM's own post-processing that leaves an expert in its old slot when it
stays on the same GPU (fewer weight copies). Everything else (counting, weight transfer,
uniform replica choice) stays vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from eplb_plugin.layout import Topology
from eplb_plugin.policies import plan

from ..common.policy import previous_layout

Preserve = Callable[[np.ndarray, int, np.ndarray], np.ndarray]


def plan_phy2log(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_phy2log: torch.Tensor | None = None,
    *,
    policy: str = "default",
    options: dict | None = None,
    preserve: Preserve | None = None,
) -> torch.Tensor:
    """vLLM's policy call answered by an eplb-plugin policy.

    Args:
        weight: [L, E] load per logical expert (any real dtype; vLLM passes int64 counts).
        num_replicas: P physical slots, a multiple of ``num_ranks``.
        num_groups: expert groups of the model (hierarchical placement when they divide
            evenly over the nodes, DeepSeek's rule).
        num_nodes: nodes; falls back to 1 when it does not divide ``num_ranks``.
        num_ranks: EP ranks (GPUs).
        old_phy2log: [L, P] int64 layout in service, or None; passed to migration-aware
            policies as ``previous`` and to ``preserve``.
        policy: a registered eplb-plugin policy name.
        options: keyword options of the policy (``--eplb-policy-options``).
        preserve: ``(new [L, P], num_ranks, old [L, P]) -> [L, P]`` numpy slot reordering
            (vLLM's ``DefaultEplbPolicy.preserve_intragpu_slots``), applied when
            ``old_phy2log`` is given.
    Returns:
        phy2log [L, P] int64 on CPU.
    """
    weight = torch.as_tensor(weight).detach().cpu().to(torch.float32)
    if num_nodes <= 0 or num_ranks % num_nodes:
        num_nodes = 1
    num_experts = weight.shape[-1]
    if num_groups <= 0 or num_experts % num_groups:
        num_groups = 1
    topology = Topology(num_replicas, num_groups, num_nodes, num_ranks)
    previous = previous_layout(old_phy2log, topology, *weight.shape)
    phy2log = plan(weight, topology, policy=policy, previous=previous, **(options or {})).phy2log
    if old_phy2log is not None and preserve is not None and previous is not None:
        kept = preserve(phy2log.numpy(), num_ranks, previous.phy2log.numpy())
        phy2log = torch.from_numpy(np.ascontiguousarray(kept)).to(torch.int64)
    return phy2log


def make_policy_class(policy: str, options: dict | None = None) -> type:
    """A subclass of vLLM's ``AbstractEplbPolicy`` that plans with eplb-plugin ``policy``."""
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    class EplbPluginPolicy(AbstractEplbPolicy):
        eplb_plugin_policy = policy
        eplb_plugin_options = dict(options or {})

        @classmethod
        def rebalance_experts(
            cls,
            weight: torch.Tensor,
            num_replicas: int,
            num_groups: int,
            num_nodes: int,
            num_ranks: int,
            old_global_expert_indices: torch.Tensor | None = None,
        ) -> torch.Tensor:
            return plan_phy2log(
                weight,
                num_replicas,
                num_groups,
                num_nodes,
                num_ranks,
                old_global_expert_indices,
                policy=cls.eplb_plugin_policy,
                options=cls.eplb_plugin_options,
                preserve=DefaultEplbPolicy.preserve_intragpu_slots,
            )

    EplbPluginPolicy.__name__ = f"EplbPluginPolicy[{policy}]"
    return EplbPluginPolicy
