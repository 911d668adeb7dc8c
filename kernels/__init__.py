"""Device kernels of eplb-plugin, installed as ``eplb_plugin.kernels``.

Each op has an entry point (``map_and_count.py``, ``shuffle_experts.py``, ``pack.py``) that
checks its arguments (``checks.py``), plans a shuffle's copies (``shuffle_plan.py``), then runs
the Triton kernel or the plain torch maths of ``reference.py``, used wherever Triton cannot
run. ``slot_rows.py`` views slot rows as bytes for both. Kernels depend on nothing in the
core but tensors.

Selection (``_backend.backend_for``): Triton on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1``; torch otherwise. ``EPLB_KERNELS=torch|triton`` forces one. Importing
this package never needs Triton or a GPU. See ``docs/kernels.md``.
"""

from eplb_plugin.kernels._backend import HAS_TRITON, backend_for
from eplb_plugin.kernels.map_and_count import (
    make_map_and_count_workspace,
    map_and_count,
    map_and_count_workspace_size,
)
from eplb_plugin.kernels.pack import bytes_per_slot, pack_slots, unpack_slots
from eplb_plugin.kernels.shuffle_experts import shuffle_experts

__all__ = [
    "HAS_TRITON",
    "backend_for",
    "bytes_per_slot",
    "make_map_and_count_workspace",
    "map_and_count",
    "map_and_count_workspace_size",
    "pack_slots",
    "shuffle_experts",
    "unpack_slots",
]
