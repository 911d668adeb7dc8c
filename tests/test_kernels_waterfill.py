"""The fused Triton water-fill (interpreted on CPU) against the torch reference
``waterfill_shares``: the same algorithm, within float32 rounding (sums in another order)."""

from __future__ import annotations

import pytest
import torch

from eplb_plugin.kernels._backend import HAS_TRITON, interpreting
from eplb_plugin.kernels._backend import forced_backend as kernels
from eplb_plugin.kernels.waterfill import MOMENTUM, waterfill_shares
from eplb_plugin.kernels.waterfill_fused import waterfill, waterfill_shares_triton
from eplb_plugin.layout import ExpertLayout, Topology

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and interpreting()), reason="needs Triton with TRITON_INTERPRET=1"
)

# float32 shares after up to 32 damped sweeps; observed differences are a few ulps (<= 2e-7)
ATOL = 2e-5


def odd_layout(
    num_layers: int, num_experts: int, num_gpus: int, slots_per_gpu: int, seed: int
) -> ExpertLayout:
    """Every expert once, extra replicas drawn with a bias to a few hot experts (so some
    have several replicas, some twice on one GPU); random shares per expert."""
    g = torch.Generator().manual_seed(seed)
    num_slots = num_gpus * slots_per_gpu
    rows = []
    for _ in range(num_layers):
        weights = torch.rand(num_experts, generator=g) ** 4 + 0.01
        extra = num_slots - num_experts
        extra = torch.multinomial(weights, extra, True, generator=g) if extra else weights[:0]
        row = torch.cat([torch.arange(num_experts), extra.long()])
        rows.append(row[torch.randperm(num_slots, generator=g)])
    phy2log = torch.stack(rows)
    raw = torch.rand(num_layers, num_slots, generator=g) + 0.05
    total = torch.zeros(num_layers, num_experts).scatter_add_(1, phy2log, raw)
    share = (raw / total.gather(1, phy2log)).float()
    topo = Topology(num_replicas=num_slots, num_gpus=num_gpus)
    return ExpertLayout.from_phy2log(phy2log, topo, num_experts=num_experts, replica_share=share)


def random_counts(num_layers: int, num_experts: int, seed: int) -> torch.Tensor:
    """[L, E] float32 skewed counts with some idle (zero) experts."""
    g = torch.Generator().manual_seed(seed + 1000)
    counts = (torch.rand(num_layers, num_experts, generator=g) ** 3 * 200).round()
    counts[torch.rand(num_layers, num_experts, generator=g) < 0.2] = 0
    return counts


def both(
    layout: ExpertLayout,
    counts: torch.Tensor,
    iters: int,
    cube: bool | None = None,
    momentum: float = MOMENTUM,
):
    args = (counts, layout.phy2log, layout.log2phy, layout.logcnt,
            layout.topology.slots_per_gpu, layout.replica_share, iters)  # fmt: skip
    return (
        waterfill_shares_triton(*args, cube=cube, momentum=momentum),
        waterfill_shares(*args, momentum=momentum),
    )


