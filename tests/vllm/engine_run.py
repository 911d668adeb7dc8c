"""One vLLM process, the same prompts twice: plugin off, then plugin on (redundant slots).

Run by tests/vllm/test_vllm_engine.py in a subprocess (vLLM keeps process-wide state, and
the root conftest's TRITON_INTERPRET must not reach vLLM):

    python tests/vllm/engine_run.py MODEL_DIR OUT.json [--compile BACKEND] [--eplb-* ...]

Without ``--compile`` the engines run eagerly (``enforce_eager``); ``--compile eager`` runs
vLLM's compilation (Dynamo tracing, graph splitting) with the eager backend, ``--compile
inductor`` with Inductor (minutes on 2 cores).

Writes JSON: ``base`` and ``on`` generated token ids, ``summary`` (the worker's balancer
state), ``history`` (per engine step: counts [L, P] and the phy2log [L, P] in force) and
the prompts' lengths.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random

PROMPTS = 8
MAX_TOKENS = 16


def prompts(seed: int = 0) -> list[str]:
    """8 prompts of 6-12 words of the tiny tokenizer's vocabulary (t3 .. t255)."""
    rng = random.Random(seed)
    return [" ".join(f"t{rng.randrange(3, 256)}" for _ in range(rng.randrange(6, 13)))
            for _ in range(PROMPTS)]  # fmt: skip


def engine_kwargs(model: str, compile_backend: str | None) -> dict:
    kwargs = dict(
        model=model, dtype="float32", enforce_eager=compile_backend is None, max_model_len=128,
        max_num_seqs=PROMPTS, max_num_batched_tokens=256, seed=0,
        kv_cache_memory_bytes=64 << 20,
    )  # fmt: skip
    if compile_backend is not None:
        kwargs["compilation_config"] = {"backend": compile_backend}
    if uses_mla(model):
        # vLLM prefers its AMX MLA backend on CPUs with AMX, and that one refuses fp32 weights
        kwargs["attention_backend"] = "CPU_MLA"
    return kwargs


def uses_mla(model: str) -> bool:
    """Whether vLLM runs the checkpoint's attention as MLA (DeepSeek-V3's latent KV)."""
    with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
        return bool(json.load(f).get("kv_lora_rank"))


def generate(llm, texts: list[str]) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens of each prompt, and each prompt's length in tokens."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(texts, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return tokens, [len(o.prompt_token_ids) for o in outputs]


def main() -> None:
    from eplb_plugin.config import EplbConfig, add_cli_options

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--compile", choices=("eager", "inductor"), default=None)
    parser.add_argument("--skip-base", action="store_true", help="no run with the plugin off")
    add_cli_options(parser)
    args = parser.parse_args()
    config = EplbConfig.from_cli(args)

    from vllm import LLM

    from eplb_plugin.integrations import vllm as eplb_vllm
    from eplb_plugin.integrations.vllm.runtime import (
        worker_history,
        worker_keep_history,
        worker_summary,
    )

    texts = prompts()
    kwargs = engine_kwargs(args.model, args.compile)
    base, lengths = None, None
    if not args.skip_base:
        llm = LLM(**kwargs)
        assert llm.collective_rpc(worker_summary) == [None]  # plugin off: nothing attached
        base, lengths = generate(llm, texts)
        del llm
        gc.collect()

    eplb_vllm.enable(config)
    llm = LLM(**kwargs)
    assert llm.collective_rpc(worker_keep_history, args=(True,)) == [True]
    on, _ = generate(llm, texts)
    (summary,) = llm.collective_rpc(worker_summary)
    (history,) = llm.collective_rpc(worker_history)
    result = {"base": base, "on": on, "summary": summary, "history": history,
              "prompt_lengths": lengths, "max_tokens": MAX_TOKENS}  # fmt: skip
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
