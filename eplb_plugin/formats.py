"""Statistics and layouts in SGLang's and vLLM's own forms.

Statistics (read as logical loads ``[steps, L, E]`` int64):

- SGLang ``stat``/``stat_approx`` dumps (``/dump_expert_distribution_record``):
  ``torch.save({"rank", "logical_count": int[steps, L, E],
  "average_utilization_rate_over_window"})``, one file per dump named
  ``expert_distribution_recorder_{time}.pt``; a folder of them is read in file-name
  (= time) order. SGLang's L is ``num_hidden_layers`` (dense layers
  have zero rows).
- SGLang ``per_pass`` dumps: ``{"records": [{"forward_pass_id", "rank",
  "global_physical_count": [L, P]}, ...], "last_physical_to_logical_map": [L, P]}``,
  one file per rank; passes are summed over ranks and mapped to logical experts.
- vLLM load windows: a dict holding ``expert_load_window`` (or
  ``global_expert_load_window``) ``[W, L, P]`` physical counts and the
  ``physical_to_logical_map`` ``[L, P]`` they were counted under (vLLM's EplbState
  names; vLLM's L counts MoE layers only).
- ``.json`` with ``logical_count`` (accepted by SGLang's ``--init-expert-location``).

Layouts: SGLang's ``--init-expert-location`` file is ``{"physical_to_logical_map":
[L, P]}`` in ``.pt`` (int64 tensor) or ``.json`` (nested list) and nothing else: SGLang
passes the dict's keys as keyword arguments.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_write, require_file
from .layout import ExpertLayout, Topology

SGLANG_LAYOUT_KEY = "physical_to_logical_map"
SGLANG_COUNT_KEY = "logical_count"
SGLANG_PER_PASS_KEYS = ("records", "last_physical_to_logical_map")
VLLM_WINDOW_KEYS = ("expert_load_window", "global_expert_load_window")
VLLM_MAP_KEY = "physical_to_logical_map"


# ---------------------------------------------------------------------------- checks
def check_counts(value: object, name: str, dims: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    """Validate an integer count tensor and return it as int64 on CPU.

    Args:
        value: tensor or nested list, ``dims`` dimensions, integer dtype, >= 0.
        name: what to call it in errors (e.g. ``"logical_count in 'dump.pt'"``).
    Raises:
        ValueError naming ``name`` for a wrong type, dtype, rank, emptiness or sign.
    """
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, list):
        try:
            value = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name} is not a rectangular list of integers: {exc}") from exc
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.is_complex():
        raise ValueError(f"{name} must hold integer counts, got dtype {value.dtype}")
    if value.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)})")
    value = value.detach().cpu().to(torch.int64)
    if int(value.min()) < 0:
        raise ValueError(f"{name} holds a negative count ({int(value.min())})")
    return value


def _check_map(value: object, name: str) -> torch.Tensor:
    phy2log = check_counts(value, name, dims=(2,))
    top = int(phy2log.max())
    if top >= phy2log.shape[1]:
        # every expert holds a slot, so ids stay below the slot count; a larger id would
        # also size the [..., L, E] count array
        raise ValueError(
            f"{name} names expert {top} but has {phy2log.shape[1]} slots per layer (every "
            "expert needs one)"
        )
    return phy2log


def physical_to_logical_count(
    count: torch.Tensor, phy2log: torch.Tensor, num_experts: int | None = None
) -> torch.Tensor:
    """Sum per-slot counts into per-expert counts.

    Args:
        count: [..., L, P] int counts per physical slot.
        phy2log: [L, P] int64 logical expert of each slot.
        num_experts: E (default ``phy2log.max() + 1``).
    Returns:
        [..., L, E] int64.
    """
    if count.shape[-2:] != phy2log.shape:
        raise ValueError(
            f"physical counts of shape {tuple(count.shape)} do not match "
            f"physical_to_logical_map [L, P] = {tuple(phy2log.shape)}"
        )
    num_experts = int(phy2log.max()) + 1 if num_experts is None else num_experts
    lead = count.shape[:-2]
    flat = count.reshape(-1, *phy2log.shape).to(torch.int64)
    out = torch.zeros(flat.shape[0], phy2log.shape[0], num_experts, dtype=torch.int64)
    out.scatter_add_(2, phy2log.unsqueeze(0).expand_as(flat), flat)
    return out.reshape(*lead, phy2log.shape[0], num_experts)


# ---------------------------------------------------------------------------- statistics
def _torch_load(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign/corrupt files
        raise ValueError(f"cannot read {path!r} as a torch.save file: {exc}") from exc


def _read_json(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path!r} as JSON: {exc}") from exc
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ValueError(f"cannot read {path!r} as JSON: nested too deeply") from None


def is_foreign_load(obj: object) -> bool:
    """True for a dict in one of the SGLang/vLLM statistics forms this module reads."""
    return isinstance(obj, dict) and (
        SGLANG_COUNT_KEY in obj
        or all(k in obj for k in SGLANG_PER_PASS_KEYS)
        or any(k in obj for k in VLLM_WINDOW_KEYS)
    )


def load_from_dict(obj: dict, path: str) -> torch.Tensor:
    """Logical counts [steps, L, E] int64 from one SGLang/vLLM statistics dict.

    Raises:
        ValueError naming ``path`` and the offending key for any other content.
    """
    if SGLANG_COUNT_KEY in obj:
        count = check_counts(obj[SGLANG_COUNT_KEY], f"{SGLANG_COUNT_KEY} in {path!r}")
        return count.unsqueeze(0) if count.dim() == 2 else count
    if all(k in obj for k in SGLANG_PER_PASS_KEYS):
        return _per_pass_to_logical([obj], path)
    key = next((k for k in VLLM_WINDOW_KEYS if k in obj), None)
    if key is not None:
        window = check_counts(obj[key], f"{key} in {path!r}", dims=(2, 3))
        if VLLM_MAP_KEY not in obj:
            raise ValueError(
                f"{path!r} holds {key} (physical slot counts) without {VLLM_MAP_KEY!r}: the "
                f"layout it was counted under is needed to turn slots into experts "
                f"(eplb convert --load FILE --layout LAYOUT)"
            )
        phy2log = _check_map(obj[VLLM_MAP_KEY], f"{VLLM_MAP_KEY} in {path!r}")
        window = window.unsqueeze(0) if window.dim() == 2 else window
        return physical_to_logical_count(window, phy2log)
    raise ValueError(
        f"{path!r} holds keys {sorted(map(str, obj))}; expected {SGLANG_COUNT_KEY!r} "
        f"(SGLang stat dump), {SGLANG_PER_PASS_KEYS} (SGLang per_pass dump) or one of "
        f"{VLLM_WINDOW_KEYS} with {VLLM_MAP_KEY!r} (vLLM window)"
    )


def _per_pass_to_logical(dumps: list[dict], path: str) -> torch.Tensor:
    """Sum ``global_physical_count`` over ranks per forward pass, map to logical."""
    by_pass: dict[int, torch.Tensor] = {}
    phy2log = None
    for dump in dumps:
        phy2log = _check_map(
            dump["last_physical_to_logical_map"], f"last_physical_to_logical_map in {path!r}"
        )
        if not isinstance(dump["records"], list):
            raise ValueError(f"records in {path!r} must be a list")
        for i, record in enumerate(dump["records"]):
            if not isinstance(record, dict) or "global_physical_count" not in record:
                raise ValueError(f"record {i} in {path!r} lacks global_physical_count")
            count = check_counts(
                record["global_physical_count"], f"record {i} global_physical_count in {path!r}",
                dims=(2,),
            )  # fmt: skip
            step = record.get("forward_pass_id", i)
            try:
                step = operator.index(step)
            except TypeError:
                raise ValueError(
                    f"record {i} in {path!r}: forward_pass_id {step!r} is not an integer"
                ) from None
            by_pass[step] = by_pass[step] + count if step in by_pass else count
    if not by_pass:
        raise ValueError(f"{path!r} holds no per_pass records")
    shapes = {tuple(c.shape) for c in by_pass.values()}
    if len(shapes) > 1:
        raise ValueError(f"per_pass records in {path!r} disagree on [L, P]: {sorted(shapes)}")
    stacked = torch.stack([by_pass[k] for k in sorted(by_pass)])
    return physical_to_logical_count(stacked, phy2log)


def read_sglang_dump(path: str | os.PathLike) -> torch.Tensor:
    """Read SGLang expert-distribution dumps as logical counts.

    Args:
        path: one ``.pt`` dump (stat or per_pass mode), a ``.json`` with ``logical_count``,
            or a folder of ``.pt`` dumps (stat dumps are concatenated in file-name order,
            per_pass dumps of all ranks are merged by forward pass).
    Returns:
        [steps, L, E] int64.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).glob("*.pt"))
        if not files:
            raise ValueError(f"folder {path!r} holds no .pt dumps")
        dumps = [(f, _torch_load(f)) for f in files]
        for f, obj in dumps:
            if not is_foreign_load(obj):
                if isinstance(obj, dict):  # a few keys name it; thousands would bury the error
                    keys = sorted(map(str, obj))
                    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
                    held = f"keys {keys[:8]}{more}"
                else:
                    held = f"a {type(obj).__name__}"
                raise ValueError(f"{f!r} is not an SGLang dump (holds {held})")
        if all(isinstance(o, dict) and SGLANG_COUNT_KEY in o for _, o in dumps):
            parts = [load_from_dict(o, f) for f, o in dumps]
            shapes = {tuple(p.shape[1:]) for p in parts}
            if len(shapes) > 1:
                raise ValueError(f"dumps in {path!r} disagree on [L, E]: {sorted(shapes)}")
            return torch.cat(parts)
        if all(all(k in o for k in SGLANG_PER_PASS_KEYS) for _, o in dumps):
            return _per_pass_to_logical([o for _, o in dumps], path)
        raise ValueError(f"folder {path!r} mixes stat and per_pass dumps")
    require_file(path, "dump")
    obj = _read_json(path) if path.lower().endswith(".json") else _torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not an SGLang dump dict")
    return load_from_dict(obj, path)


