"""Fixtures for the tests that run SGLang's own code (``.venv-sglang``; see .ci/sglang.sh).

SGLang is installed there with ``--no-deps`` plus the pure-Python packages its EPLB modules
import, on CPU torch. Three things stand in for what a CPU machine lacks, none of them the
code under test:

- ``SGLANG_USE_CPU_ENGINE=1``: SGLang's own switch that makes ``get_device()`` answer "cpu";
- ``torch.cpu.empty_cache``: SGLang calls ``torch.get_device_module().empty_cache()`` before
  its first dump; the CPU module has none, so a no-op is provided;
- ``torchvision``: SGLang's config package imports it for multimodal models; no CPU build
  for torch 2.13 exists on the package index, so when it is missing an import-only
  placeholder is installed (after transformers has decided torchvision is unavailable);
  using any of it raises.

A model is SGLang's business only through ``ModelConfigForExpertLocation`` (layers, logical
experts, groups), which SGLang gets from the model class; tests give it directly.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import socket
import sys
import types

import pytest

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


class _Missing(type):
    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return cls


class _Unavailable(metaclass=_Missing):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not installed (test placeholder)")


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def __getattr__(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Unavailable

        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


def _prepare_environment() -> None:
    import torch

    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a CUDA build that cannot load
        sys.modules.pop("torchvision", None)
        from transformers.utils import import_utils

        # transformers caches these answers; ask before the placeholder exists
        import_utils.is_torchvision_available()
        import_utils.is_torchvision_v2_available()
        import_utils.is_torchvision_greater_or_equal("0.27")
        if not any(isinstance(f, _TorchvisionPlaceholder) for f in sys.meta_path):
            sys.meta_path.append(_TorchvisionPlaceholder())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sglang_eplb():
    """SGLang's EPLB modules, imported for real; a one-process gloo group (SGLang's dump
    all-reduces its counts)."""
    pytest.importorskip("sglang.srt.eplb")
    _prepare_environment()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    from sglang.srt.eplb import (
        eplb_algorithms,
        expert_distribution,
        expert_location,
        expert_location_dispatch,
    )

    return types.SimpleNamespace(
        algorithms=eplb_algorithms,
        distribution=expert_distribution,
        location=expert_location,
        dispatch=expert_location_dispatch,
    )


@pytest.fixture
def model(sglang_eplb, monkeypatch):
    """Set the model's (layers, logical experts, groups) as SGLang sees them."""

    def set_model(num_layers: int, num_experts: int, num_groups: int | None = None):
        location = sglang_eplb.location
        config = location.ModelConfigForExpertLocation(
            num_layers=num_layers, num_logical_experts=num_experts, num_groups=num_groups
        )
        monkeypatch.setattr(
            location.ModelConfigForExpertLocation, "from_model_config",
            staticmethod(lambda model_config: config),
        )  # fmt: skip
        return config

    return set_model


@pytest.fixture
def server_args(sglang_eplb):
    """``with server_args(ep_size=2, ...)``: SGLang's own scoped ServerArgs override (it
    publishes the config bags that ``get_exec()`` / ``get_parallel()`` read)."""
    from sglang.srt.runtime_context import get_context

    def override(**fields):
        fields.setdefault("device", "cpu")
        size = fields.get("ep_size", 1)
        fields.setdefault("tp_size", size)
        return get_context().override_server_args(**fields)

    return override
