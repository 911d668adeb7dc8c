"""Trace files: load traces ([steps, L, E] counts) and routing traces (per-token expert ids).

Load trace: a [L, E] or [steps, L, E] array of non-negative counts in one of
``.pt`` (a tensor, or a dict holding one under ``load``), ``.npy``, ``.npz`` or
``.safetensors`` (the array under ``load``, or the file's only array).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_write, require_file
from .names import LOAD_SUFFIXES as LOAD_SUFFIXES
from .policies import check_load

LOAD_KEY = "load"


def _only_or_key(arrays: dict, path: str, keys: tuple[str, ...] = (LOAD_KEY,)):
    for key in keys:
        if key in arrays:
            return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise ValueError(
        f"{path!r} holds arrays {sorted(arrays)}; expected one named {' or '.join(keys)!r}"
    )


# Arrays that mark a file as another kind than a load trace: a layout's single map would
# otherwise be read as a load of slot ids.
_OTHER_KINDS = (
    ("phy2log", "an eplb layout (pass it as --layout)"),
    ("physical_to_logical_map", "an SGLang layout (pass it as --layout)"),
    ("topk_ids", "a routing trace (eplb simulate --trace reads it)"),
)


def _refuse_other_kind(arrays: dict, path: str) -> None:
    for key, kind in _OTHER_KINDS:
        if key in arrays:
            raise ValueError(f"load file {path!r} holds {key!r}: it is {kind}, not a load trace")


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"


class _BadFile(ValueError):
    """A file that is not what its suffix says (reported as is, without numpy's wording)."""


def _check_magic(path: str, magic: bytes, what: str) -> None:
    with open(path, "rb") as f:
        if f.read(len(magic)) != magic:
            raise _BadFile(f"it is not {what} (its first bytes say otherwise)")


def _np_load(source, key: str | None = None) -> np.ndarray:
    """``np.load`` (or an .npz member) without pickles; object arrays get our own words
    instead of numpy's hint to pass allow_pickle=True (never done: pickles run code).
    Big-endian arrays (a valid .npy) come back in native byte order, which torch needs."""
    try:
        array = np.load(source, allow_pickle=False) if key is None else source[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            where = "it" if key is None else f"array {key!r}"
            raise _BadFile(f"{where} holds Python objects, not numbers") from None
        raise
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _read_arrays(path: str, suffix: str) -> dict:
    """Every array in a load file, by name (a bare array is named ``load``)."""
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return obj if isinstance(obj, dict) else {LOAD_KEY: obj}
    if suffix == ".npy":
        _check_magic(path, NPY_MAGIC, "a .npy file")
        return {LOAD_KEY: _np_load(path)}
    if suffix == ".npz":
        _check_magic(path, ZIP_MAGIC, "an .npz file (a zip archive)")
        with np.load(path, allow_pickle=False) as npz:
            return {k: _np_load(npz, k) for k in npz.files}
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
    require_file(path, "load file")
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
        if LOAD_KEY not in arrays:
            _refuse_other_kind(arrays, path)
        data = _only_or_key(arrays, path, (LOAD_KEY, "logical_count"))
    return check_load(data, name=f"load in {path!r}")


def write_load(path: str | os.PathLike, load: torch.Tensor) -> None:
    """Write a load trace ([L, E] or [steps, L, E]) atomically; format by suffix."""
    load = check_load(load)
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix not in LOAD_SUFFIXES:
        raise ValueError(f"load file {path!r}: unknown suffix {suffix!r}")

    def write(tmp: str) -> None:
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

    atomic_write(path, write)


# ---------------------------------------------------------------------- routing traces
# Routing trace: ``.npz`` with ``topk_ids`` int [T, L, K] (logical expert ids each token chose
# at each MoE layer, tokens in arrival order; negative ids are dropped entries) and optional
# ``seq_offsets`` int [num_seqs + 1] (tokens of sequence i are rows seq_offsets[i]:[i + 1]).
TOPK_KEY = "topk_ids"
# Bounds on what a trace may make us allocate: expert ids inferred from the trace (not
# declared) and the [steps, ranks, layers, experts] count array (float32, 1 GiB).
MAX_TRACE_EXPERTS = 1 << 16
MAX_COUNT_CELLS = 1 << 28


@dataclass(frozen=True)
class RoutingTrace:
    """A routing trace in memory.

    Attributes:
        topk_ids: [T, L, K] int64 logical expert ids (negative = no expert).
        seq_offsets: [num_seqs + 1] int64, or None when the file has none.
    """

    topk_ids: torch.Tensor
    seq_offsets: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[1]

    def num_experts(self) -> int:
        """Largest expert id + 1 (a lower bound on the model's E)."""
        return int(self.topk_ids.max()) + 1 if self.topk_ids.numel() else 0


def is_routing_trace(path: str | os.PathLike) -> bool:
    """True if ``path`` is an ``.npz`` holding ``topk_ids``."""
    path = os.fspath(path)
    if Path(path).suffix.lower() != ".npz" or not os.path.isfile(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as npz:
            return TOPK_KEY in npz.files
    except Exception:  # a corrupt file is reported by the reader that is actually used
        return False


def read_routing_trace(path: str | os.PathLike) -> RoutingTrace:
    """Read a routing trace (``.npz`` with ``topk_ids`` [T, L, K] and optional ``seq_offsets``).

    Raises:
        ValueError for a missing or foreign file, a bad shape or dtype, or bad offsets.
    """
    path = os.fspath(path)
    require_file(path, "routing trace file")
    try:
        # a file that is no zip would get numpy's pickle hint (np.load's fallback)
        _check_magic(path, ZIP_MAGIC, "an .npz file (a zip archive)")
    except _BadFile as exc:
        raise ValueError(f"cannot read routing trace {path!r}: {exc}") from None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if TOPK_KEY not in npz.files:
                raise ValueError(
                    f"routing trace {path!r} holds {sorted(npz.files)}; expected {TOPK_KEY!r}"
                )
            ids = npz[TOPK_KEY]
            offsets = npz["seq_offsets"] if "seq_offsets" in npz.files else None
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read routing trace {path!r}: {exc}") from exc
    if ids.ndim != 3 or 0 in ids.shape:
        raise ValueError(f"topk_ids in {path!r} must be [tokens, layers, k], got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"topk_ids in {path!r} must be integers, got dtype {ids.dtype}")
    if ids.max() < 0:
        raise ValueError(f"topk_ids in {path!r} names no expert (every id is negative)")
    seq = None
    if offsets is not None:
        offsets = np.asarray(offsets)
        if not np.issubdtype(offsets.dtype, np.integer):
            # a float offset would be truncated to another sequence boundary
            raise ValueError(f"seq_offsets in {path!r} must be integers, got dtype {offsets.dtype}")
        offsets = offsets.astype(np.int64)
        if (
            offsets.ndim != 1
            or offsets.size < 1
            or offsets[0] != 0
            or offsets[-1] != ids.shape[0]
            or (np.diff(offsets) < 0).any()
        ):
            raise ValueError(
                f"seq_offsets in {path!r} must rise from 0 to {ids.shape[0]} (the token count)"
            )
        seq = torch.from_numpy(offsets)
    return RoutingTrace(torch.from_numpy(ids.astype(np.int64)), seq)


def steps_from_routing_trace(
    topk_ids: torch.Tensor, batch_tokens: int, num_ranks: int, num_experts: int | None = None
) -> torch.Tensor:
    """Cut a routing trace into steps and count each rank's tokens per expert.

    Tokens are taken in arrival order, ``batch_tokens`` per step (a final partial step is
    dropped), and dealt round-robin to ranks within a step: token ``i`` of a step goes to
    rank ``i % num_ranks``, as a data-parallel attention front end spreads a batch.

    Args:
        topk_ids: [T, L, K] int logical expert ids; negative ids are not counted.
        batch_tokens: tokens per step (B).
        num_ranks: EP ranks (R).
        num_experts: E (default: largest id + 1).
    Returns:
        [steps, R, L, E] float32 counts.
    """
    ids = torch.as_tensor(topk_ids)
    if ids.dim() != 3:
        raise ValueError(f"topk_ids must be [tokens, layers, k], got shape {tuple(ids.shape)}")
    for name, value in (("batch_tokens", batch_tokens), ("num_ranks", num_ranks)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    tokens, layers, _ = ids.shape
    num_steps = tokens // batch_tokens
    if num_steps == 0:
        raise ValueError(
            f"batch_tokens={batch_tokens} is more than the trace's {tokens} tokens: no step"
        )
    top = int(ids.max()) + 1
    if num_experts is None:
        if top > MAX_TRACE_EXPERTS:
            raise ValueError(
                f"topk_ids holds expert id {top - 1}: more than {MAX_TRACE_EXPERTS} experts "
                "inferred from the ids (give the model's expert count to check them against)"
            )
        num_experts = top
    elif top > num_experts:
        raise ValueError(f"topk_ids holds expert id {top - 1} >= num_experts={num_experts}")
    cells = num_steps * num_ranks * layers * num_experts
    if cells > MAX_COUNT_CELLS:
        raise ValueError(
            f"{num_steps} steps x {num_ranks} ranks x {layers} layers x {num_experts} experts "
            f"is {cells} counts, more than {MAX_COUNT_CELLS} (use fewer tokens or larger steps)"
        )
    ids = ids[: num_steps * batch_tokens].numpy().astype(np.int64)
    step = np.arange(num_steps * batch_tokens) // batch_tokens
    rank = np.arange(num_steps * batch_tokens) % batch_tokens % num_ranks
    row = (step * num_ranks + rank)[:, None, None] * layers + np.arange(layers)[None, :, None]
    flat = row * num_experts + ids
    counts = np.bincount(flat[ids >= 0], minlength=num_steps * num_ranks * layers * num_experts)
    shape = (num_steps, num_ranks, layers, num_experts)
    return torch.from_numpy(counts.astype(np.float32)).view(shape)


def synthetic_routing_trace(
    num_tokens: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    *,
    seq_tokens: float = 512.0,
    skew: float = 0.6,
    shift: float = 0.8,
    seed: int = 0,
) -> RoutingTrace:
    """A routing trace whose expert popularity shifts between sequences, for tests and checks.

    Per layer each expert has a persistent log-popularity ``N(0, skew^2)``; every sequence
    adds its own offset ``N(0, shift^2)`` per expert (its topic). Sequence lengths are
    exponential with mean ``seq_tokens``. Each token picks ``top_k`` distinct experts by
    Gumbel top-k sampling of the popularity, i.e. a Plackett-Luce draw as a softmax router
    with noisy logits makes.

    Returns:
        RoutingTrace with ``topk_ids`` [num_tokens, num_layers, top_k] int64 and offsets.
    """
    for name, value in (
        ("num_tokens", num_tokens), ("num_layers", num_layers),
        ("num_experts", num_experts), ("top_k", top_k),
    ):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
    if seq_tokens <= 0 or skew < 0 or shift < 0:
        raise ValueError(
            f"need seq_tokens > 0, skew >= 0, shift >= 0; got {seq_tokens}, {skew}, {shift}"
        )
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < num_tokens:
        lengths.append(max(1, int(rng.exponential(seq_tokens))))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets[-1] = num_tokens
    base = rng.normal(0.0, skew, size=(num_layers, num_experts))
    ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
    for start, stop in zip(offsets[:-1], offsets[1:]):
        topic = base + rng.normal(0.0, shift, size=(num_layers, num_experts))
        gumbel = rng.gumbel(size=(stop - start, num_layers, num_experts))
        ids[start:stop] = np.argsort(-(topic + gumbel), axis=-1)[..., :top_k]
    return RoutingTrace(torch.from_numpy(ids), torch.from_numpy(offsets.astype(np.int64)))
