"""Placement policies: a registry of pure functions `(weight, topology, previous, **opts)`.

One public entry point, :func:`plan`, validates its input once and dispatches by name;
:func:`rebalance_experts` is the drop-in for deepseek-ai/EPLB's function of the same name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..layout import ExpertLayout, Topology
from .deepseek import deepseek_policy
from .default import default_policy

PolicyFn = Callable[..., ExpertLayout]

_POLICIES: dict[str, PolicyFn] = {}


def register_policy(name: str, fn: PolicyFn | None = None, *, replace: bool = False):
    """Register ``fn`` under ``name`` (usable as a decorator). Names are case-sensitive."""

    def _register(f: PolicyFn) -> PolicyFn:
        if not replace and name in _POLICIES and _POLICIES[name] is not f:
            raise ValueError(f"policy {name!r} is already registered")
        _POLICIES[name] = f
        return f

    return _register(fn) if fn is not None else _register


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def get_policy(name: str) -> PolicyFn:
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available_policies())}")
    return _POLICIES[name]


def dispatch_option(policy: str, dispatch: str) -> dict[str, str]:
    """``{"dispatch": dispatch}`` when the policy takes a ``dispatch`` option, else ``{}``.

    Callers that know the dispatch mode the layout will serve (the Balancer, the simulator)
    pass it this way, so that a registered policy without the option still works.
    """
    params = inspect.signature(get_policy(policy)).parameters.values()
    takes = any(p.kind is p.VAR_KEYWORD or p.name == "dispatch" for p in params)
    return {"dispatch": dispatch} if takes else {}


def check_load(weight: object, name: str = "weight") -> torch.Tensor:
    """Validate a load and return it as float32 on CPU.

    Args:
        weight: [L, E] or [steps, L, E] non-negative finite numbers (tensor, ndarray, list).
    Raises:
        ValueError naming ``name`` and what is wrong.
    """
    try:
        tensor = torch.as_tensor(weight)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} cannot be read as a tensor: {exc}") from exc
    if tensor.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be [layers, experts] or [steps, layers, experts], "
            f"got {tensor.dim()} dims with shape {tuple(tensor.shape)}"
        )
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
    tensor = tensor.detach().cpu()
    if tensor.dtype.is_floating_point:
        if torch.isnan(tensor).any():
            raise ValueError(f"{name} contains NaN")
        if torch.isinf(tensor).any():
            raise ValueError(f"{name} contains inf")
    if (tensor < 0).any():
        raise ValueError(f"{name} contains negative loads (min {tensor.min().item()})")
    return tensor.to(torch.float32)


def plan(
    weight: object,
    topology: Topology,
    policy: str = "default",
    previous: ExpertLayout | None = None,
    **options: object,
) -> ExpertLayout:
    """Place experts on slots.

    Args:
        weight: [L, E] load, or [steps, L, E] per-step loads (policies that model the
            step-to-step variation use them; others see their sum).
        topology: slots, groups, nodes, GPUs.
        policy: a registered policy name (``available_policies()``).
        previous: the layout in service now, for migration-aware policies.
        options: policy-specific keyword options.
    Returns:
        A validated ExpertLayout with ``topology``.
    """
    fn = get_policy(policy)
    if not isinstance(topology, Topology):
        raise ValueError(f"topology must be a Topology, got {type(topology).__name__}")
    load = check_load(weight)
    steps = load if load.dim() == 3 else None
    total = load.sum(0) if steps is not None else load
    topology.check_experts(total.shape[1])
    if previous is not None:
        if previous.phy2log.shape != (total.shape[0], topology.num_replicas) or (
            previous.num_experts != total.shape[1]
        ):
            raise ValueError(
                f"previous layout has {previous.num_layers} layers x {previous.num_experts} "
                f"experts on {previous.num_slots} slots; the load needs {total.shape[0]} x "
                f"{total.shape[1]} on {topology.num_replicas}"
            )
    if steps is not None:
        options["steps"] = steps
    return fn(total, topology, previous=previous, **options)


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "default",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for deepseek-ai/EPLB's ``rebalance_experts``.

    Args:
        weight: [L, E] load per logical expert.
    Returns:
        (phy2log [L, P] int64, log2phy [L, E, X] int64 padded with -1, logcnt [L, E] int64),
        on CPU as the reference returns them.
    """
    topology = Topology(num_replicas, num_groups, num_nodes, num_gpus)
    layout = plan(weight, topology, policy=policy)
    return layout.phy2log, layout.log2phy, layout.logcnt


register_policy("deepseek", deepseek_policy)
register_policy("default", default_policy)

__all__ = [
    "available_policies",
    "check_load",
    "dispatch_option",
    "get_policy",
    "plan",
    "rebalance_experts",
    "register_policy",
]
