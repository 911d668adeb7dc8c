"""Placement policies: a registry of pure functions `(weight, topology, previous, **opts)`.

One public entry point, :func:`plan`, validates its input once and dispatches by name;
:func:`rebalance_experts` is the drop-in for deepseek-ai/EPLB's function of the same name.

What :func:`plan` takes on (larger problems are refused with a ValueError rather than
planned for minutes; the policies' greedy steps grow with slots x experts per layer):

- at most ``MAX_SLOTS_PER_LAYER`` (8192) slots per layer and ``MAX_SLOTS_PER_GPU`` (1024)
  slots per GPU;
- at most ``MAX_REPLICAS_PER_EXPERT`` (64) slots per logical expert on average;
- at most ``MAX_LAYER_SLOTS`` (2**21) layers x slots.

Loads are normalised per layer before a policy sees them: a layer whose largest load lies
outside [2**-40, 2**40] is scaled by a power of two (exact, so DeepSeek's policy plans the
same layout as on the unscaled load) so that no sum overflows float32; a layer without any
load is planned as if its experts were equally loaded, with a :class:`LoadWarning`.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch

from ..layout import ExpertLayout, Topology
from .deepseek import deepseek_policy
from .default import DefaultPolicyConfig, default_policy

PolicyFn = Callable[..., ExpertLayout]

MAX_SLOTS_PER_LAYER = 8192
MAX_SLOTS_PER_GPU = 1024
MAX_REPLICAS_PER_EXPERT = 64
MAX_LAYER_SLOTS = 1 << 21
# A layer's largest load is kept within [2**-NORM_EXPONENT, 2**NORM_EXPONENT]: sums of a
# few thousand such loads (and their squares) stay far inside float32's range.
NORM_EXPONENT = 40

_POLICIES: dict[str, PolicyFn] = {}
# accepted keyword options per policy; None: any (the function takes **kwargs)
# (each keyed by name, with the function it was registered for: a function put into
# _POLICIES directly, as tests do, is described by its own signature instead)
_OPTIONS: dict[str, tuple[PolicyFn, tuple[str, ...] | None]] = {}
_CHECKS: dict[str, tuple[PolicyFn, Callable[..., object]]] = {}
# what plan() passes itself: never a user's option
_INTERNAL = ("previous", "steps")


class LoadWarning(UserWarning):
    """A load that is planned, but not as given (a layer without any load)."""


def _signature_options(fn: PolicyFn) -> tuple[str, ...] | None:
    """Keyword options of a policy function: its parameters after (weight, topology), less
    ``previous``/``steps``; None when it takes ``**kwargs`` (anything goes)."""
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(
        p.name
        for p in params[2:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _INTERNAL
    )


def register_policy(
    name: str,
    fn: PolicyFn | None = None,
    *,
    replace: bool = False,
    options: Iterable[str] | None = None,
    check: Callable[..., object] | None = None,
):
    """Register ``fn`` under ``name`` (usable as a decorator). Names are case-sensitive.

    Args:
        options: names of the keyword options the policy accepts; by default read from
            ``fn``'s signature (its keyword parameters after ``weight, topology``, less
            ``previous`` and ``steps``, which :func:`plan` passes itself). A policy taking
            ``**kwargs`` without ``options`` accepts any name.
        check: ``check(**options)`` raises ValueError for bad option values; run wherever
            options enter (``EplbConfig``, :func:`plan`).
    """

    def _register(f: PolicyFn) -> PolicyFn:
        if not replace and name in _POLICIES and _POLICIES[name] is not f:
            raise ValueError(f"policy {name!r} is already registered")
        _POLICIES[name] = f
        _OPTIONS[name] = (f, tuple(options) if options is not None else _signature_options(f))
        if check is not None:
            _CHECKS[name] = (f, check)
        else:
            _CHECKS.pop(name, None)
        return f

    return _register(fn) if fn is not None else _register


def accepted_options(policy: str) -> tuple[str, ...] | None:
    """Keyword options ``policy`` accepts (None: any)."""
    fn = get_policy(policy)
    registered, options = _OPTIONS.get(policy, (None, None))
    return options if registered is fn else _signature_options(fn)


def check_policy_options(policy: str, options: dict) -> None:
    """Raise ValueError naming an option ``policy`` does not accept (listing the valid
    ones) or, for policies registered with a ``check``, a bad value."""
    accepted = accepted_options(policy)
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            valid = ", ".join(accepted) if accepted else "none (it takes no options)"
            raise ValueError(
                f"unknown option {unknown[0]!r} for policy {policy!r}; valid options: {valid}"
            )
    registered, check = _CHECKS.get(policy, (None, None))
    if check is not None and registered is get_policy(policy):
        check(**options)


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
    accepted = accepted_options(policy)
    return {"dispatch": dispatch} if accepted is None or "dispatch" in accepted else {}


def _takes(fn: PolicyFn, name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.kind is p.VAR_KEYWORD or p.name == name for p in params)


def check_load(weight: object, name: str = "weight") -> torch.Tensor:
    """Validate a load and return it as float32 on CPU.

    Args:
        weight: [L, E] or [steps, L, E] non-negative finite numbers (tensor, ndarray, list).
    Raises:
        ValueError naming ``name`` and what is wrong (also for a value beyond float32's
        range: :func:`plan` takes those, normalised, but they cannot be stored as float32).
    """
    tensor = _checked(weight, name)
    if tensor.dtype.is_floating_point and tensor.numel():
        peak = float(tensor.max())
        if peak > float(torch.finfo(torch.float32).max):
            raise ValueError(f"{name} holds {peak:g}, beyond float32's range")
    return tensor.to(torch.float32)


def _checked(weight: object, name: str) -> torch.Tensor:
    """Validated load on CPU, float64 or the input's own real dtype (unsigned: float64)."""
    if isinstance(weight, np.ndarray):
        if weight.dtype.kind not in "iuf":
            raise ValueError(f"{name} must hold real numbers, got dtype {weight.dtype}")
        if weight.dtype.kind == "u":
            weight = weight.astype(np.float64)
    try:
        tensor = torch.as_tensor(weight)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} cannot be read as a tensor: {exc}") from exc
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is a meta-device tensor (it holds no values)")
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
    if tensor.dtype in (torch.uint16, torch.uint32, torch.uint64):
        tensor = tensor.to(torch.float64)  # torch has no comparisons on these
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        if torch.isnan(tensor).any():
            raise ValueError(f"{name} contains NaN")
        raise ValueError(f"{name} contains inf")
    if (tensor < 0).any():
        raise ValueError(f"{name} contains negative loads (min {tensor.min().item()})")
    return tensor


