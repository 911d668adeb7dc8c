"""The loaded vLLM model as the plugin balancer sees it: MoE layers, expert tensors, EP group.

Reads (and, for the slot count, adjusts) vLLM objects the patched model runner hands over;
imports vLLM only in :func:`ep_group`. The facts behind each attribute are in docs/vllm.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class MoELayer:
    """One fused MoE layer of a loaded vLLM model, as the runtime needs it.

    Attributes:
        name: vLLM's layer name (``model.layers.3.mlp.experts``).
        router: the layer's router (a ``BaseRouter``); its ``_apply_eplb_mapping`` is hooked.
        experts: the layer's ``RoutedExperts`` (owner of ``w13_weight``, ``w2_weight``, ...).
        num_experts: logical routed experts E of the model.
        num_local: experts this rank loaded (E / EP size).
        num_groups: expert groups of the router (1 without group-limited routing).
        ep_rank, ep_size: this rank in the expert-parallel group and the group's size
            (0 and 1 without expert parallelism).
    """

    name: str
    router: Any
    experts: Any
    num_experts: int
    num_local: int
    num_groups: int
    ep_rank: int
    ep_size: int


# Parameters of RoutedExperts that are not per-expert data (vLLM's own EPLB skips the same
# ones in RoutedExperts.get_expert_weights); the score-correction bias is indexed by
# logical expert and must never follow the slots.
NON_EXPERT_PARAMS = frozenset(
    {"e_score_correction_bias", "w13_input_scale", "w2_input_scale", "hash_indices_table"}
)


def moe_layers(runner) -> list[MoELayer]:
    """The fused MoE layers of ``runner.model``, in model order; ValueError if unsupported."""
    config = runner.vllm_config.compilation_config
    names = list(getattr(config, "static_all_moe_layers", []))
    context = config.static_forward_context
    in_model = {id(m) for m in runner.model.modules()}
    layers = []
    for name in names:
        moe = context.get(name)
        if moe is None or id(moe) not in in_model:
            continue  # a drafter's layers, or a layer of an earlier model in this process
        layers.append(describe_layer(name, moe))
    return layers


def describe_layer(name: str, moe) -> MoELayer:
    """Read one MoERunner; ValueError naming the layer when the plugin cannot serve it."""
    router = getattr(moe, "router", None)
    experts = getattr(moe, "routed_experts", None)
    if router is None or experts is None or not hasattr(router, "_apply_eplb_mapping"):
        raise ValueError(
            f"MoE layer {name!r} ({type(moe).__name__}) has no router with the "
            "_apply_eplb_mapping slot this integration hooks (vLLM's BaseRouter)"
        )
    if getattr(router, "eplb_state", None) is not None:
        raise ValueError(
            f"MoE layer {name!r} runs vLLM's own EPLB; start vLLM without --enable-eplb when "
            "the plugin balancer is on (the `eplb vllm` launcher does this)"
        )
    method = experts.quant_method
    if getattr(method, "is_monolithic", False):
        raise ValueError(
            f"MoE layer {name!r} uses a monolithic kernel ({type(method).__name__}) that "
            "routes inside the kernel, so routing cannot be mapped to physical slots"
        )
    parallel = experts.moe_config.moe_parallel_config
    if getattr(parallel, "use_all2all_kernels", False):
        raise ValueError(
            f"MoE layer {name!r} dispatches with all-to-all kernels ({parallel.all2all_backend}): "
            "their buffers are sized for the logical expert count when vLLM builds the layer, "
            "so redundant slots cannot be added; not supported by the plugin balancer"
        )
    use_ep = bool(getattr(parallel, "use_ep", False))
    ep_size = int(parallel.ep_size) if use_ep else 1
    ep_rank = int(parallel.ep_rank) if use_ep else 0
    strategy = getattr(experts, "expert_placement_strategy", "linear")
    if use_ep and strategy != "linear":
        raise ValueError(
            f"MoE layer {name!r}: expert placement {strategy!r} is not supported; use vLLM's "
            "default linear placement (--expert-placement-strategy linear)"
        )
    return MoELayer(
        name=name,
        router=router,
        experts=experts,
        num_experts=int(experts.global_num_experts),
        num_local=int(experts.local_num_experts),
        num_groups=int(getattr(experts, "num_expert_group", None) or 1),
        ep_rank=ep_rank,
        ep_size=ep_size,
    )


def expert_params(experts, num_local: int) -> list[tuple[str, Any]]:
    """(name, Parameter) of every per-expert tensor of a RoutedExperts: dim 0 = local experts.

    The same parameters vLLM's own EPLB moves (``RoutedExperts.get_expert_weights``): all of
    them, submodules included, but the shared ones. One left behind would keep its old rows
    after a rebalance, so a parameter that is not per-expert is an error, not skipped.
    """
    found = []
    for name, param in experts.named_parameters():
        if name in NON_EXPERT_PARAMS or param.dim() == 0:
            continue
        if param.shape[0] != num_local:
            raise ValueError(
                f"{type(experts).__name__}.{name} has shape {tuple(param.shape)}, not "
                f"[{num_local} local experts, ...]: the plugin cannot move it with the slots"
            )
        found.append((name, param))
    if not found:
        raise ValueError(f"{type(experts).__name__} holds no per-expert parameter")
    return found


def resize_experts(layer: MoELayer, num_slots: int, num_local_slots: int) -> None:
    """Tell a RoutedExperts it now serves ``num_slots`` physical slots, ``num_local_slots``
    of them here (its tensors must already have ``num_local_slots`` rows)."""
    experts = layer.experts
    experts.global_num_experts = num_slots
    if layer.ep_size > 1:
        # vLLM's linear placement (global id // local count = rank) is exactly our slot
        # placement, so its own map maps physical slot ids to local rows.
        experts.update_expert_map()
    experts.local_num_experts = num_local_slots


def mark_compile_cache(runner, marker: dict) -> None:
    """Make vLLM's compile caches tell graphs with the plugin's router op from graphs without.

    vLLM keys its torch.compile caches by ``VllmConfig.compute_hash()``, which covers
    ``additional_config``; the model compiles after ``load_model``, so an entry added here
    keeps a cached graph compiled without the hook (or with other settings) from being
    reused for this model.
    """
    config = runner.vllm_config
    extra = getattr(config, "additional_config", None)
    if extra is None:
        config.additional_config = extra = {}
    if isinstance(extra, dict):
        extra["eplb_plugin"] = marker


def set_router_mapping(router, mapping: Callable) -> None:
    """Route ``router``'s logical ids through ``mapping(topk_ids) -> physical ids``."""
    # An instance attribute shadows BaseRouter._apply_eplb_mapping for this router only.
    router._apply_eplb_mapping = mapping


def node_count(layer: MoELayer) -> int | None:
    """Nodes the EP ranks span, as vLLM's own EPLB reads them (``get_node_count``), or None
    without expert parallelism or before vLLM's distributed state exists."""
    if layer.ep_size <= 1:
        return None
    try:
        from vllm.distributed.parallel_state import get_node_count

        return int(get_node_count())
    except (ImportError, AssertionError, TypeError, ValueError):
        return None


def ep_group(layer: MoELayer):
    """torch.distributed group of the EP ranks (vLLM's), or None without expert parallelism."""
    if layer.ep_size <= 1:
        return None
    from vllm.distributed.parallel_state import get_ep_group

    return get_ep_group().device_group
