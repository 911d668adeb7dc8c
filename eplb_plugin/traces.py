"""Trace files: load traces ([steps, L, E] counts) and routing traces (per-token expert ids).

Load trace: a [L, E] or [steps, L, E] array of non-negative counts in one of
``.pt`` (a tensor, or a dict holding one under ``load``), ``.npy``, ``.npz`` or
``.safetensors`` (the array under ``load``, or the file's only array).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .policies import check_load

LOAD_KEY = "load"
LOAD_SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".safetensors")


def _only_or_key(arrays: dict, path: str, keys: tuple[str, ...] = (LOAD_KEY,)):
    for key in keys:
        if key in arrays:
            return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise ValueError(
        f"{path!r} holds arrays {sorted(arrays)}; expected one named {' or '.join(keys)!r}"
    )


def _read_arrays(path: str, suffix: str) -> dict:
    """Every array in a load file, by name (a bare array is named ``load``)."""
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return obj if isinstance(obj, dict) else {LOAD_KEY: obj}
    if suffix == ".npy":
        return {LOAD_KEY: np.load(path, allow_pickle=False)}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    from safetensors.torch import load_file

    return load_file(path)


def read_load(path: str | os.PathLike) -> torch.Tensor:
    """Read a load trace.

    Returns:
        float32 [L, E] or [steps, L, E], validated (finite, non-negative).
    Raises:
        ValueError for a missing file, an unknown suffix or bad content.
    """
    path = os.fspath(path)
    if os.path.isdir(path) or path.lower().endswith(".json"):
        from .formats import read_sglang_dump  # SGLang dump folders, .json logical_count

        return check_load(read_sglang_dump(path), name=f"load in {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"load file {path!r} does not exist")
    suffix = Path(path).suffix.lower()
    if suffix not in LOAD_SUFFIXES:
        raise ValueError(
            f"load file {path!r}: unknown suffix {suffix!r} (use {', '.join(LOAD_SUFFIXES)})"
        )
    try:
        arrays = _read_arrays(path, suffix)
    except Exception as exc:  # corrupt or foreign files: say which file
        raise ValueError(f"cannot read load file {path!r}: {exc}") from exc
    from .formats import is_foreign_load, load_from_dict  # SGLang dumps, vLLM windows

    if LOAD_KEY not in arrays and is_foreign_load(arrays):
        data = load_from_dict(arrays, path)
    else:
        data = _only_or_key(arrays, path, (LOAD_KEY, "logical_count"))
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    return check_load(data, name=f"load in {path!r}")


def write_load(path: str | os.PathLike, load: torch.Tensor) -> None:
    """Write a load trace ([L, E] or [steps, L, E]) atomically; format by suffix."""
    load = check_load(load)
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix not in LOAD_SUFFIXES:
        raise ValueError(f"load file {path!r}: unknown suffix {suffix!r}")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".load-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        if suffix in (".pt", ".pth"):
            torch.save({LOAD_KEY: load}, tmp)
        elif suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, load.numpy())
        elif suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **{LOAD_KEY: load.numpy()})
        else:
            from safetensors.torch import save_file

            save_file({LOAD_KEY: load.contiguous()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
