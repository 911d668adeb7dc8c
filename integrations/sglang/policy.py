"""The policy swap: SGLang's own EPLB places experts with an eplb-plugin policy.

SGLang's EPLB manager (and ``--init-expert-location`` with a ``logical_count`` file) reach
the placement algorithm through one call, ``sglang.srt.eplb.eplb_algorithms.
rebalance_experts(tokens_per_expert, num_physical_experts, num_local_physical_experts,
num_groups, num_nodes, algorithm)``, and use its ``(phy2log, log2phy, logcnt)``. The same
triple is what :func:`eplb_plugin.rebalance_experts` returns (DeepSeek's signature).
:func:`plan_for_sglang` answers that call with :func:`eplb_plugin.plan`; everything else
(recording, weight transfer, dispatch) stays SGLang's.

Nothing here imports SGLang: the algorithm enum is read by name, so this module is tested
with plain strings in the core environment and with SGLang's real enum in its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from eplb_plugin.layout import Topology
from eplb_plugin.policies import get_policy, plan

from ..common.policy import previous_layout

# SGLang's algorithm names (``EplbAlgorithm``) that the swap answers by default: DeepSeek's
# algorithm and SGLang's vectorized copy of it. The ``elasticity_aware`` ones stay SGLang's:
# they place around ranks that failed, which only SGLang's elastic-EP state knows.
DEFAULT_ALGORITHMS = (
    "deepseek",
    "deepseek_hierarchical",
    "deepseek_vec",
    "deepseek_vec_hierarchical",
)
KNOWN_ALGORITHMS = (*DEFAULT_ALGORITHMS, "elasticity_aware", "elasticity_aware_hierarchical")


def algorithm_name(algorithm: object) -> str:
    """``EplbAlgorithm.deepseek`` (or the string ``"deepseek"``) -> ``"deepseek"``."""
    return getattr(algorithm, "name", algorithm) if not isinstance(algorithm, str) else algorithm


def sglang_topology(
    num_physical_experts: int,
    num_local_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    num_experts: int,
    hierarchical: bool,
) -> Topology:
    """The Topology SGLang's arguments describe.

    SGLang's non-hierarchical algorithms plan with one group on one node (DeepSeek's global
    policy); the hierarchical ones with the model's expert groups over the nodes. When the
    groups do not fit (no groups, or groups that do not divide the experts or spread evenly
    over the nodes) the global policy is used, as SGLang's ``auto`` choice does.
    """
    if num_local_physical_experts <= 0 or num_physical_experts % num_local_physical_experts:
        raise ValueError(
            f"num_physical_experts={num_physical_experts} is not a multiple of "
            f"num_local_physical_experts={num_local_physical_experts}"
        )
    num_gpus = num_physical_experts // num_local_physical_experts
    groups = num_groups or 1
    nodes = num_nodes if num_nodes and num_nodes > 0 and num_gpus % num_nodes == 0 else 1
    if not hierarchical or num_experts % groups or groups % nodes:
        groups, nodes = 1, 1
    return Topology(num_physical_experts, groups, nodes, num_gpus)


def plan_for_sglang(
    tokens_per_expert: torch.Tensor,
    num_physical_experts: int,
    num_local_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    algorithm: object,
    *,
    policy: str = "default",
    previous: torch.Tensor | None = None,
    options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang's ``eplb_algorithms.rebalance_experts`` call answered by an eplb-plugin policy.

    Args:
        tokens_per_expert: [steps, L, E] (or [L, E]) logical token counts, any real dtype,
            any device; SGLang's L is the model's layer count (dense layers hold zeros).
        num_physical_experts: P slots over all EP ranks.
        num_local_physical_experts: slots per rank (P / EP size).
        num_groups: the model's expert groups, or None.
        num_nodes: nodes the EP ranks span.
        algorithm: SGLang's ``EplbAlgorithm`` member (or its name): ``*_hierarchical``
            plans hierarchically when the groups allow it.
        policy: a registered eplb-plugin policy name.
        previous: [L, P] int64 layout in service (SGLang's ``physical_to_logical_map``),
            passed to migration-aware policies; ignored when it does not describe a full
            layout of this shape.
        options: keyword options for the policy (``--eplb-policy-options``).
    Returns:
        (phy2log [L, P] int64, log2phy [L, E, X] int64 -1 padded, logcnt [L, E] int64) on
        CPU: what SGLang's own algorithms return.
    """
    load = torch.as_tensor(tokens_per_expert).detach().cpu()
    if load.dim() not in (2, 3):
        raise ValueError(
            f"tokens_per_expert must be [steps, layers, experts] or [layers, experts], got "
            f"shape {tuple(load.shape)}"
        )
    load = load.to(torch.float32)
    hierarchical = algorithm_name(algorithm).endswith("_hierarchical")
    topology = sglang_topology(
        num_physical_experts, num_local_physical_experts, num_groups, num_nodes,
        load.shape[-1], hierarchical,
    )  # fmt: skip
    in_service = previous_layout(previous, topology, *load.shape[-2:])
    layout = plan(load, topology, policy=policy, previous=in_service, **(options or {}))
    return layout.phy2log, layout.log2phy, layout.logcnt


def make_rebalance_experts(
    original: Callable,
    policy: str = "default",
    algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
    current_phy2log: Callable[[], torch.Tensor | None] | None = None,
    options: dict | None = None,
) -> Callable:
    """A drop-in for SGLang's ``eplb_algorithms.rebalance_experts``.

    Calls with an algorithm named in ``algorithms`` are planned by eplb-plugin ``policy``;
    any other algorithm goes to ``original`` unchanged.

    Args:
        original: SGLang's function.
        policy: a registered eplb-plugin policy (checked now: ValueError if unknown).
        algorithms: SGLang algorithm names to answer.
        current_phy2log: returns SGLang's layout in service ([L, P]) or None, for
            migration-aware policies.
        options: keyword options for the policy.
    """
    get_policy(policy)
    options = dict(options or {})
    names = frozenset(algorithms)
    unknown = names - set(KNOWN_ALGORITHMS)
    if unknown:
        raise ValueError(f"algorithms {sorted(unknown)} are not SGLang EPLB algorithm names")

    def rebalance_experts(
        tokens_per_expert,
        num_physical_experts,
        num_local_physical_experts,
        num_groups,
        num_nodes,
        algorithm,
    ):
        if algorithm_name(algorithm) not in names:
            return original(
                tokens_per_expert, num_physical_experts, num_local_physical_experts,
                num_groups, num_nodes, algorithm,
            )  # fmt: skip
        previous = current_phy2log() if current_phy2log is not None else None
        return plan_for_sglang(
            tokens_per_expert, num_physical_experts, num_local_physical_experts, num_groups,
            num_nodes, algorithm, policy=policy, previous=previous, options=options,
        )  # fmt: skip

    rebalance_experts.eplb_plugin_policy = policy  # type: ignore[attr-defined]
    rebalance_experts.__wrapped__ = original  # type: ignore[attr-defined]
    return rebalance_experts


__all__ = [
    "DEFAULT_ALGORITHMS",
    "KNOWN_ALGORITHMS",
    "algorithm_name",
    "make_rebalance_experts",
    "plan_for_sglang",
    "sglang_topology",
]
