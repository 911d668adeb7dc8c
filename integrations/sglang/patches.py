"""Every patch of SGLang internals, in one module, for SGLang >=0.5.23,<0.6.

Written against SGLang 0.5.23. For the policy swap, ``eplb_algorithms.rebalance_experts`` is
replaced (SGLang looks it up at call time). For the plugin balancer, the dispatch hooks
(``ExpertLocationDispatchInfo.init_new``, ``topk_ids_logical_to_physical``), the recorder
setter (``set_global_expert_distribution_recorder``: SGLang's recorder gets the counting
shim) and ``ModelRunner.initialize`` / ``ModelRunner.forward`` (attach; begin/end of a pass,
then one Balancer step) are wrapped; docs/sglang.md lists every touched attribute and why.
:func:`check_version` refuses other versions and :func:`check_targets` checks that each
patched function still has the signature it was written for. Modules are patched when they
are imported (a post-import hook): the plugin runs in SGLang processes that never load a model.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from ..common import hooks

logger = logging.getLogger("sglang.eplb_plugin")

VERSIONS = hooks.SupportedVersions("SGLang", (0, 5, 23), (0, 6, 0), "pip install sglang==0.5.23")
RUNTIME_ATTR = hooks.RUNTIME_ATTR  # the attribute of a ModelRunner that holds its runtime
parse_version, version_supported = VERSIONS.parse, VERSIONS.supported

ALGORITHMS_MODULE = "sglang.srt.eplb.eplb_algorithms"
DISPATCH_MODULE = "sglang.srt.eplb.expert_location_dispatch"
DISTRIBUTION_MODULE = "sglang.srt.eplb.expert_distribution"
LOCATION_MODULE = "sglang.srt.eplb.expert_location"
RUNNER_MODULE = "sglang.srt.model_executor.model_runner"

# (module, attribute path, leading parameter names the patch relies on)
TARGETS = (
    (ALGORITHMS_MODULE, "rebalance_experts",
     ("tokens_per_expert", "num_physical_experts", "num_local_physical_experts", "num_groups",
      "num_nodes", "algorithm")),
    (DISPATCH_MODULE, "ExpertLocationDispatchInfo.init_new", ("cls", "layer_id", "is_draft")),
    (DISPATCH_MODULE, "topk_ids_logical_to_physical", ("topk_ids", "info", "log2phy_prob")),
    (DISTRIBUTION_MODULE, "set_global_expert_distribution_recorder", ("value",)),
    (RUNNER_MODULE, "ModelRunner.initialize", ("self",)),
    (RUNNER_MODULE, "ModelRunner.forward", ("self", "forward_batch")),
)  # fmt: skip

# The target model runner's runtime of this process (draft runners get none), and what new
# model runners get: the plugin switch's ``active_config`` (set by ``install``).
_STATE: dict[str, Any] = {"runtime": None, "active": lambda: None}


# ---------------------------------------------------------------------- version
def installed_version() -> str:
    """The installed SGLang's version; ValueError when SGLang is not installed."""
    import importlib.metadata as metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError as exc:
        raise VERSIONS.not_installed() from exc


def check_version(version: str | None = None) -> str:
    """Return the SGLang version, or raise ValueError when the patches were not written for it."""
    return VERSIONS.check(installed_version() if version is None else version)


def check_signature(fn: Callable, expected: tuple[str, ...], where: str) -> None:
    """ValueError unless ``fn``'s leading parameters are ``expected`` (names, in order)."""
    fn = inspect.unwrap(fn, stop=lambda f: not getattr(f, hooks.MARK, False))
    params = list(inspect.signature(fn).parameters)
    if tuple(params[: len(expected)]) != tuple(expected):
        raise ValueError(
            f"SGLang's {where} takes ({', '.join(params)}); eplb-plugin's patch was written for "
            f"({', '.join(expected)}, ...): this SGLang is not one the integration supports"
        )


def check_targets(modules: tuple[str, ...] | None = None) -> None:
    """Check the signature of every target in the already imported ``modules`` (default:
    every target module that is imported now)."""
    for module_name, path, expected in TARGETS:
        if modules is not None and module_name not in modules:
            continue
        module = sys.modules.get(module_name)
        if module is None:
            continue
        try:
            _, _, raw = hooks.resolve(module, path)
        except (AttributeError, KeyError) as exc:
            raise ValueError(
                f"SGLang's {module_name} has no {path}: this SGLang is not one the "
                "integration supports"
            ) from exc
        fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        check_signature(fn, expected, f"{module_name}.{path}")


