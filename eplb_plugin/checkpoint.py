"""Hugging Face safetensors checkpoints read without loading them.

A checkpoint is a folder of ``*.safetensors`` files (optionally listed by
``model.safetensors.index.json``). Only the headers are parsed here: every tensor
becomes a :class:`TensorInfo` with the absolute byte range of its data, so a tensor
(or one expert's rows of a fused tensor) can later be copied or hashed without
materialising anything else.

Routed-expert tensors are recognised by the naming of each model family
(:mod:`eplb_plugin.families`, grouped here as :data:`FAMILIES`). Two forms exist on disk:

- per expert (every released DeepSeek-V2/V3, Qwen-MoE and Mixtral checkpoint, and what
  transformers 5.x ``save_pretrained`` writes by default): ``{head}.{expert}.{tail}``,
  e.g. ``model.layers.3.mlp.experts.17.gate_proj.weight`` or
  ``model.layers.3.mlp.experts.17.down_proj.weight_scale_inv`` (DeepSeek-V3 fp8);
- fused (the in-memory transformers 5.x form, written by
  ``save_pretrained(save_original_format=False)``): ``{head}.{tail}`` with experts along
  dim 0, e.g. ``model.layers.3.mlp.experts.gate_up_proj`` [E, 2I, H].
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

from .families import FAMILIES as MODEL_FAMILIES
from .families import ModelFamily, is_moe_layer

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
# what reading a JSON file can raise (json's decoder recurses once per nesting level)
_JSON_ERRORS = (OSError, ValueError, RecursionError)

# Bits per element of every safetensors dtype (sub-byte float formats included).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are, not the bytes.

    ``start``/``end`` are absolute offsets in ``path`` (header included).
    """

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def row_range(self, index: int) -> tuple[int, int]:
        """Absolute byte range of ``tensor[index]`` (a slice along dim 0)."""
        if not self.shape or not 0 <= index < self.shape[0]:
            raise ValueError(f"{self.name}: index {index} outside dim 0 of shape {self.shape}")
        row = self.nbytes // self.shape[0]
        return self.start + index * row, self.start + (index + 1) * row


@dataclass(frozen=True)
class ExpertFamily:
    """A checkpoint naming group: the model types of :data:`eplb_plugin.families.FAMILIES`
    whose routed experts have the same names on disk."""

    name: str  # the group, e.g. "deepseek" (recorded in an export's index)
    model_types: tuple[str, ...]  # config.json "model_type" values
    module: str  # path of the experts module inside a decoder layer
    num_experts_key: str  # config.json key giving the routed expert count


def _naming_groups() -> tuple[ExpertFamily, ...]:
    groups: dict[str, list[ModelFamily]] = {}
    for fam in MODEL_FAMILIES.values():
        groups.setdefault(fam.naming, []).append(fam)
    out = []
    for name, members in groups.items():
        first = members[0]
        for fam in members:
            if (fam.disk_module, fam.num_experts_key) != (first.disk_module, first.num_experts_key):
                raise RuntimeError(f"model families of naming group {name!r} disagree on disk")
        types = tuple(fam.name for fam in members)
        out.append(ExpertFamily(name, types, first.disk_module, first.num_experts_key))
    return tuple(out)


# The families table grouped by checkpoint naming, in detection order.
FAMILIES: tuple[ExpertFamily, ...] = _naming_groups()
_ALL_MODEL_TYPES = frozenset(MODEL_FAMILIES)