def read_vllm_window(
    window: torch.Tensor, layout: ExpertLayout | torch.Tensor | None = None
) -> torch.Tensor:
    """A vLLM-style load window as logical counts.

    Args:
        window: [W, L, P] (or [L, P]) int physical counts under ``layout``, or
            [W, L, E] logical counts when ``layout`` is None.
        layout: the ExpertLayout (or its ``phy2log`` [L, P]) the counts were taken under.
    Returns:
        [W, L, E] int64.
    """
    window = check_counts(window, "load window", dims=(2, 3))
    window = window.unsqueeze(0) if window.dim() == 2 else window
    if layout is None:
        return window
    if isinstance(layout, ExpertLayout):
        return physical_to_logical_count(window, layout.phy2log, layout.num_experts)
    return physical_to_logical_count(window, _check_map(layout, "physical_to_logical_map"))


def read_vllm_window_file(
    path: str | os.PathLike, layout: ExpertLayout | torch.Tensor | None = None
) -> torch.Tensor:
    """Read a saved vLLM load window as logical counts [W, L, E] int64.

    Args:
        path: ``.pt`` holding a tensor, or a dict with ``expert_load_window`` /
            ``global_expert_load_window`` (and optionally ``physical_to_logical_map``).
        layout: the layout the physical counts were taken under; needed unless the file
            holds its ``physical_to_logical_map`` (without either, counts are taken as
            logical [W, L, E]).
    """
    path = os.fspath(path)
    require_file(path, "window file")
    obj = _torch_load(path)
    if isinstance(obj, dict):
        key = next((k for k in VLLM_WINDOW_KEYS if k in obj), None)
        if key is None:
            raise ValueError(f"{path!r} holds {sorted(map(str, obj))}, none of {VLLM_WINDOW_KEYS}")
        if layout is None and VLLM_MAP_KEY in obj:
            layout = _check_map(obj[VLLM_MAP_KEY], f"{VLLM_MAP_KEY} in {path!r}")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a load window tensor")
    return read_vllm_window(obj, layout)


