"""Test-wide settings.

TRITON_INTERPRET must be set before any Triton kernel module is imported: it makes the
Triton kernels run on CPU tensors, so they are tested against the torch references here.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep each test process to one thread per core pair: tests also spawn gloo process groups.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# `python -m pytest` from the repository root puts the root on sys.path, where our `kernels/`
# and `integrations/` folders would answer to the top-level names `kernels` (Hugging Face's
# package, which transformers >= 5.25 imports when it is installed) and `integrations`. The
# editable install maps them as eplb_plugin.kernels / .integrations without the root, so the
# root is dropped here, before any test imports transformers or spawns a rank (spawned
# processes inherit this sys.path).
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT]
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