def resolve_inside(root: str, name: object, what: str, *, hf_cache: bool = False) -> str:
    """The path of file ``name`` listed by ``what``, refused unless it lies inside ``root``.

    A name from a file (an index's weight map, an export index) must not reach outside its
    folder: it must be a relative path without ``..`` and, symlinks resolved, stay under
    ``root``. With ``hf_cache``, a link from huggingface_hub's cache layout
    (``<repo>/snapshots/<revision>/<file> -> ../../blobs/<hash>``) is accepted too: that is
    how every checkpoint downloaded to the default cache is stored.

    Raises:
        ValueError naming ``what``, the entry and why it is outside.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} names {name!r}, which is not a file name")
    if os.path.isabs(name):
        raise ValueError(f"{what} names {name!r}: an absolute path, outside {root!r}")
    if ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{what} names {name!r}, which climbs with '..' outside {root!r}")
    path = os.path.join(root, name)
    real_root = os.path.realpath(root)
    target = os.path.realpath(path)
    allowed = [real_root]
    if hf_cache and os.path.basename(os.path.dirname(real_root)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(real_root)), "blobs"))
    if not any(os.path.commonpath([target, top]) == top for top in allowed):
        raise ValueError(
            f"{what} names {name!r}, which resolves through a symlink to {target!r}, "
            f"outside {root!r}"
        )
    return path


def _bad(path: str, what: str) -> ValueError:
    return ValueError(f"checkpoint file {path!r} is not a valid safetensors file: {what}")


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header.

    Returns:
        (tensors by name in data order, the ``__metadata__`` dict).
    Raises:
        ValueError naming the file for a truncated, padded or corrupt header or layout.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise _bad(path, f"header length {header_len} does not fit a {size}-byte file")
            raw = f.read(header_len)
    except OSError as exc:
        raise ValueError(f"cannot read checkpoint file {path!r}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad(path, f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(path, f"entry {name!r} lacks dtype/shape/data_offsets") from exc
        if dtype not in DTYPE_BITS:
            raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _bad(path, f"tensor {name!r} has shape {shape!r}")
        want = math.ceil(math.prod(shape) * DTYPE_BITS[dtype] / 8)
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != want:
            raise _bad(
                path, f"tensor {name!r} spans {end - begin} bytes, {dtype}{shape} needs {want}"
            )
        tensors.append(TensorInfo(name, path, dtype, tuple(shape), base + begin, base + end))
    tensors.sort(key=lambda t: (t.start, t.end))
    cursor = base
    for t in tensors:
        if t.start != cursor:
            raise _bad(
                path, f"tensor {t.name!r} starts at {t.start - base}, expected {cursor - base}"
            )
        cursor = t.end
    if cursor != size:
        state = "truncated" if cursor > size else "longer than its header says"
        raise ValueError(
            f"checkpoint file {path!r} is {state}: header needs {cursor} bytes, file has {size}"
        )
    return {t.name: t for t in tensors}, dict(metadata)


@dataclass
class Checkpoint:
    """All tensors of a checkpoint folder, by name, with their byte ranges.

    Attributes:
        root: the folder.
        files: safetensors file names (relative to ``root``) in shard order.
        tensors: name -> TensorInfo, ordered by file then offset.
        config: parsed ``config.json`` or ``{}``.
    """

    root: str
    files: list[str]
    tensors: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | os.PathLike) -> Checkpoint:
        """Read the index (if any) and every header; nothing else is read.

        Raises:
            ValueError for a missing folder, no safetensors files, an index that names
            missing files or tensors, duplicate tensor names, or a corrupt header.
        """
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"checkpoint {root!r} is not a directory")
        index_path = os.path.join(root, INDEX_FILE)
        weight_map: dict[str, str] | None = None
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (*_JSON_ERRORS, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"cannot read {index_path!r}: {exc}") from exc
            listed_by = f"{index_path!r}"
        else:
            files = sorted(n for n in os.listdir(root) if n.endswith(".safetensors"))
            listed_by = f"checkpoint {root!r}"
        if not files:
            raise ValueError(f"checkpoint {root!r} holds no .safetensors files")
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = resolve_inside(root, name, listed_by, hf_cache=True)
            if not os.path.isfile(path):
                raise ValueError(f"{index_path!r} names {name!r}, which does not exist")
            found, _ = read_header(path)
            for key, info in found.items():
                if key in tensors:
                    raise ValueError(
                        f"tensor {key!r} appears in both {tensors[key].path!r} and {path!r}"
                    )
                tensors[key] = info
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in tensors or os.path.basename(tensors[key].path) != name:
                    raise ValueError(f"{index_path!r} maps {key!r} to {name!r}, which lacks it")
        config = {}
        config_path = os.path.join(root, "config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except _JSON_ERRORS as exc:
                raise ValueError(f"cannot read {config_path!r}: {exc}") from exc
            _check_config(config, config_path)
        return cls(root, files, tensors, config)

    @property
    def text_config(self) -> dict:
        """The language model's config (``text_config`` of multimodal models)."""
        return self.config.get("text_config") or self.config

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _check_config(config: object, path: str) -> None:
    """ValueError unless the config.json fields the expert table reads have usable types."""
    if not isinstance(config, dict):
        raise ValueError(f"{path!r} holds a {type(config).__name__}, not an object")
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise ValueError(f"{path!r}: text_config must be an object, got {text!r:.80}")
    for where in (config, text or {}):
        model_type = where.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise ValueError(f"{path!r}: model_type must be a string, got {model_type!r:.80}")
        layers = where.get("num_hidden_layers")
        if layers is not None and (
            isinstance(layers, bool) or not isinstance(layers, int) or layers < 1
        ):
            raise ValueError(f"{path!r}: num_hidden_layers must be an integer >= 1, got {layers!r}")


