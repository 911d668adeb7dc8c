"""Reading an export: the index and layout at open, then one rank's files lazily, file by
file (what an engine loads)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from ..checkpoint import resolve_inside
from ..layout import ExpertLayout
from .plan import EXPORT_FORMAT, EXPORT_INDEX, EXPORT_VERSION


class ExportedCheckpoint:
    """An export folder opened for loading; every read is lazy and per file.

    Attributes:
        root, index (the parsed ``eplb_export.json``), layout (ExpertLayout), ep_size,
        num_slots, slots_per_rank, num_experts, moe_layers (model layer ids),
        layout_rows (model layer id -> layout row), opened (paths of the weight files this
        reader has opened, in order: what a rank can show it read).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        path = os.path.join(self.root, EXPORT_INDEX)
        if not os.path.isfile(path):
            raise ValueError(f"{self.root!r} is not an eplb export (no {EXPORT_INDEX})")
        try:
            with open(path, encoding="utf-8") as f:
                self.index = json.load(f)
        except (OSError, ValueError, RecursionError) as exc:
            raise ValueError(f"cannot read {path!r}: {exc}") from exc
        check_index(self.index, path)
        checked: set[str] = set()
        for where, name in index_file_names(self.index):
            if not (isinstance(name, str) and name in checked):
                resolve_inside(self.root, name, f"{path!r} ({where})")
                checked.add(name)
        self.layout = ExpertLayout.load(os.path.join(self.root, self.index["layout"]))
        self.ep_size = int(self.index["ep_size"])
        self.num_slots = int(self.index["num_slots"])
        self.slots_per_rank = int(self.index["slots_per_rank"])
        self.num_experts = int(self.index["num_experts"])
        self.moe_layers = [int(x) for x in self.index["moe_layers"]]
        self.layout_rows = {int(k): int(v) for k, v in self.index["layout_rows"].items()}
        self.opened: list[str] = []

    def _check_rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.ep_size:
            raise ValueError(f"rank must be in [0, {self.ep_size}), got {rank!r}")
        return rank

    def local_slots(self, rank: int) -> range:
        """Global slot ids held by ``rank``."""
        self._check_rank(rank)
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def rank_experts(self, rank: int) -> torch.Tensor:
        """[num MoE layers, slots_per_rank] int64: logical expert of each local slot."""
        rows = torch.tensor([self.layout_rows[layer] for layer in self.moe_layers])
        slots = self.local_slots(rank)
        return self.layout.phy2log[rows][:, slots.start : slots.stop]

    def rank_files(self, rank: int) -> list[str]:
        self._check_rank(rank)
        return [os.path.join(self.root, n) for n in self.index["ranks"][rank]["files"]]

    def shared_files(self) -> list[str]:
        return [os.path.join(self.root, n) for n in self.index["shared_files"]]

    def moe_layout(self) -> ExpertLayout:
        """The layout with one row per MoE layer, in ``moe_layers`` order (what an engine
        indexes by MoE layer); the stored layout itself when it already has that form."""
        rows = [self.layout_rows[layer] for layer in self.moe_layers]
        if rows == list(range(self.layout.num_layers)):
            return self.layout
        index = torch.tensor(rows)
        return ExpertLayout.from_phy2log(
            self.layout.phy2log[index], self.layout.topology, self.num_experts,
            replica_share=self.layout.replica_share[index],
        )  # fmt: skip

    def _open(self, path: str, device: str | torch.device):
        from safetensors import safe_open

        self.opened.append(path)
        return safe_open(path, framework="pt", device=str(device))

    def _iter_files(
        self, paths: list[str], device: str | torch.device
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for path in paths:
            with self._open(path, device) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    def iter_rank_tensors(self, rank: int, device: str | torch.device = "cpu"):
        """Yield (export name, tensor) of ``rank``'s expert tensors, one at a time."""
        return self._iter_files(self.rank_files(rank), device)

    def rank_tensors(
        self, rank: int, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """``rank``'s expert tensors by export name (global slot ids); reads only its files."""
        return dict(self.iter_rank_tensors(rank, device))

    def rank_state_dict(self, rank: int, device: str | torch.device = "cpu"):
        """``rank``'s expert tensors named as in the source checkpoint with *local* slot
        ids: ``{head}.{slot - first_slot}.{tail}``; what a model built with
        ``slots_per_rank`` experts per layer loads as is. Fused tensors keep their name.
        """
        first = self.local_slots(rank).start
        heads = sorted(self.index["expert_heads"].values(), key=len, reverse=True)
        out = {}
        for name, tensor in self.iter_rank_tensors(rank, device):
            out[_local_name(name, heads, first)] = tensor
        return out

    def shared_tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every non-expert tensor under its original checkpoint name."""
        return dict(self._iter_files(self.shared_files(), device))

    def state_dict(self, rank: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Shared tensors + :meth:`rank_state_dict`: the original checkpoint's names, with
        ``slots_per_rank`` local experts per MoE layer."""
        out = self.shared_tensors(device)
        out.update(self.rank_state_dict(rank, device))
        return out

    def original_state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The source checkpoint's full state dict (logical expert ids, original names),
        rebuilt from the first replica of every expert; reads from every rank's files.

        For a single-process engine that loads logical experts and applies the layout itself.
        """
        out = self.shared_tensors(device)
        fused: dict[str, list] = {}
        for entry in self.index["tensors"]:
            if entry.get("layer") is None:
                continue
            name = entry["name"]
            path = os.path.join(self.root, entry["file"])
            row = self.layout_rows[int(entry["layer"])]
            first = self.layout.log2phy[row, :, 0]
            if "rows" not in entry:
                slot, expert = entry["slots"][0], entry["experts"][0]
                if int(first[expert]) != slot:
                    continue
                with self._open(path, device) as f:
                    out[entry["source"]] = f.get_tensor(name)
                continue
            with self._open(path, device) as f:
                tensor = f.get_tensor(name)
            parts = fused.setdefault(entry["source"], [None] * self.num_experts)
            for i, (slot, expert) in enumerate(zip(entry["slots"], entry["experts"])):
                if int(first[expert]) == slot:
                    parts[expert] = tensor[i]
        for name, parts in fused.items():
            out[name] = torch.stack(parts)
        return out


def _is_int(value: object, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_list(value: object, item) -> bool:
    return isinstance(value, list) and all(item(v) for v in value)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_file_entry(value: object) -> bool:
    rank = value.get("rank", "absent") if isinstance(value, dict) else "absent"
    return rank is None or _is_int(rank)


def _is_tensor_entry(value: object) -> bool:
    return isinstance(value, dict) and _is_str(value.get("name")) and _is_str(value.get("file"))


def _is_rank_entry(value: object) -> bool:
    return isinstance(value, dict) and _is_list(value.get("files"), _is_str)


def _is_int_text(value: object) -> bool:
    return isinstance(value, str) and value.isdigit()


# What the readers (this module, verify, the engines' loaders) take from an index as given.
_INDEX_FIELDS = {
    "layout": (_is_str, "a file name"),
    "ep_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "num_slots": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "slots_per_rank": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "num_experts": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "moe_layers": (lambda v: _is_list(v, _is_int), "a list of layer ids"),
    "layout_rows": (
        lambda v: isinstance(v, dict) and all(_is_int_text(k) and _is_int(r) for k, r in v.items()),
        "an object of layer id -> layout row",
    ),
    "expert_heads": (
        lambda v: isinstance(v, dict) and all(_is_int_text(k) and _is_str(h) for k, h in v.items()),
        "an object of layer id -> tensor name prefix",
    ),
    "shared_files": (lambda v: _is_list(v, _is_str), "a list of file names"),
    "ranks": (lambda v: _is_list(v, _is_rank_entry), "a list of {files: [...]} per rank"),
    "files": (
        lambda v: isinstance(v, dict) and all(_is_file_entry(e) for e in v.values()),
        "an object of file name -> {rank: ...}",
    ),
    "tensors": (lambda v: _is_list(v, _is_tensor_entry), "a list of {name, file, ...} entries"),
}
_OPTIONAL_FIELDS = {
    "sglang_layout": (_is_str, "a file name"),
    "side_files": (lambda v: _is_list(v, _is_str), "a list of file names"),
}


def check_index(index: object, path: str) -> None:
    """ValueError naming the field unless ``index`` has every field an export's readers use,
    of the right type (an index edited by hand or cut short fails here, not in a reader)."""
    if not isinstance(index, dict) or index.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path!r} is not an eplb export index")
    version = index.get("version")
    if not _is_int(version, 1):
        raise ValueError(f"{path!r} has export version {version!r}, not an integer >= 1")
    if version > EXPORT_VERSION:
        raise ValueError(
            f"{path!r} has export version {version}; this eplb-plugin reads up to {EXPORT_VERSION}"
        )
    for fields, required in ((_INDEX_FIELDS, True), (_OPTIONAL_FIELDS, False)):
        for key, (ok, what) in fields.items():
            if key not in index:
                if required:
                    raise ValueError(f"{path!r} lacks {key!r}: not a complete export index")
            elif not ok(index[key]):
                raise ValueError(f"{path!r}: {key!r} must be {what}, got {index[key]!r:.80}")
    if len(index["ranks"]) != index["ep_size"]:
        raise ValueError(
            f"{path!r} lists files of {len(index['ranks'])} ranks for ep_size={index['ep_size']}"
        )
    unplaced = sorted(set(index["moe_layers"]) - {int(k) for k in index["layout_rows"]})
    if unplaced:
        raise ValueError(f"{path!r}: MoE layers {unplaced} have no row in 'layout_rows'")


def index_file_names(index: dict) -> Iterator[tuple[str, object]]:
    """(where in the index, name) of every file an export index names, for checking."""
    for key in ("layout", "sglang_layout"):
        if key in index:
            yield key, index[key]
    for key in ("side_files", "shared_files", "files"):
        for name in index.get(key) or ():
            yield key, name
    for r, rank in enumerate(index.get("ranks") or ()):
        for name in rank.get("files") or () if isinstance(rank, dict) else ():
            yield f"ranks[{r}].files", name
    for entry in index.get("tensors") or ():
        if isinstance(entry, dict) and "file" in entry:
            yield f"file of tensor {entry.get('name')!r}", entry["file"]


def _local_name(name: str, heads: list[str], first_slot: int) -> str:
    for head in heads:
        if name.startswith(head + "."):
            slot, _, tail = name[len(head) + 1 :].partition(".")
            if slot.isdigit() and tail:
                return f"{head}.{int(slot) - first_slot}.{tail}"
            return name
    return name


def open_export(root: str | os.PathLike) -> ExportedCheckpoint:
    """Open an export folder for loading (reads only the index and the layout)."""
    return ExportedCheckpoint(root)
