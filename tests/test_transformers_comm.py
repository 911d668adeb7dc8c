"""Token exchange backends on gloo ranks: torch all_to_all and the DeepEP adapter agree."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_utils import run_ranks  # noqa: E402

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")
SLOTS = 3


def _slot_experts(x, ids, w, rank):
    """A stand-in experts module: slot p multiplies its rows by p + 1 (p global)."""
    held = ids < SLOTS
    scale = torch.where(held, (ids + rank * SLOTS + 1).float(), 0.0) * w.float()
    return x.float() * scale.sum(1, keepdim=True)


def _exchange_body(rank: int, world_size: int, backend: str) -> float:
    import torch.distributed as dist

    from eplb_plugin.integrations.transformers.comm import DeepEPAllToAll, TorchAllToAll

    gen = torch.Generator().manual_seed(rank)
    num_tokens = 4 + rank  # uneven batches
    hidden = torch.randn(num_tokens, 32, generator=gen).to(torch.bfloat16)
    slot = torch.stack(
        [torch.randperm(SLOTS * world_size, generator=gen)[:2] for _ in range(num_tokens)]
    )
    weight = torch.rand(num_tokens, 2, generator=gen)
    if backend == "deepep":
        sys.path.insert(0, FAKES)
        import deep_ep

        assert deep_ep.FAKE
        comm = DeepEPAllToAll(dist.group.WORLD, world_size, SLOTS, 64)
    else:
        comm = TorchAllToAll(None, world_size, SLOTS)
    x, ids, w, handle = comm.dispatch(hidden, slot, weight)
    assert ids.shape[1] == 2 and bool(((ids < SLOTS) | (w == 0)).all())
    out = comm.combine(_slot_experts(x, ids, w, rank).to(x.dtype), handle).float()
    expect = hidden.float() * ((slot + 1).float() * weight).sum(1, keepdim=True)
    return float(((out - expect).abs() / expect.abs().clamp(min=1)).max())


@pytest.mark.parametrize("backend", ["torch", "deepep"])
def test_dispatch_combine_sums_every_slot_once(backend):
    # DeepEP has configs for 2, 4, 8, ... ranks only (Buffer.get_dispatch_config)
    errors = run_ranks(_exchange_body, 3 if backend == "torch" else 2, backend, timeout=120)
    # bf16 rows: one rounding on the way out and one on the way back
    assert max(errors) < 3e-2


def _model_body(rank: int, world_size: int) -> dict[str, float]:
    import copy

    from eplb_plugin.config import EplbConfig
    from eplb_plugin.integrations.transformers import apply_eplb
    from eplb_plugin.integrations.transformers.tiny import build_tiny_model

    sys.path.insert(0, FAKES)
    import deep_ep

    assert deep_ep.FAKE
    model = build_tiny_model("qwen2_moe", seed=5)  # same weights on every rank
    tokens = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(rank))
    errors = {}
    for backend in ("torch", "deepep"):
        sharded = copy.deepcopy(model)
        handle = apply_eplb(sharded, EplbConfig(enable=False), comm=backend)
        assert handle.runtime.comm.name == backend
        with torch.no_grad():
            ref, out = model(tokens).logits, sharded(tokens).logits
        errors[backend] = float((out - ref).abs().max())
    return errors


def test_apply_eplb_with_each_backend_matches_unsharded():
    results = run_ranks(_model_body, 2, timeout=180, env={"EPLB_KERNELS": "torch"})
    # torch exchanges float32 rows exactly; DeepEP's normal mode carries bf16 rows
    assert max(r["torch"] for r in results) < 1e-5
    assert max(r["deepep"] for r in results) < 5e-2