# {head}.{tail} where head = "...layers.{layer}.{module}"; tail = "{expert}.{rest}" or a fused name
def _expert_regex(module: str) -> re.Pattern:
    return re.compile(
        r"^(?P<head>(?:.*\.)?layers\.(?P<layer>\d+)\." + re.escape(module) + r")\.(?P<tail>.+)$"
    )


@dataclass
class ExpertTable:
    """The routed-expert tensors of a checkpoint, validated to be complete.

    Attributes:
        family: the naming family that matched.
        num_experts: E, the same for every MoE layer.
        layers: model layer ids with routed experts, ascending (layers past the config's
            ``num_hidden_layers``, e.g. DeepSeek-V3's MTP layer, are left out).
        heads: layer -> name prefix, e.g. ``model.layers.3.mlp.experts``.
        per_expert: layer -> expert -> tail -> TensorInfo (tail e.g. ``gate_proj.weight``).
        fused: layer -> tail -> TensorInfo with experts along dim 0 (e.g. ``gate_up_proj``).
    """

    family: ExpertFamily
    num_experts: int
    layers: list[int]
    heads: dict[int, str]
    per_expert: dict[int, dict[int, dict[str, TensorInfo]]]
    fused: dict[int, dict[str, TensorInfo]]

    def names(self) -> set[str]:
        """Every checkpoint tensor name this table covers."""
        out = {t.name for ex in self.per_expert.values() for d in ex.values() for t in d.values()}
        out.update(t.name for d in self.fused.values() for t in d.values())
        return out


def detect_family(checkpoint: Checkpoint) -> ExpertFamily:
    """The family whose expert names occur in ``checkpoint`` (config's model_type first)."""
    model_type = checkpoint.text_config.get("model_type") or checkpoint.config.get("model_type")
    ordered = sorted(FAMILIES, key=lambda fam: model_type not in fam.model_types)
    for fam in ordered:
        regex = _expert_regex(fam.module)
        if any(regex.match(name) for name in checkpoint.tensors):
            return fam
    modules = sorted({fam.module for fam in FAMILIES})
    raise ValueError(
        f"checkpoint {checkpoint.root!r} (model_type={model_type!r}) holds no routed-expert "
        f"tensors named 'layers.{{l}}.<{'|'.join(modules)}>.*'"
    )