# ---------------------------------------------------------------------- patching
def _set(module: Any, path: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``module.path`` by ``make(original)`` (idempotent); modules of SGLang that
    imported a module-level original by name are rebound."""
    owner, name, _ = hooks.resolve(module, path)
    hooks.wrap(owner, name, make, rebind="sglang")


def _unset(module: Any, path: str) -> None:
    owner, name, _ = hooks.resolve(module, path)
    hooks.unwrap(owner, name, rebind="sglang")


_FINDER = hooks.PostImportHooks()
_PENDING = _FINDER.targets
_when_imported = _FINDER.when_imported


# ---------------------------------------------------------------------- policy swap
def swap_policy(
    policy: str, algorithms: tuple[str, ...] | None = None, options: dict | None = None
) -> None:
    """Make ``eplb_algorithms.rebalance_experts`` plan with eplb-plugin ``policy``."""
    from .policy import DEFAULT_ALGORITHMS, make_rebalance_experts

    names = tuple(algorithms or DEFAULT_ALGORITHMS)

    def patch(module: Any) -> None:
        check_targets((ALGORITHMS_MODULE,))
        _unset(module, "rebalance_experts")
        _set(module, "rebalance_experts",
             lambda orig: make_rebalance_experts(orig, policy, names, current_phy2log,
                                                 options))  # fmt: skip

    _when_imported(ALGORITHMS_MODULE, patch)


def restore_policy() -> None:
    """Undo :func:`swap_policy` (SGLang's own algorithms answer again)."""
    _PENDING.pop(ALGORITHMS_MODULE, None)
    module = sys.modules.get(ALGORITHMS_MODULE)
    if module is not None:
        _unset(module, "rebalance_experts")


def current_phy2log() -> Any:
    """SGLang's ``physical_to_logical_map`` in service ([L, P] on CPU), or None."""
    module = sys.modules.get(LOCATION_MODULE)
    if module is None:
        return None
    try:
        metadata = module.get_global_expert_location_metadata()
    except Exception:  # noqa: BLE001 - no published runtime context: nothing in service
        return None
    return None if metadata is None else metadata.physical_to_logical_map_cpu


# ---------------------------------------------------------------------- plugin balancer
def current_runtime() -> Any:
    return _STATE["runtime"]


def set_current_runtime(runtime: Any) -> None:
    """Make ``runtime`` (an SglangEplb, or None) the one the dispatch and recorder hooks of
    this process use; :func:`attach` does this for the target model runner."""
    _STATE["runtime"] = runtime


def install(active: Callable[[], Any] | None = None) -> None:
    """Patch the dispatch, recorder and model-runner hooks (now or at import); idempotent.
    ``active()`` returns the EplbConfig a model runner initialized from now on is balanced
    with (None: off)."""
    if active is not None:
        _STATE["active"] = active
    _when_imported(DISPATCH_MODULE, _patch_dispatch)
    _when_imported(DISTRIBUTION_MODULE, _patch_distribution)
    _when_imported(RUNNER_MODULE, _patch_runner)


def uninstall() -> None:
    """Undo :func:`install` on the modules imported so far (tests; runners keep runtimes)."""
    for name, paths in (
        (DISPATCH_MODULE, ("ExpertLocationDispatchInfo.init_new", "topk_ids_logical_to_physical")),
        (DISTRIBUTION_MODULE, ("set_global_expert_distribution_recorder",)),
        (RUNNER_MODULE, ("ModelRunner.initialize", "ModelRunner.forward")),
    ):
        _PENDING.pop(name, None)
        module = sys.modules.get(name)
        if module is not None:
            for path in paths:
                _unset(module, path)


def _patch_dispatch(module: Any) -> None:
    check_targets((DISPATCH_MODULE,))
    info_cls = module.ExpertLocationDispatchInfo

    def wrap_init_new(orig: Callable) -> Callable:
        def init_new(cls, layer_id, *args, is_draft: bool = False, **kwargs):
            runtime = current_runtime()
            if runtime is not None and not is_draft:
                info = runtime.dispatch_info(layer_id, info_cls)
                if info is not None:
                    return info
            return orig(cls, layer_id, *args, is_draft=is_draft, **kwargs)

        return init_new

    def wrap_map(orig: Callable) -> Callable:
        from .runtime import route

        def topk_ids_logical_to_physical(topk_ids, info, *args, **kwargs):
            layer_route = getattr(info, "eplb_plugin", None)
            if layer_route is not None:
                return route(topk_ids, layer_route)
            return orig(topk_ids, info, *args, **kwargs)

        return topk_ids_logical_to_physical

    _set(module, "ExpertLocationDispatchInfo.init_new", wrap_init_new)
    _set(module, "topk_ids_logical_to_physical", wrap_map)


def _patch_distribution(module: Any) -> None:
    check_targets((DISTRIBUTION_MODULE,))

    def wrap_set(orig: Callable) -> Callable:
        def set_global_expert_distribution_recorder(value, *args, **kwargs):
            return orig(shim(value), *args, **kwargs)

        return set_global_expert_distribution_recorder

    _set(module, "set_global_expert_distribution_recorder", wrap_set)


def shim(recorder: Any) -> Any:
    """``recorder`` wrapped in the counting shim of this process's runtime (if any)."""
    from .runtime import RecorderShim

    runtime = current_runtime()
    if runtime is None or recorder is None or isinstance(recorder, RecorderShim):
        return recorder
    return RecorderShim(recorder, runtime)


def _patch_runner(module: Any) -> None:
    check_targets((RUNNER_MODULE,))

    _set(module, "ModelRunner.initialize", hooks.after_call(attach))
    _set(module, "ModelRunner.forward", hooks.around_forward(num_tokens, step=True))


def attach(runner: Any) -> Any:
    """Give ``runner`` (an SGLang ModelRunner whose model just loaded) the plugin balancer.

    Does nothing for draft runners, when the plugin balancer is off in this process, or when
    the model has no expert-location support (no metadata / no routed expert weights).
    """
    from .runtime import SglangEplb, count_source

    config = _STATE["active"]()
    existing = getattr(runner, RUNTIME_ATTR, None)
    if config is None or existing is not None or getattr(runner, "is_draft_worker", False):
        return existing
    if getattr(runner, "eplb_manager", None) is not None:
        # two balancers would move the same weights; the launcher never asks for both
        raise ValueError(
            "SGLang's own EPLB is running (--enable-eplb was given to SGLang) while "
            "eplb-plugin's balancer is on; start SGLang without its --enable-eplb (the "
            "`eplb sglang launch_server` launcher does this)"
        )
    location = sys.modules[LOCATION_MODULE]
    metadata = location.get_global_expert_location_metadata()
    weights = getattr(getattr(runner, "model", None), "routed_experts_weights_of_layer", None)
    if metadata is None or not weights:
        logger.warning(
            "eplb-plugin: the model has no expert-location metadata or routed expert weights "
            "(SGLang's get_model_config_for_expert_location); balancer not attached"
        )
        return None
    from sglang.srt.runtime_context import get_exec, get_parallel

    moe = get_exec().moe
    source = count_source(
        moe.moe_a2a_backend, moe.deepep_mode, moe.expert_distribution_recorder_mode
    )
    ep_rank = int(get_parallel().moe_ep_rank)
    model_config = runner.model_config
    expert_config = location.ModelConfigForExpertLocation.from_model_config(model_config)
    rows = metadata.physical_to_logical_map_cpu.shape[0]
    layer_ids = sorted(int(k) for k in weights if 0 <= int(k) < rows)
    if len(layer_ids) < len(weights):
        logger.warning(
            "eplb-plugin: MoE layers %s lie outside SGLang's expert-location metadata (%d "
            "layers) and keep SGLang's mapping",
            sorted(int(k) for k in weights if not 0 <= int(k) < rows), rows,
        )  # fmt: skip
    runtime = SglangEplb(
        config, metadata.physical_to_logical_map_cpu, metadata.num_logical_experts, layer_ids,
        [list(weights[k]) for k in layer_ids], ep_rank, metadata.ep_size,
        num_groups=getattr(expert_config, "num_groups", None),
        num_nodes=_nnodes(get_parallel()),
        rank_invariant=moe.moe_a2a_backend in (None, "none"), source=source,
        group=ep_group(),
        on_layout=lambda full, ids: refresh_metadata(model_config, full, ids, ep_rank),
    )  # fmt: skip
    setattr(runner, RUNTIME_ATTR, runtime)
    set_current_runtime(runtime)
    distribution = sys.modules.get(DISTRIBUTION_MODULE)
    if distribution is not None:
        # the recorder SGLang installed before the model loaded gets the counting shim
        distribution.set_global_expert_distribution_recorder(
            distribution.get_global_expert_distribution_recorder()
        )
    runtime.log_attached(len(layer_ids), f", counts from {source}")
    return runtime


def _nnodes(parallel: Any) -> int:
    try:
        return int(parallel.nnodes or 1)
    except Exception:  # noqa: BLE001 - not published: a single node
        return 1


def ep_group() -> Any:
    """The torch.distributed group of SGLang's MoE EP ranks, or None (the world group)."""
    try:
        from sglang.srt.distributed.parallel_state import get_moe_ep_group

        return get_moe_ep_group().device_group
    except Exception:  # noqa: BLE001 - groups not built (single process): the world group
        return None


def refresh_metadata(model_config: Any, phy2log: Any, layer_ids: list[int], ep_rank: int) -> None:
    """Rebuild SGLang's expert-location metadata for ``layer_ids`` from ``phy2log``
    ([num_model_layers, P]) in place, with SGLang's own ``init_by_mapping`` and ``update``."""
    location = sys.modules[LOCATION_MODULE]
    current = location.get_global_expert_location_metadata()
    new = location.ExpertLocationMetadata.init_by_mapping(
        model_config, phy2log, moe_ep_rank=ep_rank
    )
    current.update(new, update_layer_ids=list(layer_ids))


def num_tokens(forward_batch: Any) -> int:
    """Tokens this rank routes in a pass: 0 for SGLang's idle (DP-attention) batches."""
    mode = getattr(forward_batch, "forward_mode", None)
    is_idle = getattr(mode, "is_idle", None)
    if callable(is_idle) and is_idle():
        return 0
    input_ids = getattr(forward_batch, "input_ids", None)
    if input_ids is not None and hasattr(input_ids, "shape"):
        return int(input_ids.shape[0])
    return int(getattr(forward_batch, "batch_size", 0) or 0)
