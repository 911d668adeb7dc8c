"""The one table of supported MoE model families: where each keeps its routed experts, on
disk (checkpoint names, read by ``eplb export`` without transformers) and in memory (the
transformers 5.x modules the transformers integration patches).

One row per config ``model_type``. Rows that share their checkpoint naming share a
``naming`` group ("deepseek", "qwen_moe", "mixtral"): :mod:`eplb_plugin.checkpoint` detects a
checkpoint's group from its tensor names, and an export's index records that group.

In memory, all four transformers families share one shape (checked on transformers 5.23):
the decoder layer's MoE block holds a router ``gate`` returning ``(router_logits,
topk_weights, topk_indices)`` and an experts module with fused ``gate_up_proj`` [E, 2I, H]
and ``down_proj`` [E, H, I], called as ``experts(hidden [N, H], top_k_index [N, K],
top_k_weights [N, K])``. What differs is kept here as data, in the spirit of Liger-Kernel's
per-model patch functions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    """Where one model type keeps its MoE parts.

    Attributes:
        name: the config's ``model_type``.
        naming: the checkpoint naming group (rows with the same expert names on disk).
        num_experts_key: config field of the routed expert count.
        disk_block: name of the MoE block in checkpoint keys (experts under
            ``layers.{l}.{disk_block}.experts``).
        disk_expert_params: per-expert tensor names on disk, all present for each expert.
        disk_gate_up_down: the per-expert names on disk of the gate, up and down
            projections: ``gate_up_proj[e] = cat(gate[e], up[e])``, ``down_proj[e] = down[e]``
            (transformers' own conversion when it loads per-expert checkpoints).
        transformers: whether the transformers integration serves this type (the in-memory
            fields below describe transformers 5.x's modules).
        block: attribute of a decoder layer holding the MoE block in memory.
        router: attribute of the block holding the router.
        experts: attribute of the block holding the fused experts.
        expert_params: expert-dimension parameters of the experts module, each [E, ...].
        router_indices: position of ``topk_indices`` in the router's output tuple.
        router_weights: position of ``topk_weights`` in the router's output tuple.
        shared: attributes of the block that are shared experts (they stay on every rank).
        num_groups_field: config field of the expert-group count (group-limited routing).
    """

    name: str
    naming: str
    num_experts_key: str
    disk_block: str = "mlp"
    disk_expert_params: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    disk_gate_up_down: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    transformers: bool = True
    block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    expert_params: tuple[str, ...] = ("gate_up_proj", "down_proj")
    router_indices: int = 2
    router_weights: int = 1
    shared: tuple[str, ...] = ()
    num_groups_field: str | None = None

    @property
    def disk_module(self) -> str:
        """Path of the experts module inside a decoder layer in checkpoint keys."""
        return f"{self.disk_block}.experts"

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


_DEEPSEEK = dict(naming="deepseek", num_experts_key="n_routed_experts")
_QWEN = dict(naming="qwen_moe", num_experts_key="num_experts")

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("deepseek_v2", **_DEEPSEEK, transformers=False),
        ModelFamily(
            "deepseek_v3", **_DEEPSEEK, shared=("shared_experts",), num_groups_field="n_group"
        ),
        ModelFamily("kimi_k2", **_DEEPSEEK, transformers=False),
        ModelFamily("qwen2_moe", **_QWEN, shared=("shared_expert", "shared_expert_gate")),
        ModelFamily("qwen3_moe", **_QWEN),
        ModelFamily(
            "mixtral",
            naming="mixtral",
            num_experts_key="num_local_experts",
            disk_block="block_sparse_moe",
            disk_expert_params=("w1", "w2", "w3"),
            disk_gate_up_down=("w1", "w3", "w2"),
        ),
    )
}


def is_moe_layer(model_type: str, config: object, layer: int) -> bool:
    """Whether decoder layer ``layer`` has routed experts, by the model code's own rule.

    Args:
        model_type: config.json's ``model_type``.
        config: the (text) config, as a dict or an object with attributes.
    """

    def field(name: str, default: object) -> object:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        return default if value is None else value

    if model_type in ("deepseek_v2", "deepseek_v3", "kimi_k2"):
        freq = int(field("moe_layer_freq", 1))
        return layer >= int(field("first_k_dense_replace", 0)) and layer % freq == 0
    if model_type in ("qwen2_moe", "qwen3_moe"):
        return (
            layer not in field("mlp_only_layers", [])
            and int(field("num_experts", 0)) > 0
            and (layer + 1) % int(field("decoder_sparse_step", 1)) == 0
        )
    return True