def find_experts(checkpoint: Checkpoint, family: ExpertFamily | None = None) -> ExpertTable:
    """Classify and check the routed-expert tensors.

    Raises:
        ValueError when an expert lacks a tensor its siblings have, expert ids have gaps,
        layers disagree on E, shapes differ between experts, a fused tensor's dim 0 is not
        E, or the config's expert count disagrees with the tensors.
    """
    family = family or detect_family(checkpoint)
    regex = _expert_regex(family.module)
    num_hidden = checkpoint.text_config.get("num_hidden_layers")
    per_expert: dict[int, dict[int, dict[str, TensorInfo]]] = {}
    fused: dict[int, dict[str, TensorInfo]] = {}
    heads: dict[int, str] = {}
    for name, info in checkpoint.tensors.items():
        m = regex.match(name)
        if not m:
            continue
        layer = int(m["layer"])
        if isinstance(num_hidden, int) and layer >= num_hidden:
            continue  # MTP / next-token layers: not part of the served layout
        heads.setdefault(layer, m["head"])
        first, _, rest = m["tail"].partition(".")
        if first.isdigit() and rest:
            per_expert.setdefault(layer, {}).setdefault(int(first), {})[rest] = info
        else:
            fused.setdefault(layer, {})[m["tail"]] = info
    layers = sorted(heads)
    model_type = checkpoint.text_config.get("model_type") or checkpoint.config.get("model_type")
    if isinstance(num_hidden, int) and model_type in _ALL_MODEL_TYPES:
        expected = [
            i for i in range(num_hidden) if is_moe_layer(model_type, checkpoint.text_config, i)
        ]
        missing = sorted(set(expected) - set(layers))
        if missing:
            raise ValueError(
                f"MoE layers {missing[:8]} have no expert tensors "
                f"('model.layers.{missing[0]}.{family.module}.*'), though config.json "
                f"(model_type={model_type!r}, {num_hidden} layers) makes them MoE layers"
            )
    if not layers:
        raise ValueError(
            f"checkpoint {checkpoint.root!r} holds no routed-expert tensors in layers below "
            f"num_hidden_layers={num_hidden} ('layers.{{l}}.{family.module}.*')"
        )
    counts = {}
    for layer in layers:
        if layer in per_expert and layer in fused:
            raise ValueError(
                f"layer {layer} mixes per-expert and fused expert tensors "
                f"({sorted(fused[layer])}); export supports one form per layer"
            )
        counts[layer] = (
            _check_per_expert(layer, heads[layer], per_expert[layer])
            if layer in per_expert
            else _check_fused(layer, fused[layer])
        )
    if len(set(counts.values())) > 1:
        raise ValueError(f"MoE layers disagree on the expert count: {counts}")
    num_experts = next(iter(counts.values()))
    configured = checkpoint.text_config.get(family.num_experts_key)
    if isinstance(configured, int) and configured != num_experts:
        raise ValueError(
            f"config.json says {family.num_experts_key}={configured} but the checkpoint holds "
            f"{num_experts} experts per layer"
        )
    return ExpertTable(family, num_experts, layers, heads, per_expert, fused)


def _check_per_expert(layer: int, head: str, experts: dict[int, dict[str, TensorInfo]]) -> int:
    num = max(experts) + 1
    missing_ids = sorted(set(range(num)) - set(experts))
    if missing_ids:
        raise ValueError(
            f"layer {layer}: expert tensors missing for experts {missing_ids[:8]} "
            f"(ids up to {num - 1} present), e.g. {head}.{missing_ids[0]}.*"
        )
    tails = set().union(*(set(d) for d in experts.values()))
    for expert, found in experts.items():
        lacking = sorted(tails - set(found))
        if lacking:
            raise ValueError(
                f"missing expert tensor {head}.{expert}.{lacking[0]} (layer {layer}, "
                f"expert {expert} lacks {lacking}; other experts have them)"
            )
    reference = experts[0]
    for found in experts.values():
        for tail, info in found.items():
            if (info.dtype, info.shape) != (reference[tail].dtype, reference[tail].shape):
                raise ValueError(
                    f"{info.name} is {info.dtype}{list(info.shape)} but expert 0 has "
                    f"{reference[tail].dtype}{list(reference[tail].shape)}"
                )
    return num


def _check_fused(layer: int, tensors: dict[str, TensorInfo]) -> int:
    dims = {tail: (info.shape[0] if info.shape else 0) for tail, info in tensors.items()}
    if len(set(dims.values())) != 1 or 0 in dims.values():
        raise ValueError(f"layer {layer}: fused expert tensors disagree on dim 0: {dims}")
    for info in tensors.values():
        row_bits = math.prod(info.shape[1:]) * DTYPE_BITS[info.dtype]
        if row_bits % 8:
            raise ValueError(f"{info.name}: one expert's rows are not a whole number of bytes")
    return next(iter(dims.values()))