def check_work(num_layers: int, num_experts: int, topology: Topology) -> None:
    """Refuse what :func:`plan` would take unreasonably long on (the module's limits)."""
    slots = topology.num_replicas
    if slots > MAX_SLOTS_PER_LAYER:
        raise ValueError(
            f"{slots} slots per layer: plan() takes at most {MAX_SLOTS_PER_LAYER} slots per layer"
        )
    if topology.slots_per_gpu > MAX_SLOTS_PER_GPU:
        raise ValueError(
            f"{topology.slots_per_gpu} slots per GPU: plan() takes at most {MAX_SLOTS_PER_GPU} "
            "slots per GPU"
        )
    if slots > MAX_REPLICAS_PER_EXPERT * num_experts:
        raise ValueError(
            f"{slots} slots for {num_experts} experts: plan() takes at most "
            f"{MAX_REPLICAS_PER_EXPERT} replicas per expert on average"
        )
    if num_layers * slots > MAX_LAYER_SLOTS:
        raise ValueError(
            f"{num_layers} layers x {slots} slots: plan() takes at most {MAX_LAYER_SLOTS} "
            "layer-slots in one call (plan the layers in parts)"
        )


def normalise_load(
    load: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Per-layer power-of-two scaling into float32's comfortable range, zero layers made even.

    Args:
        load: [L, E] or [S, L, E] float64 validated load (finite, >= 0), or [L, E] float32.
    Returns:
        (total [L, E] float32 (the sum over steps), steps [S, L, E] float32 or None, the
        layers that had no load). A layer whose largest load lies outside [2**-40, 2**40] is
        multiplied by a power of two that brings it to [2**31, 2**32), before the steps are
        summed: exact, so every comparison and float32 sum the policies make gives what it
        gives on the unscaled load (barring overflow, which the scaling prevents). A layer
        without load gets load 1 per expert (per step).
    """
    steps = load if load.dim() == 3 else None
    peak = load.amax(-1) if steps is None else load.amax(-1).amax(0)  # [L]
    _, exponent = torch.frexp(peak)
    far = (peak > 0) & (exponent.abs() > NORM_EXPONENT)
    if load.dtype == torch.float32 and steps is None:
        # (plan()'s float32 load: nothing to scale or fill leaves it as it is, else the
        # float64 path; a float32 peak has its float64 value's exponent)
        if not bool(far.any()) and bool(peak.min() > 0):
            return load.clone(), None, []
        return normalise_load(load.to(torch.float64))
    zero = (peak == 0).nonzero().flatten().tolist()
    if bool(far.any()):
        shift = torch.where(far, 32 - exponent, torch.zeros_like(exponent))
        load = load * torch.ldexp(torch.ones_like(peak), shift).unsqueeze(-1)  # [L, 1]
        steps = load if steps is not None else None
    total = load.sum(0) if steps is not None else load
    if zero:
        total = total.clone()
        total[zero] = float(1 if steps is None else steps.shape[0])
        if steps is not None:
            steps = steps.clone()
            steps[:, zero] = 1.0
    return total.to(torch.float32), None if steps is None else steps.to(torch.float32), zero


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
        options: policy-specific keyword options (``accepted_options(policy)``).
    Returns:
        A validated ExpertLayout with ``topology``.
    Raises:
        ValueError for a bad load, topology, option, or a problem beyond the limits above.
    """
    fn = get_policy(policy)
    check_policy_options(policy, options)
    if not isinstance(topology, Topology):
        raise ValueError(f"topology must be a Topology, got {type(topology).__name__}")
    load = _checked(weight, "weight")
    if load.dtype != torch.float32 or load.dim() != 2:  # (normalise_load takes [L, E] float32)
        load = load.to(torch.float64)
    num_layers, num_experts = load.shape[-2:]
    topology.check_experts(num_experts)
    check_work(num_layers, num_experts, topology)
    if previous is not None:
        if previous.phy2log.shape != (num_layers, topology.num_replicas) or (
            previous.num_experts != num_experts
        ):
            raise ValueError(
                f"previous layout has {previous.num_layers} layers x {previous.num_experts} "
                f"experts on {previous.num_slots} slots; the load needs {num_layers} x "
                f"{num_experts} on {topology.num_replicas}"
            )
    total, steps, zero = normalise_load(load)
    if zero:
        which = f"layer {zero[0]} has" if len(zero) == 1 else f"layers {zero} have"
        warnings.warn(
            f"{which} no load: planned as if every expert were equally loaded",
            LoadWarning,
            stacklevel=2,
        )
    if steps is not None and _takes(fn, "steps"):
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


def _check_default_options(**options: object) -> None:
    DefaultPolicyConfig(**options)  # type: ignore[arg-type]


register_policy("deepseek", deepseek_policy)
register_policy(
    "default",
    default_policy,
    options=[f.name for f in dataclasses.fields(DefaultPolicyConfig)],
    check=_check_default_options,
)

__all__ = [
    "MAX_LAYER_SLOTS",
    "MAX_REPLICAS_PER_EXPERT",
    "MAX_SLOTS_PER_GPU",
    "MAX_SLOTS_PER_LAYER",
    "LoadWarning",
    "accepted_options",
    "available_policies",
    "check_load",
    "check_policy_options",
    "check_work",
    "dispatch_option",
    "get_policy",
    "plan",
    "rebalance_experts",
    "register_policy",
]
