"""Fixtures of the vLLM tests: tiny MoE checkpoints built once per session (no download)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family)`` -> folder of a tiny random-weight checkpoint of that family."""
    from tiny_models import build_tiny_model

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            folder = tmp_path_factory.mktemp("models") / family
            built[family] = Path(build_tiny_model(str(folder), family))
        return built[family]

    return get
