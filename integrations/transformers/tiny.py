"""Tiny random-weight models of the supported families, built locally (no download).

Used by ``eplb demo`` (a DeepSeek-V3-architecture model) and by the tests.
"""

from __future__ import annotations

import os
import tempfile

import torch

# Small enough to decode on 2 CPU cores in seconds, big enough to have several MoE layers,
# expert groups (DeepSeek) and shared experts (DeepSeek, Qwen2-MoE).
_BASE = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip

TINY_CONFIGS: dict[str, dict] = {
    "deepseek_v3": dict(
        num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
    ),
    "mixtral": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=16,
                      shared_expert_intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(num_hidden_layers=2, intermediate_size=64, moe_intermediate_size=16,
                      num_experts=8, num_experts_per_tok=2, head_dim=8),
}  # fmt: skip

_CLASSES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}

# The demo's model: DeepSeek-V3 architecture with the routed-expert shape of the bundled
# traces (64 experts, top-6), so trace-driven routing replays real choices one to one.
DEMO_CONFIG = dict(
    TINY_CONFIGS["deepseek_v3"], hidden_size=64, num_hidden_layers=5, n_routed_experts=64,
    num_experts_per_tok=6, n_group=8, topk_group=4, moe_intermediate_size=32,
)  # fmt: skip


def build_tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-weight ``<Family>ForCausalLM`` in eval mode, float32, on CPU."""
    import transformers

    if family not in _CLASSES:
        raise ValueError(f"family={family!r} must be one of {', '.join(sorted(_CLASSES))}")
    cfg_name, model_name = _CLASSES[family]
    values = dict(_BASE, **TINY_CONFIGS[family])
    values.update(overrides)
    config = getattr(transformers, cfg_name)(**values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    return model.eval()


def save_tiny_model(family: str, path: str, seed: int = 0, **overrides) -> str:
    """Build a tiny model and write it as a checkpoint folder (safetensors) at ``path``."""
    import transformers

    model = build_tiny_model(family, seed, **overrides)
    os.makedirs(path, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        model.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    return path
