"""Per-family tables: where each supported transformers 5.x MoE model keeps its parts.

All four families share one shape (checked on transformers 5.23): the decoder layer's MoE
block holds a router ``gate`` returning ``(router_logits, topk_weights, topk_indices)`` and an
experts module with fused ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], called as
``experts(hidden [N, H], top_k_index [N, K], top_k_weights [N, K])``. What differs is kept
here as data, in the spirit of Liger-Kernel's per-model patch functions: names of config
fields, of the block, of the shared experts, and of the per-expert tensors on disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from eplb_plugin.checkpoint import is_moe_layer


@dataclass(frozen=True)
class MoEFamily:
    """Where one model family keeps its MoE parts.

    Attributes:
        name: our name of the family (also the ``model_type`` of its config).
        block: attribute of a decoder layer holding the MoE block in memory.
        router: attribute of the block holding the router.
        experts: attribute of the block holding the fused experts.
        expert_params: expert-dimension parameters of the experts module, each [E, ...].
        router_indices: position of ``topk_indices`` in the router's output tuple.
        router_weights: position of ``topk_weights`` in the router's output tuple.
        shared: attributes of the block that are shared experts (they stay on every rank).
        num_groups_field: config field of the expert-group count (group-limited routing).
        disk_block: name of the MoE block in checkpoint keys.
        disk_expert_params: per-expert tensor names on disk, one of which is enough to tell
            an expert is there; all must be present.
        disk_gate_up_down: the per-expert names on disk of the gate, up and down
            projections: ``gate_up_proj[e] = cat(gate[e], up[e])``, ``down_proj[e] = down[e]``
            (transformers' own conversion when it loads per-expert checkpoints).
    """

    name: str
    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    expert_params: tuple[str, ...] = ("gate_up_proj", "down_proj")
    router_indices: int = 2
    router_weights: int = 1
    shared: tuple[str, ...] = ()
    num_groups_field: str | None = None
    disk_block: str = "mlp"
    disk_expert_params: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    disk_gate_up_down: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def num_experts(self, config) -> int:
        """Logical routed experts per MoE layer (``num_local_experts`` is aliased in all four)."""
        for field in ("n_routed_experts", "num_local_experts", "num_experts"):
            value = getattr(config, field, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(f"config of {self.name} names no routed expert count")

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def num_groups(self, config) -> int:
        if self.num_groups_field is None:
            return 1
        return int(getattr(config, self.num_groups_field, 1) or 1)

    def is_moe_layer(self, config, layer: int) -> bool:
        """Whether decoder layer ``layer`` has a routed MoE block (mirrors the model's rule)."""
        return is_moe_layer(self.name, config, layer)


FAMILIES: dict[str, MoEFamily] = {
    f.name: f
    for f in (
        MoEFamily("deepseek_v3", shared=("shared_experts",), num_groups_field="n_group"),
        MoEFamily(
            "mixtral",
            disk_block="block_sparse_moe",
            disk_expert_params=("w1", "w2", "w3"),
            disk_gate_up_down=("w1", "w3", "w2"),
        ),
        MoEFamily("qwen2_moe", shared=("shared_expert", "shared_expert_gate")),
        MoEFamily("qwen3_moe"),
    )
}


def require_transformers() -> str:
    """The installed transformers version; ValueError unless 5.x or newer is importable.

    The fused experts layout and the router returning ``(logits, weights, indices)`` that
    the tables describe appeared in transformers 5.
    """
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ValueError("the transformers integration needs `pip install 'transformers>=5'`")
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ValueError(
            f"transformers {transformers.__version__} is installed; the integration needs >= 5"
        )
    return transformers.__version__


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def family_of(config) -> MoEFamily:
    """The family table of a transformers config; ValueError names an unsupported type."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported: "
            f"{', '.join(supported_families())}"
        )
    return FAMILIES[model_type]


def moe_layers(model: torch.nn.Module, family: MoEFamily) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, MoE block) of every routed MoE layer, in order.

    The MoE layer index used by layouts (``l`` in ``phy2log[l]``) is the position in this list.
    """
    decoder = _decoder_layers(model)
    found = []
    for index, layer in enumerate(decoder):
        block = getattr(layer, family.block, None)
        if block is not None and hasattr(block, family.experts) and hasattr(block, family.router):
            found.append((index, block))
    if not found:
        raise ValueError(f"{type(model).__name__} has no {family.name} MoE layer")
    return found


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layer list at .model.layers")
    return layers


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
    ``eplb export`` folder is checked by :func:`~.loading.check_export` (any EP size).
    """
    require_transformers()
    import transformers

    from .loading import check_export, is_export

    if os.path.isdir(path) and is_export(path):
        family, config, _ = check_export(path)
        return family, config

    raw = read_config(path)
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type={model_type!r} in {path}/config.json is not supported; supported: "
            f"{', '.join(supported_families())}"
        )
    family = FAMILIES[model_type]
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
