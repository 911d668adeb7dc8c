"""Which implementation of a kernel op runs: the Triton kernel or the torch reference.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's
interpreter, used by the tests); the torch reference runs everywhere else. ``EPLB_KERNELS``
set to ``torch`` or ``triton`` forces one. Importing this module never fails: without Triton,
``triton`` and ``tl`` are ``None`` and every op takes the torch path.

The environment is read at call time, not at import, so a test or an engine launcher may set
it after the package is imported (``TRITON_INTERPRET`` itself must still be set before the
kernel modules are imported: Triton decides at decoration time whether to interpret).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:  # Triton is optional: absent on macOS/Windows wheels and on minimal CPU installs.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure (missing, broken CUDA libs) = no Triton
    triton = None
    tl = None

HAS_TRITON = triton is not None
BACKENDS = ("torch", "triton")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(device: torch.device) -> str:
    """``"triton"`` or ``"torch"``: the implementation an op on ``device`` tensors uses.

    ``EPLB_KERNELS=triton`` on a device Triton cannot run on (CPU without the interpreter,
    or no Triton installed) raises ``ValueError`` instead of failing inside a launch.
    """
    forced = os.environ.get("EPLB_KERNELS", "").strip().lower()
    if forced not in ("",) + BACKENDS:
        raise ValueError(f"EPLB_KERNELS must be one of {BACKENDS}, got {forced!r}")
    runnable = HAS_TRITON and (device.type == "cuda" or interpreting())
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not runnable:
            raise ValueError(
                f"EPLB_KERNELS=triton but Triton cannot run on {device.type} tensors here "
                f"(triton installed: {HAS_TRITON}, TRITON_INTERPRET={interpreting()})"
            )
        return "triton"
    return "triton" if runnable else "torch"


@contextlib.contextmanager
def forced_backend(backend: str | None) -> Iterator[None]:
    """Run the ops called inside on ``backend`` ("torch", "triton"; None: the default choice),
    by setting ``EPLB_KERNELS`` (read at call time) and restoring it afterwards."""
    before = os.environ.pop("EPLB_KERNELS", None)
    if backend is not None:
        os.environ["EPLB_KERNELS"] = backend
    try:
        yield
    finally:
        os.environ.pop("EPLB_KERNELS", None)
        if before is not None:
            os.environ["EPLB_KERNELS"] = before


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``); Triton tiles must be powers of 2."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