def write_sglang_dump(path: str | os.PathLike, load: torch.Tensor, rank: int = 0) -> None:
    """Write a load trace as an SGLang stat dump (usable as ``--init-expert-location``).

    Args:
        load: [L, E] or [steps, L, E] counts; float loads must hold whole numbers.
    """
    load = torch.as_tensor(load)
    if load.dtype.is_floating_point:
        rounded = load.round()
        if not torch.isfinite(load).all() or (load - rounded).abs().max() > 1e-3:
            raise ValueError("load must hold whole-number token counts to become an SGLang dump")
        if rounded.numel() and rounded.abs().max() >= 2.0**63:  # would wrap round in int64
            raise ValueError(
                f"load holds a count of {rounded.abs().max().item():.3g}, beyond int64's range"
            )
        load = rounded
    count = check_counts(load.to(torch.int64), "load")
    count = count.unsqueeze(0) if count.dim() == 2 else count
    obj = {"rank": rank, SGLANG_COUNT_KEY: count, "average_utilization_rate_over_window": None}
    atomic_write(os.fspath(path), lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------- layouts
def sglang_phy2log(
    layout: ExpertLayout, layer_ids: list[int] | None = None, num_layers: int | None = None
) -> torch.Tensor:
    """The [num_layers, P] map SGLang expects.

    Args:
        layout: a layout over MoE layers.
        layer_ids: model layer id of each layout row (default: row i is layer i).
        num_layers: SGLang's layer count (``num_hidden_layers``); rows of layers absent
            from ``layer_ids`` (dense layers) get SGLang's trivial map ``arange(P) % E``.
    Returns:
        [num_layers, P] int64.
    """
    rows = layout.num_layers
    layer_ids = list(range(rows)) if layer_ids is None else list(layer_ids)
    if len(layer_ids) != rows:
        raise ValueError(
            f"layer_ids has {len(layer_ids)} layer ids for a layout of {rows} rows (one per row)"
        )
    seen: set[int] = set()
    repeated = [i for i in layer_ids if i in seen or seen.add(i)]
    if repeated:
        # two rows written to one layer: all but the last would be lost
        raise ValueError(f"layer_ids names layer {repeated[0]} more than once")
    num_layers = max(layer_ids) + 1 if num_layers is None else num_layers
    if layer_ids and (min(layer_ids) < 0 or max(layer_ids) >= num_layers):
        raise ValueError(f"layer_ids {layer_ids} do not fit num_layers={num_layers}")
    out = (torch.arange(layout.num_slots) % layout.num_experts).repeat(num_layers, 1)
    out[layer_ids] = layout.phy2log
    return out


def write_sglang_layout(
    path: str | os.PathLike,
    layout: ExpertLayout,
    layer_ids: list[int] | None = None,
    num_layers: int | None = None,
) -> None:
    """Write ``{"physical_to_logical_map": [L, P]}`` as .pt or .json, atomically."""
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix not in (".pt", ".json"):
        raise ValueError(f"SGLang layout file {path!r} must end with .pt or .json")
    phy2log = sglang_phy2log(layout, layer_ids, num_layers)
    if suffix == ".pt":
        atomic_write(path, lambda tmp: torch.save({SGLANG_LAYOUT_KEY: phy2log}, tmp))
    else:
        text = json.dumps({SGLANG_LAYOUT_KEY: phy2log.tolist()}, separators=(",", ":"))
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_sglang_layout(
    path: str | os.PathLike,
    ep_size: int,
    num_experts: int | None = None,
    num_groups: int = 1,
    num_nodes: int = 1,
) -> ExpertLayout:
    """Read an SGLang ``--init-expert-location`` layout file into an ExpertLayout.

    Args:
        path: ``.pt`` or ``.json`` holding ``physical_to_logical_map`` [L, P].
        ep_size: EP ranks (GPUs); P must be divisible by it.
        num_experts: E (default: largest id + 1).
    """
    path = os.fspath(path)
    require_file(path, "layout file")
    obj = _read_json(path) if path.lower().endswith(".json") else _torch_load(path)
    if not isinstance(obj, dict) or SGLANG_LAYOUT_KEY not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        hint = " (a statistics dump: pass it as --load)" if is_foreign_load(obj) else ""
        raise ValueError(f"{path!r} holds {keys}, not {SGLANG_LAYOUT_KEY!r}{hint}")
    phy2log = _check_map(obj[SGLANG_LAYOUT_KEY], f"{SGLANG_LAYOUT_KEY} in {path!r}")
    slots = phy2log.shape[1]
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size <= 0:
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
    if slots % ep_size:
        raise ValueError(
            f"{SGLANG_LAYOUT_KEY} in {path!r} has {slots} physical slots, not divisible by "
            f"ep_size={ep_size}"
        )
    topology = Topology(slots, num_groups, num_nodes, ep_size)
    return ExpertLayout.from_phy2log(phy2log, topology, num_experts)


def read_layout(path: str | os.PathLike, ep_size: int | None = None, **kwargs) -> ExpertLayout:
    """Read a layout in either form: this project's ``.safetensors`` or SGLang's .pt/.json.

    ``ep_size`` is required for SGLang files (they hold no topology) and, when given for a
    ``.safetensors`` layout, must equal its ``topology.num_gpus``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"layout {path!r} is a directory, not a layout file")
    require_file(path, "layout file")
    if path.lower().endswith(".safetensors"):
        layout = ExpertLayout.load(path)
        if ep_size is not None and ep_size != layout.topology.num_gpus:
            raise ValueError(
                f"ep_size={ep_size} disagrees with layout {path!r}, planned for "
                f"num_gpus={layout.topology.num_gpus}"
            )
        return layout
    if ep_size is None:
        raise ValueError(f"layout {path!r} is in SGLang form (no topology): give the EP size")
    return read_sglang_layout(path, ep_size, **kwargs)
