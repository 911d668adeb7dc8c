"""Patching an engine's internals: post-import hooks, patch marks, supported versions.

Engines offer no extension point for what the plugin needs, so the adapters patch. Modules
are patched when they are imported (:class:`PostImportHooks`), not by importing them: the
plugin's entry point runs in engine processes that never load a model, and importing a model
runner can take seconds. Every patched function carries :data:`MARK`, which makes patching
idempotent and lets it be undone.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from typing import Any

# The attribute a patched function carries (the original is its ``__wrapped__``).
MARK = "__eplb_plugin_patch__"
# The attribute of an engine's model runner that holds its EngineRuntime.
RUNTIME_ATTR = "_eplb_plugin_runtime"


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


class PostImportHooks(importlib.abc.MetaPathFinder):
    """Runs ``targets[name](module)`` right after module ``name`` is imported.

    Attributes:
        targets: module name -> patch function.
    """

    def __init__(self) -> None:
        self.targets: dict[str, Callable[[Any], None]] = {}

    def find_spec(self, fullname, path, target=None):
        patch = self.targets.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec

    def when_imported(self, name: str, patch: Callable[[Any], None] | None = None) -> None:
        """Patch module ``name`` now if it is imported, else as soon as it is (with ``patch``,
        or the target already registered for it)."""
        if patch is not None:
            self.targets[name] = patch
        module = sys.modules.get(name)
        if module is not None:
            self.targets[name](module)
        elif self not in sys.meta_path:
            sys.meta_path.insert(0, self)


# ---------------------------------------------------------------------- patch marks
def is_patched(raw: Any) -> bool:
    fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
    return bool(getattr(fn, MARK, False))


def resolve(module: Any, path: str) -> tuple[Any, str, Any]:
    """(owner, attribute name, raw attribute) of ``path`` (``"Cls.method"`` or ``"fn"``); a
    class's attribute must be defined on the class itself (KeyError otherwise)."""
    owner = module
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    return owner, name, raw


def wrap(owner: Any, name: str, make: Callable[[Callable], Callable], rebind: str = "") -> bool:
    """Replace ``owner.name`` by ``make(original)``, marked (idempotent: False when already
    patched). A classmethod stays a classmethod. With ``rebind`` (a module-name prefix), the
    modules under it that imported a module-level function by name are pointed at the new one.
    """
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if is_patched(raw):
        return False
    is_classmethod = isinstance(raw, classmethod)
    original = raw.__func__ if is_classmethod else raw
    new = make(original)
    functools.update_wrapper(new, original)
    setattr(new, MARK, True)
    setattr(owner, name, classmethod(new) if is_classmethod else new)
    if rebind and not is_classmethod and not isinstance(owner, type):
        _rebind(original, new, rebind)
    return True


def unwrap(owner: Any, name: str, rebind: str = "") -> bool:
    """Undo :func:`wrap` (False when ``owner.name`` is not patched)."""
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if not is_patched(raw):
        return False
    is_classmethod = isinstance(raw, classmethod)
    fn = raw.__func__ if is_classmethod else raw
    original = fn.__wrapped__
    setattr(owner, name, classmethod(original) if is_classmethod else original)
    if rebind and not is_classmethod and not isinstance(owner, type):
        _rebind(fn, original, rebind)
    return True


def _rebind(old: Any, new: Any, prefix: str) -> None:
    """Point ``from X import name`` bindings of ``old`` in modules under ``prefix`` at ``new``."""
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith(prefix):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)


# ---------------------------------------------------------------------- runner wrappers
def after_call(hook: Callable[[Any], Any]) -> Callable[[Callable], Callable]:
    """A wrapper factory for :func:`wrap`: the method runs, then ``hook(self)``."""

    def make(orig: Callable) -> Callable:
        def method(self, *args, **kwargs):
            result = orig(self, *args, **kwargs)
            hook(self)
            return result

        return method

    return make


def around_forward(num_tokens: Callable[[Any], int], step: bool) -> Callable[[Callable], Callable]:
    """A wrapper factory for :func:`wrap` of a runner's forward ``(self, batch, ...)``: the
    runner's EngineRuntime (attribute :data:`RUNTIME_ATTR`) is told how many tokens the pass
    routes before it and that it ended after it, then steps when ``step``."""

    def make(orig: Callable) -> Callable:
        def forward(self, batch, *args, **kwargs):
            runtime = getattr(self, RUNTIME_ATTR, None)
            if runtime is None:
                return orig(self, batch, *args, **kwargs)
            runtime.begin_forward(num_tokens(batch))
            try:
                output = orig(self, batch, *args, **kwargs)
            finally:
                runtime.end_forward()
            if step:
                runtime.step()
            return output

        return forward

    return make


# ---------------------------------------------------------------------- versions
class SupportedVersions:
    """The engine versions an adapter's patches were written for: ``[minimum, below)``.

    Args:
        engine: the engine's name in messages (``"vLLM"``).
        minimum, below: (major, minor, patch) bounds.
        install: how to install a supported version (appended to "not installed").
    """

    def __init__(
        self, engine: str, minimum: tuple[int, int, int], below: tuple[int, int, int], install: str
    ) -> None:
        self.engine, self.minimum, self.below, self.install = engine, minimum, below, install
        self.range = f">={'.'.join(map(str, minimum))},<{below[0]}.{below[1]}"

    def parse(self, version: str) -> tuple[int, int, int]:
        """``"0.32.0"``, ``"0.32.1+cpu"``, ``"0.5.23.post1"``, ``"0.5.24rc0"`` -> (major, minor,
        patch); ValueError when there is no leading number."""
        parts = []
        for piece in version.split("+")[0].split(".")[:3]:
            digits = ""
            for ch in piece:
                if not ch.isdigit():
                    break
                digits += ch
            if not digits:
                raise ValueError(f"cannot read {self.engine} version {version!r}")
            parts.append(int(digits))
        while len(parts) < 3:
            parts.append(0)
        return parts[0], parts[1], parts[2]

    def supported(self, version: str) -> bool:
        return self.minimum <= self.parse(version) < self.below

    def not_installed(self) -> ValueError:
        return ValueError(
            f"{self.engine} is not installed in this environment (the {self.engine} "
            f"integration needs {self.engine} {self.range}; {self.install})"
        )

    def check(self, version: str) -> str:
        """Return ``version``, or raise ValueError when the patches were not written for it."""
        if not self.supported(version):
            raise ValueError(
                f"eplb-plugin's {self.engine} integration patches {self.engine} internals and "
                f"was written for {self.engine} {self.range}; this environment has "
                f"{self.engine} {version}. Install a supported {self.engine} or an eplb-plugin "
                "release made for this one."
            )
        return version


__all__ = [
    "MARK",
    "RUNTIME_ATTR",
    "PostImportHooks",
    "SupportedVersions",
    "after_call",
    "around_forward",
    "is_patched",
    "resolve",
    "unwrap",
    "wrap",
]