def check_shares(layout: ExpertLayout, counts: torch.Tensor, share: torch.Tensor) -> None:
    assert share.dtype == torch.float32 and share.shape == layout.phy2log.shape
    assert bool((share >= 0).all())
    per_expert = torch.zeros(layout.num_layers, layout.num_experts, dtype=torch.float64)
    per_expert.scatter_add_(1, layout.phy2log, share.double())
    torch.testing.assert_close(per_expert, torch.ones_like(per_expert), atol=1e-5, rtol=0)
    single = layout.logcnt.gather(1, layout.phy2log) == 1
    assert bool((share[single] == 1).all())
    idle = (counts.gather(1, layout.phy2log) == 0) & ~single
    torch.testing.assert_close(share[idle], layout.replica_share[idle], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "num_layers,num_experts,num_gpus,slots_per_gpu,iters",
    [
        (2, 7, 3, 3, 8),  # P = 9, G = 3: nothing a power of two
        (1, 10, 5, 4, 3),  # G = 5, 4 slots per GPU
        (2, 6, 7, 1, 2),  # one slot per GPU
        (1, 5, 3, 5, 1),  # 15 slots for 5 experts: up to ~8 replicas, many doubled on a GPU
        (1, 9, 6, 2, 0),  # no sweep: base shares, singles 1, renormalised
        (1, 5, 3, 2, 32),  # 32 sweeps (small: the interpreter runs about 10 sweeps a second)
        (1, 12, 4, 3, 1),  # every expert once: nothing to move
    ],
)
def test_fused_matches_torch_reference(num_layers, num_experts, num_gpus, slots_per_gpu, iters):
    seed = num_experts * 100 + num_gpus * 10 + slots_per_gpu
    layout = odd_layout(num_layers, num_experts, num_gpus, slots_per_gpu, seed)
    counts = random_counts(num_layers, num_experts, seed)
    fused, ref = both(layout, counts, iters)
    torch.testing.assert_close(fused, ref, atol=ATOL, rtol=0)
    check_shares(layout, counts, fused)
    if iters > 0 and layout.num_slots > layout.num_experts:
        assert not torch.equal(ref, layout.replica_share), "the case moved nothing"


@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.9])
@pytest.mark.parametrize(
    "num_layers,num_experts,num_gpus,slots_per_gpu,iters,seed",
    [
        (2, 7, 3, 3, 8, 0),
        (1, 5, 3, 5, 6, 0),  # many replicas, doubled on a GPU: momentum clamps shares at 0
        (1, 10, 4, 4, 32, 1),
    ],
)
def test_fused_momentum_matches_torch_reference(
    num_layers, num_experts, num_gpus, slots_per_gpu, iters, seed, momentum
):
    """Momentum on and off (0.9: overshoot, shares clamped at 0): the same shares. The
    cases are ones where momentum changes the result (in many tiny ones it never kicks)."""
    seed += num_experts * 100 + num_gpus * 10 + slots_per_gpu
    layout = odd_layout(num_layers, num_experts, num_gpus, slots_per_gpu, seed)
    counts = random_counts(num_layers, num_experts, seed)
    fused, ref = both(layout, counts, iters, momentum=momentum)
    torch.testing.assert_close(fused, ref, atol=ATOL, rtol=0)
    check_shares(layout, counts, fused)
    plain = waterfill_shares(
        counts, layout.phy2log, layout.log2phy, layout.logcnt, slots_per_gpu,
        layout.replica_share, iters, momentum=0.0,
    )  # fmt: skip
    assert torch.equal(ref, plain) == (momentum == 0.0)


@pytest.mark.parametrize("num_experts,num_gpus,slots_per_gpu", [(5, 3, 5), (7, 3, 3)])
def test_column_loops_match_the_cubes(num_experts, num_gpus, slots_per_gpu):
    """Wide layouts on a GPU loop over columns instead of [G, S, S] / [E, X, X] tiles (the
    interpreter's default): the same shares."""
    seed = num_experts + slots_per_gpu
    layout = odd_layout(1, num_experts, num_gpus, slots_per_gpu, seed)
    counts = random_counts(1, num_experts, seed)
    loops, ref = both(layout, counts, 4, cube=False)
    torch.testing.assert_close(loops, ref, atol=ATOL, rtol=0)
    check_shares(layout, counts, loops)
    cubes, _ = both(layout, counts, 4, cube=True)
    torch.testing.assert_close(loops, cubes, atol=ATOL, rtol=0)


def test_duplicates_on_one_gpu_and_integer_counts():
    # expert 0 twice on GPU 0 and once on GPU 1; expert 1 on both GPUs; expert 2 idle
    phy2log = torch.tensor([[0, 0, 1, 2, 0, 1, 2, 3]])
    share = torch.tensor([[0.5, 0.2, 0.7, 0.4, 0.3, 0.3, 0.6, 1.0]])
    topo = Topology(num_replicas=8, num_gpus=2)
    layout = ExpertLayout.from_phy2log(phy2log, topo, num_experts=4, replica_share=share)
    counts = torch.tensor([[90, 30, 0, 5]], dtype=torch.int32)
    for iters in (1, 4):
        fused, ref = both(layout, counts, iters)
        torch.testing.assert_close(fused, ref, atol=ATOL, rtol=0)
        check_shares(layout, counts, fused)
        assert not torch.equal(fused, layout.replica_share)


