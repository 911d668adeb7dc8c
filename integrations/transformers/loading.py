"""Check a checkpoint or an export folder for the transformers integration, and load one
EP rank of a transformers MoE model straight from an ``eplb export`` folder.

An export (``eplb export``, :mod:`eplb_plugin.export`) holds each EP rank's physical expert
slots in files of its own. Here a rank

1. builds the model skeleton on the meta device from the export's ``config.json`` (no
   memory for any weight);
2. gives every MoE layer's experts module its ``slots_per_rank`` slots, allocated on the
   target device and filled from this rank's expert files only, in the export's layout
   (per-expert tensors stacked the way transformers fuses them on load:
   ``gate_up_proj[j] = cat(gate[j], up[j])``, ``down_proj[j] = down[j]``);
3. loads the shared (non-expert) tensors under the names transformers would give them
   (its own checkpoint renamings, e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``);
4. recomputes the non-persistent buffers (rotary frequencies) with the model's own init.

The model then carries an :class:`ExportShard` (``model.eplb_export``), and
:func:`~.patch.apply_eplb` serves it with the export's layout as the initial layout, without
re-slicing: the full expert set is never allocated on any rank.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from eplb_plugin.export import EXPORT_INDEX, ExportedCheckpoint, open_export
from eplb_plugin.layout import ExpertLayout

from .models import FAMILIES, MoEFamily, moe_layers, require_transformers


@dataclass
class ExportShard:
    """What :func:`load_export_model` attaches to the model as ``model.eplb_export``.

    Attributes:
        path: the export folder.
        rank: the EP rank whose slots the model holds.
        ep_size: the export's EP size (the run's must equal it).
        layout: the export's layout, one row per MoE layer (the initial layout).
        files_read: weight files (base names) this rank opened, in order.
    """

    path: str
    rank: int
    ep_size: int
    layout: ExpertLayout
    files_read: list[str] = field(default_factory=list)


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ``eplb export`` folder (it holds ``eplb_export.json``)."""
    return os.path.isfile(os.path.join(os.fspath(path), EXPORT_INDEX))


def check_export(
    path: str | os.PathLike, ep_size: int | None = None
) -> tuple[MoEFamily, object, ExportedCheckpoint]:
    """Validate an export folder for the transformers integration, reading headers only.

    Checks: the index and layout are readable; ``config.json`` names a supported family
    whose expert count and MoE layers agree with the export; ``ep_size`` (when given)
    equals the export's; every file the index lists exists, is a complete safetensors file
    and holds the tensors the index puts there; expert tensors are the float
    gate/up/down weights the integration loads.

    Returns:
        (family, transformers config, the opened export).
    Raises:
        ValueError naming the folder, file or value at fault.
    """
    from eplb_plugin.checkpoint import read_header

    require_transformers()
    import transformers

    path = os.fspath(path)
    export = open_export(path)
    family = _family(path)
    config = transformers.AutoConfig.from_pretrained(path)
    num_experts = family.num_experts(config)
    if num_experts != export.num_experts:
        raise ValueError(
            f"export {path!r}: config.json has {num_experts} experts per layer but the export "
            f"index has {export.num_experts}"
        )
    moe = [i for i in range(int(config.num_hidden_layers)) if family.is_moe_layer(config, i)]
    if moe != export.moe_layers:
        raise ValueError(
            f"export {path!r}: config.json makes layers {moe} MoE layers but the export holds "
            f"experts for layers {export.moe_layers}"
        )
    if ep_size is not None and ep_size != export.ep_size:
        raise ValueError(
            f"EP size {ep_size} disagrees with export {path!r}, written for "
            f"ep_size={export.ep_size} ({export.num_slots} slots, {export.slots_per_rank} per "
            f"rank): run {export.ep_size} ranks, or export again with a layout for {ep_size} GPUs"
        )
    listed: dict[str, set[str]] = {}
    for entry in export.index["tensors"]:
        listed.setdefault(entry["file"], set()).add(entry["name"])
    for name, info in export.index["files"].items():
        owner = "shared files" if info["rank"] is None else f"rank {info['rank']}"
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise ValueError(f"export {path!r} is incomplete: {owner}'s file {name} is missing")
        found, _ = read_header(file_path)
        absent = sorted(listed.get(name, set()) - set(found))
        if absent:
            raise ValueError(
                f"export {path!r}: {owner}'s file {name} lacks {len(absent)} tensor(s) its "
                f"index lists, e.g. {absent[0]}"
            )
    _check_expert_names(export, family)
    return family, config, export


