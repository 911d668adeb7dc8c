"""Test-wide settings.

TRITON_INTERPRET must be set before any Triton kernel module is imported: it makes the
Triton kernels run on CPU tensors, so they are tested against the torch references here.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep each test process to one thread per core pair: tests also spawn gloo process groups.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRACES = ROOT / "examples" / "traces"


@pytest.fixture
def traces_dir() -> pathlib.Path:
    return TRACES


def pytest_collection_modifyitems(config, items):
    """The long fault soak (minutes per case) runs only when ``-m`` names it."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long fault soak: run with pytest -m soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