def test_dispatch_follows_the_backend():
    layout = odd_layout(1, 6, 3, 3, seed=4)
    counts = random_counts(1, 6, seed=4)
    args = (counts, layout.phy2log, layout.log2phy, layout.logcnt, 3, layout.replica_share, 8)
    with kernels("torch"):
        assert torch.equal(waterfill(*args), waterfill_shares(*args))  # the reference itself
    with kernels("triton"):
        torch.testing.assert_close(waterfill(*args), waterfill_shares(*args), atol=ATOL, rtol=0)


def test_layouts_wider_than_one_block_run_the_torch_reference(monkeypatch):
    from eplb_plugin.kernels import waterfill_fused
    from eplb_plugin.kernels.waterfill_fused import MAX_TILE_ELEMENTS, fits_one_block

    assert fits_one_block(256, 4, 320, 1) and fits_one_block(512, 8, 128, 8)  # DeepSeek-V3 up
    assert not fits_one_block(MAX_TILE_ELEMENTS, 2, 8, 1)  # [E, X] tile too wide
    assert not fits_one_block(8, 1, 2, MAX_TILE_ELEMENTS)  # [G, S] tile too wide
    layout = odd_layout(1, 6, 3, 3, seed=6)
    counts = random_counts(1, 6, seed=6)
    args = (counts, layout.phy2log, layout.log2phy, layout.logcnt, 3, layout.replica_share, 8)
    monkeypatch.setattr(waterfill_fused, "MAX_TILE_ELEMENTS", 4)  # this layout is now "wide"
    with kernels("triton"):
        assert torch.equal(waterfill(*args), waterfill_shares(*args))  # the reference itself


def test_bad_arguments_raise():
    layout = odd_layout(1, 6, 3, 3, seed=5)
    counts = random_counts(1, 6, seed=5)
    with pytest.raises(ValueError, match="slots_per_gpu"):
        waterfill_shares_triton(
            counts, layout.phy2log, layout.log2phy, layout.logcnt, 4, layout.replica_share
        )
    with pytest.raises(ValueError, match="iters"):
        waterfill_shares_triton(
            counts, layout.phy2log, layout.log2phy, layout.logcnt, 3, layout.replica_share, -1
        )
    with pytest.raises(ValueError, match="momentum"):
        waterfill_shares_triton(
            counts, layout.phy2log, layout.log2phy, layout.logcnt, 3, layout.replica_share,
            momentum=1.0,
        )  # fmt: skip


COMPILE_SM90 = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from eplb_plugin.kernels.waterfill_fused import _waterfill_kernel

sig = {"counts_ptr": "*fp32", "phy2log_ptr": "*i64", "log2phy_ptr": "*i64",
       "logcnt_ptr": "*i64", "base_ptr": "*fp32", "out_ptr": "*fp32", "scratch_ptr": "*fp32",
       "iters": "i32", "momentum": "fp32", "num_experts": "i32", "width": "i32", "num_gpus": "i32",
       "scratch_stride": "i32"}
for cube in (False, True):
    consts = dict(S=3, G_PAD=4, S_PAD=4, E_PAD=8, X_PAD=4, OWN_CUBE=cube, LEVEL_CUBE=cube)
    src = ASTSource(fn=_waterfill_kernel, signature={**sig, **dict.fromkeys(consts, "constexpr")},
                    constexprs=consts)
    kernel = compile(src, target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=4, enable_fp_fusion=False))
    assert kernel.asm["cubin"] and "bar.sync" in kernel.asm["ptx"]
print("compiled")
"""


def test_compiles_for_hopper_without_a_gpu(tmp_path):
    """The interpreter cannot show that the kernel compiles: build it for sm_90 (Triton's
    bundled ptxas; no GPU or driver needed), column loops and cubes, in a process without
    TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real build, not a cached one
    proc = subprocess.run([sys.executable, "-c", COMPILE_SM90], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not installed")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
