"""The model families transformers 5.x serves, and where a loaded model keeps its MoE layers.

The table itself is the core's (:mod:`eplb_plugin.families`: on-disk and in-memory names
of each family); this module picks the rows the integration serves and finds their MoE
blocks in a model.
"""

from __future__ import annotations

import torch

from eplb_plugin.families import FAMILIES as MODEL_FAMILIES
from eplb_plugin.families import ModelFamily

# The transformers-served rows of the core's one family table.
MoEFamily = ModelFamily
FAMILIES: dict[str, MoEFamily] = {
    name: family for name, family in MODEL_FAMILIES.items() if family.transformers
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