def _family(path: str) -> MoEFamily:
    model_type = read_config(path).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} in {path}/config.json is not supported; supported: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def _check_expert_names(export: ExportedCheckpoint, family: MoEFamily) -> None:
    if tuple(family.expert_params) != ("gate_up_proj", "down_proj"):
        raise ValueError(f"{family.name}: experts {family.expert_params} cannot be loaded")
    heads = {int(k): v for k, v in export.index["expert_heads"].items()}
    allowed = {f"{p}.weight" for p in family.disk_gate_up_down}
    for entry in export.index["tensors"]:
        if entry.get("layer") is None:
            continue
        tail = entry["name"][len(heads[int(entry["layer"])]) + 1 :]
        if "rows" in entry:
            ok = tail in family.expert_params
        else:
            ok = tail.partition(".")[2] in allowed
        if not ok:
            raise ValueError(
                f"expert tensor {entry['name']} cannot be loaded by the transformers "
                f"integration: it loads float {'/'.join(sorted(allowed))} per expert (or fused "
                f"{'/'.join(family.expert_params)}), not quantized weights or their scales"
            )


# ---------------------------------------------------------------------- checkpoints
def read_config(path: str) -> dict:
    """``config.json`` of a checkpoint folder as a dict; ValueError when it is absent."""
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a folder")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"model path {path!r} has no config.json")
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_keys(path: str) -> set[str]:
    """Tensor names stored in a checkpoint folder's safetensors files (headers only)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"model path {path!r} holds no .safetensors file")
    keys: set[str] = set()
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            keys.update(f.keys())
    return keys


def check_checkpoint(path: str) -> tuple[MoEFamily, object]:
    """Validate a local checkpoint before any process starts; returns (family, config).

    Raises ValueError when the family is unsupported or an MoE layer lacks expert tensors
    (``from_pretrained`` would otherwise fill them with random values and only warn). An
    ``eplb export`` folder is checked by :func:`check_export` (any EP size).
    """
    require_transformers()
    import transformers

    if os.path.isdir(path) and is_export(path):
        family, config, _ = check_export(path)
        return family, config

    family = _family(path)
    config = transformers.AutoConfig.from_pretrained(path)
    missing = missing_expert_tensors(checkpoint_keys(path), family, config)
    if missing:
        shown = ", ".join(missing[:4]) + (
            f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        )
        raise ValueError(f"checkpoint {path!r} is missing expert tensors: {shown}")
    return family, config


def missing_expert_tensors(keys: set[str], family: MoEFamily, config) -> list[str]:
    """Names of expected expert tensors absent from ``keys`` (per-expert or fused form)."""
    num_experts = family.num_experts(config)
    missing = []
    for layer in range(int(config.num_hidden_layers)):
        if not family.is_moe_layer(config, layer):
            continue
        prefix = f"model.layers.{layer}.{family.disk_block}.experts."
        fused = [prefix + p for p in family.expert_params]
        if all(k in keys for k in fused):
            continue
        for expert in range(num_experts):
            for param in family.disk_expert_params:
                name = f"{prefix}{expert}.{param}.weight"
                if name not in keys:
                    missing.append(name)
    return missing


# ---------------------------------------------------------------------- loading
def load_export_model(
    path: str | os.PathLike,
    rank: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """One EP rank of the export at ``path`` as a causal LM in eval mode.

    Reads ``config.json``, the index, the layout, the shared files and ``rank``'s expert
    files, nothing else. Each MoE layer's experts module holds ``slots_per_rank`` slots
    (dim 0 of ``gate_up_proj`` [S, 2I, H] and ``down_proj`` [S, H, I], ``dtype``) in the
    export's layout; pass the model to :func:`~.patch.apply_eplb` with the export's EP size.

    Raises:
        ValueError for a rank outside the export, a model whose MoE layers or parameter
        shapes disagree with the export, or a tensor the model does not get.
    """
    require_transformers()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = os.fspath(path)
    export = open_export(path)
    export._check_rank(rank)
    family = _family(path)
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    device = torch.device(device)
    expert_names = _load_experts(model, family, export, rank, device, dtype)
    _load_shared(model, export, device, expert_names)
    _materialize_buffers(model, device)
    model.eval()
    model.eplb_export = ExportShard(
        path, rank, export.ep_size, export.moe_layout(),
        [os.path.basename(p) for p in export.opened],
    )  # fmt: skip
    return model


def _load_experts(model, family, export, rank, device, dtype) -> set[str]:
    """Fill every MoE layer's experts with ``rank``'s slots; returns their parameter names."""
    blocks = moe_layers(model, family)
    layer_ids = [i for i, _ in blocks]
    if layer_ids != export.moe_layers:
        raise ValueError(
            f"the model has MoE layers {layer_ids}, the export {export.root!r} {export.moe_layers}"
        )
    slots = export.slots_per_rank
    first = export.local_slots(rank).start
    gate, up, down = family.disk_gate_up_down
    new: dict[int, dict[str, torch.Tensor]] = {}
    names = set()
    for layer, block in blocks:
        experts = getattr(block, family.experts)
        params = dict(experts.named_parameters(recurse=False))
        if set(params) != set(family.expert_params):
            raise ValueError(
                f"layer {layer}: experts module has parameters {sorted(params)}, expected "
                f"{sorted(family.expert_params)}"
            )
        new[layer] = {
            n: torch.empty((slots, *p.shape[1:]), dtype=dtype, device=device)
            for n, p in params.items()
        }
        prefix = next(n for n, m in model.named_modules() if m is experts)
        names.update(f"{prefix}.{n}" for n in params)
    entries = {e["name"]: e for e in export.index["tensors"] if e["rank"] == rank}
    heads = {int(k): v for k, v in export.index["expert_heads"].items()}
    filled: set[tuple[int, int, str]] = set()
    for name, tensor in export.iter_rank_tensors(rank, device):
        entry = entries.get(name)
        if entry is None or entry.get("layer") is None:
            raise ValueError(f"{name} in rank {rank}'s files is not an expert tensor of the index")
        layer = int(entry["layer"])
        tail = name[len(heads[layer]) + 1 :]
        if "rows" in entry:  # fused source: the rank's S slots along dim 0
            _put(new[layer][tail], tensor, name)
            parts = (gate, up) if tail == "gate_up_proj" else (down,)
            filled.update((layer, j, part) for j in range(slots) for part in parts)
            continue
        slot, _, rest = tail.partition(".")
        j, proj = int(slot) - first, rest.removesuffix(".weight")
        gate_up = new[layer]["gate_up_proj"]
        half = gate_up.shape[1] // 2
        if proj == gate:
            _put(gate_up[j, :half], tensor, name)
        elif proj == up:
            _put(gate_up[j, half:], tensor, name)
        else:
            _put(new[layer]["down_proj"][j], tensor, name)
        filled.add((layer, j, proj))
    for layer, _ in blocks:
        for j in range(slots):
            for part in (gate, up, down):
                if (layer, j, part) not in filled:
                    raise ValueError(
                        f"rank {rank}'s files lack {heads[layer]}.{first + j}.{part}.weight"
                    )
    for layer, block in blocks:
        experts = getattr(block, family.experts)
        for n, tensor in new[layer].items():
            setattr(experts, n, torch.nn.Parameter(tensor, requires_grad=False))
        experts.num_experts = slots
        # transformers' experts implementations skip ids >= num_experts (the EP sentinel)
        experts._is_expert_parallel = True
    return names


def _put(target: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(
            f"{name} has shape {list(tensor.shape)}, the model expects {list(target.shape)}"
        )
    target.copy_(tensor)


def _load_shared(model, export, device, expert_names: set[str]) -> None:
    """Load the shared tensors under transformers' names; every other weight must be there."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = model.state_dict()
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    state, unused = {}, []
    for name, tensor in export.shared_tensors(device).items():
        key, converted = rename_source_key(
            name, renamings, converters, model.base_model_prefix, wanted
        )
        if converted is not None or key not in wanted or key in expert_names:
            unused.append(name)  # e.g. DeepSeek-V3's MTP layer: not part of the model
            continue
        want = wanted[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(
                f"shared tensor {name} has shape {list(tensor.shape)}, the model's {key} "
                f"{list(want.shape)}"
            )
        state[key] = tensor.to(want.dtype) if tensor.is_floating_point() else tensor
    missing = sorted(set(wanted) - set(state) - expert_names - set(tied))
    if missing:
        hint = f"; unused tensors in the shared files: {unused[:4]}" if unused else ""
        raise ValueError(
            f"export {export.root!r} lacks {len(missing)} model tensor(s), e.g. {missing[:4]}{hint}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if any(target not in state for target in tied):
        model.tie_weights()


def _materialize_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies) are in no file: recompute them with the
    model's own init, the way ``from_pretrained`` does after loading."""
    for name, module in model.named_modules():
        stale = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not stale:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"{name}: buffers {stale} were not loaded and cannot be recomputed")
        for n in stale:
            module._buffers[n] = torch.empty_like(module._buffers[n], device=device)
        model._init_weights(module)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"tensors left without values after loading: {left[:4]}")
