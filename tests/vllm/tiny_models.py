"""Tiny MoE checkpoints with random weights, built locally (no download) for the vLLM tests.

``build_tiny_model(path, family)`` writes a transformers checkpoint folder (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) that vLLM loads. The
weights are random; the router is given a skew (a shared direction in every token embedding
that some experts' gate rows align with) so that expert loads are uneven and a rebalance has
something to fix, the way a trained model's loads are uneven.

Also runnable: ``python tests/vllm/tiny_models.py OUT_DIR [deepseek_v3|qwen3_moe]``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

VOCAB = 256
# 16 logical experts, 4 per token, 3 MoE layers: small enough for 2 CPU cores.
FAMILIES = {
    "deepseek_v3": dict(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        # vLLM's CPU MLA attention needs kv_lora_rank + qk_rope_head_dim == 576.
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def build_tiny_model(path: str, family: str = "deepseek_v3", seed: int = 0) -> str:
    """Write a tiny random-weight checkpoint of ``family`` into folder ``path``; returns it.

    Args:
        path: folder to create (written to ``path + ".tmp"`` then renamed).
        family: ``"deepseek_v3"`` or ``"qwen3_moe"``.
        seed: torch seed of the random weights.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: must be one of {', '.join(FAMILIES)}")
    import transformers

    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**FAMILIES[family])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _skew_router(model, family, seed)
    model.save_pretrained(tmp)
    _write_tokenizer(tmp)
    os.replace(tmp, path) if not os.path.exists(path) else _replace_dir(tmp, path)
    return path


def _replace_dir(tmp: str, path: str) -> None:
    import shutil

    shutil.rmtree(path)
    os.replace(tmp, path)


# The hot experts are the high-numbered ones, so that the start-up layout (redundant slots
# holding replicas of experts 0, 1, ...) does not happen to fit the load already.
# DeepSeek-V3's selection adds ``e_score_correction_bias`` to the sigmoid scores (what the
# bias is for in training: steering load): a few hot experts, in two groups.
HOT_BIAS = {15: 0.5, 14: 0.35, 6: 0.3}
# Strength of the gate rows' alignment with the common embedding direction.
PULL = 3.0


def _skew_router(model: torch.nn.Module, family: str, seed: int) -> None:
    """Make expert loads uneven: a common direction in all embeddings that the gate rows of
    high-numbered experts align with (more strongly the higher the expert id), and for
    DeepSeek-V3 a score-correction bias on a few hot experts."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        hidden = emb.shape[1]
        direction = torch.randn(hidden, generator=gen)
        direction /= direction.norm()
        emb.normal_(0.0, 1.0, generator=gen)
        emb += 2.0 * direction
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            weight = getattr(gate, "weight", None)
            if weight is None or weight.dim() != 2 or weight.shape[1] != hidden:
                continue
            num_experts = weight.shape[0]
            weight.normal_(0.0, 0.5, generator=gen)
            pull = torch.linspace(-PULL, PULL, num_experts)
            weight += pull[:, None] * direction[None, :]
            bias = getattr(gate, "e_score_correction_bias", None)
            if bias is not None:
                bias.zero_()
                for expert, value in HOT_BIAS.items():
                    bias[expert] = value


def _write_tokenizer(path: str) -> None:
    """A word-level tokenizer: ``t0`` .. ``t{VOCAB-1}``, whitespace separated."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, VOCAB):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": "<unk>",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "model_max_length": 512,
            },
            f,
        )


if __name__ == "__main__":
    out = sys.argv[1]
    build_tiny_model(out, sys.argv[2] if len(sys.argv) > 2 else "deepseek_v3")
    print(out)
