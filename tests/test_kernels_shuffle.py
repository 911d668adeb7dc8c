"""shuffle_experts: the copy plan, the Triton kernel (interpreted) and the torch path against
a full-copy oracle written here (it shares no code with the op), bit for bit, over dtypes,
odd shapes, cycles, duplicates and budgets."""

from __future__ import annotations

import importlib
import random

import pytest
import torch

from eplb_plugin.kernels import shuffle_plan
from eplb_plugin.kernels.shuffle_experts import shuffle_experts

DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
]


def naive_shuffle(tensors: list[torch.Tensor], new_to_old: list[int]) -> None:
    """Oracle: ``t[s] = old_t[new_to_old[s]]`` row by row from a full copy of each tensor."""
    for t in tensors:
        old = t.clone()
        for s, m in enumerate(new_to_old):
            if m >= 0:
                t[s] = old[m]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN payloads and -0.0 compare exactly)."""
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


def random_tensor(shape, dtype, gen) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype``: NaNs, infinities and denormals included."""
    raw = torch.randint(
        0, 256, (*shape[:-1], shape[-1] * dtype.itemsize), dtype=torch.uint8, generator=gen
    )
    return raw.view(dtype)


def expert_tensors(num_slots: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A mixed set like one MoE layer's: weights, fp8 weights + block scales, packed int4 in
    uint8, a bias, and a view whose slot stride is not its row size."""
    wide = random_tensor((num_slots, 2, 12), torch.float32, gen)
    return [
        random_tensor((num_slots, 6, 10), torch.bfloat16, gen),
        random_tensor((num_slots, 5, 7), torch.float8_e4m3fn, gen),
        random_tensor((num_slots, 3, 1), torch.float32, gen),
        random_tensor((num_slots, 9), torch.uint8, gen),
        random_tensor((num_slots,), torch.float16, gen),
        wide[:, 1, 2:9],  # rows of 7 floats, slot stride 24
    ]


def random_mapping(num_slots: int, rng: random.Random, p_dup=0.2, p_keep=0.1, p_hole=0.1):
    """A permutation (cycles of every length) with some duplicates, fixed points and -1."""
    perm = list(range(num_slots))
    rng.shuffle(perm)
    out = []
    for s in range(num_slots):
        r = rng.random()
        if r < p_dup:
            out.append(rng.randrange(num_slots))
        elif r < p_dup + p_keep:
            out.append(s)
        elif r < p_dup + p_keep + p_hole:
            out.append(-1)
        else:
            out.append(perm[s])
    return out


def apply_plan(plan: shuffle_plan.ShufflePlan, labels: list[int]) -> list[int]:
    """Run a plan on labels (one per slot) and check its invariants on the way."""
    labels = list(labels)
    stage = [None] * plan.num_staging
    for wave in plan.waves:
        for step in wave:
            assert len(set(step.dst)) == len(step.dst), "a step writes a row twice"
            if step.kind == "slot":
                assert not set(step.dst) & set(step.src), "a step reads a row it writes"
            src = stage if step.kind == "unstage" else labels
            values = [src[s] for s in step.src]
            assert None not in values, "a staging row is read before it is written"
            dst = stage if step.kind == "stage" else labels
            for d, v in zip(step.dst, values):
                dst[d] = v
    return labels


@pytest.mark.parametrize("extra_cuts", [True, False])
@pytest.mark.parametrize("max_staging", [1, 2, 3, 64])
def test_plan_realises_the_mapping(max_staging, extra_cuts):
    rng = random.Random(max_staging)
    for _ in range(300):
        n = rng.randrange(0, 24)
        mapping = random_mapping(n, rng, p_dup=rng.random() * 0.4)
        plan = shuffle_plan.plan_shuffle(mapping, max_staging, extra_cuts)
        want = [s if m < 0 else m for s, m in enumerate(mapping)]
        assert apply_plan(plan, list(range(n))) == want
        assert plan.num_staging <= max_staging
        moved = sum(1 for s, m in enumerate(mapping) if m >= 0 and m != s)
        staged = sum(len(st.dst) for w in plan.waves for st in w if st.kind == "stage")
        assert plan.num_copies == moved + staged  # each moved row written once


def test_plan_staging_and_step_counts():
    cycle = [1, 2, 3, 4, 5, 6, 7, 0]  # one cycle of 8
    one = shuffle_plan.plan_shuffle(cycle, 1)
    assert one.num_staging == 1 and len(one.waves) == 1 + 8
    wide = shuffle_plan.plan_shuffle(cycle, 8)
    assert wide.num_staging == 8 and len(wide.waves) == 2
    uncut = shuffle_plan.plan_shuffle(cycle, 8, extra_cuts=False)
    assert uncut.num_staging == 1 and uncut.num_copies == 8 + 1
    two = shuffle_plan.plan_shuffle([1, 0, 3, 2, 5, 6, 4], 8, extra_cuts=False)
    assert two.num_staging == 3 and len(two.waves) == 1 + 3  # all cycles at once
    # pure replication and fixed points need no staging at all
    fan = shuffle_plan.plan_shuffle([0, 0, 0, 3, -1], 1)
    assert fan.num_staging == 0 and len(fan.waves) == 1
    assert shuffle_plan.plan_shuffle([0, 1, -1], 1).waves == ()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (5, 1), (5, 3, 7), (5, 33), (5, 2, 0)])
def test_every_dtype_and_shape_bit_exact(dtype, shape, backend, monkeypatch):
    monkeypatch.setenv("EPLB_KERNELS", backend)
    gen = torch.Generator().manual_seed(len(shape))
    mapping = [4, 0, 0, -1, 1]  # a 3-cycle through a duplicate, a hole
    t = random_tensor(shape, dtype, gen) if shape[-1] else torch.empty(shape, dtype=dtype)
    want = [t.clone()]
    naive_shuffle(want, mapping)
    shuffle_experts([t], torch.tensor(mapping))
    assert torch.equal(bits(t), bits(want[0]))


@pytest.mark.parametrize("staging_bytes", [None, 200, 10_000, 1 << 20])
def test_random_shuffles_match_the_oracle(staging_bytes):
    rng = random.Random(staging_bytes or 0)
    gen = torch.Generator().manual_seed(1)
    for trial in range(6):
        n = rng.choice([1, 2, 7, 13])
        mapping = random_mapping(n, rng)
        tensors = expert_tensors(n, gen)
        want = [t.clone() for t in tensors]
        naive_shuffle(want, mapping)
        index = torch.tensor(mapping) if trial % 2 else mapping  # tensor or list
        shuffle_experts(tensors, index, staging_bytes=staging_bytes)
        for got, exp in zip(tensors, want):
            assert torch.equal(bits(got), bits(exp))


def test_torch_path_matches_the_oracle(monkeypatch):
    monkeypatch.setenv("EPLB_KERNELS", "torch")
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    for staging_bytes in (None, 150):
        mapping = random_mapping(11, rng)
        tensors = expert_tensors(11, gen)
        want = [t.clone() for t in tensors]
        naive_shuffle(want, mapping)
        shuffle_experts(tensors, mapping, staging_bytes=staging_bytes)
        for got, exp in zip(tensors, want):
            assert torch.equal(bits(got), bits(exp))


def test_caller_staging_buffer_is_used():
    gen = torch.Generator().manual_seed(2)
    tensors = [random_tensor((6, 4), torch.float32, gen), random_tensor((6, 3), torch.int8, gen)]
    mapping = [5, 0, 1, 2, 3, 4]  # one 6-cycle
    want = [t.clone() for t in tensors]
    naive_shuffle(want, mapping)
    staging = torch.full((32,), 0xAB, dtype=torch.uint8)  # one 16-byte row + one 3-byte row
    shuffle_experts(tensors, mapping, staging=staging)
    for got, exp in zip(tensors, want):
        assert torch.equal(bits(got), bits(exp))
    assert not staging.eq(0xAB).all()  # the cycle went through it


def test_empty_and_noop():
    empty = torch.empty(0, 4)
    shuffle_experts([empty], torch.empty(0, dtype=torch.int64))
    t = torch.arange(12.0).view(4, 3)
    shuffle_experts([t], [0, 1, -1, 3])
    assert torch.equal(t, torch.arange(12.0).view(4, 3))
    zero_width = torch.empty(3, 0)
    shuffle_experts([zero_width, torch.arange(3.0)], [2, 0, 1])


def _twins():
    t = torch.arange(12.0).view(4, 3)
    return [t, t.view(4, 3)]


@pytest.mark.parametrize(
    "tensors,mapping,kw,match",
    [
        (lambda: [torch.zeros(4, 2), torch.zeros(5, 2)], [0, 1, 2, 3], {}, "same slot count"),
        (
            lambda: [torch.zeros(4, 2), torch.zeros(4, 2, device="meta")],
            [0, 1, 2, 3],
            {},
            "is on meta",
        ),
        (lambda: [torch.zeros(3, 4).t()], [0, 1, 2, 3], {}, "non-overlapping slot rows"),
        (lambda: [torch.zeros(1, 3).expand(4, 3)], [0, 1, 2, 3], {}, "contiguous"),
        (lambda: [torch.zeros(4, 3)], [0, 1, 2], {}, "new_to_old has 3 entries"),
        (lambda: [torch.zeros(4, 3)], [0, 1, 2, 4], {}, r"new_to_old\[3\] = 4"),
        (lambda: [torch.zeros(4, 3)], [0, -2, 2, 3], {}, r"new_to_old\[1\] = -2"),
        (lambda: [torch.zeros(4, 3)], torch.zeros(4), {}, "new_to_old must be"),
        (lambda: [torch.zeros(4, 3)], [1, 0, 2, 3], {"staging_bytes": 11}, "staging_bytes=11"),
        (lambda: [torch.zeros(4, 3)], [1, 0, 2, 3], {"staging": torch.zeros(12)}, "staging"),
        (lambda: torch.zeros(4, 3), [1, 0, 2, 3], {}, "must be a list"),
        (lambda: _twins(), [1, 0, 2, 3], {}, "same address"),
        (lambda: [], [], {}, "must not be empty"),
    ],
)
def test_bad_input_writes_nothing(tensors, mapping, kw, match):
    tensors = tensors()
    before = [t.clone() for t in tensors] if isinstance(tensors, list) else None
    with pytest.raises(ValueError, match=match):
        shuffle_experts(tensors, mapping, **kw)
    if before:
        for t, b in zip(tensors, before):
            if t.device.type == "cpu":
                assert torch.equal(t, b)


def test_views_into_one_buffer_are_separate_tensors():
    # w1 and w3 halves of a fused w13 passed separately: interleaved memory, disjoint bytes
    gen = torch.Generator().manual_seed(7)
    w13 = random_tensor((6, 8, 5), torch.bfloat16, gen)
    want = [w13.clone()]
    mapping = [3, 4, 5, 0, 1, 1]
    naive_shuffle(want, mapping)
    shuffle_experts([w13[:, :4], w13[:, 4:]], mapping)
    assert torch.equal(bits(w13), bits(want[0]))


def test_long_steps_are_split_across_launches(monkeypatch):
    module = importlib.import_module("eplb_plugin.kernels.shuffle_experts")
    monkeypatch.setattr(module, "MAX_GRID_Y", 2)
    gen = torch.Generator().manual_seed(12)
    tensors = expert_tensors(9, gen)
    mapping = [8, 7, 6, 5, 4, 3, 2, 1, 0]  # 4 swaps, staged 4 rows at once
    want = [t.clone() for t in tensors]
    naive_shuffle(want, mapping)
    shuffle_experts(tensors, mapping, staging_bytes=1 << 16)
    for got, exp in zip(tensors, want):
        assert torch.equal(bits(got), bits(exp))
