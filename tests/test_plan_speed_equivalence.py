"""The fast paths of planning give what the plain versions give (issue 12 item 6).

- ``ExpertLayout.from_plan`` (numpy, policies' trusted builder) builds the same tensors as
  ``from_phy2log`` and still refuses inconsistent arrays;
- DeepSeek's packing in batches of greedy steps (each row at its own pace) and its step
  loop match deepseek-ai/EPLB's per-row Python loop, with ties, zero and infinite loads;
  its sort on the loads' int32 bit patterns gives torch's float sort order, ties included,
  and its replication by one sort the reference's greedy picks;
- ``placement.argsort_stable`` (sorted int64 keys) gives numpy's stable argsort, and
  ``refine.sum_last`` numpy's sum; ``replica_counts`` the greedy's counts at any
  bisection depth.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch

from eplb_plugin import ExpertLayout, Topology, plan
from eplb_plugin.policies import deepseek, placement, refine

_spec = importlib.util.spec_from_file_location(
    "eplb_reference", pathlib.Path(__file__).resolve().parent / "eplb_reference.py"
)
eplb_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eplb_reference)


def _random_layout(gen: torch.Generator, layers: int, experts: int, slots: int):
    """phy2log [layers, slots] with every expert placed, and a shuffled rank numbering."""
    rows, ranks = [], []
    for _ in range(layers):
        extra = torch.randint(0, experts, (slots - experts,), generator=gen)
        row = torch.cat([torch.arange(experts), extra])[torch.randperm(slots, generator=gen)]
        rank = torch.empty(slots, dtype=torch.int64)
        for e in range(experts):
            where = (row == e).nonzero().flatten()
            rank[where] = torch.randperm(where.numel(), generator=gen)
        rows.append(row)
        ranks.append(rank)
    return torch.stack(rows), torch.stack(ranks)


@pytest.mark.parametrize("seed", range(6))
def test_from_plan_builds_what_from_phy2log_builds(seed):
    gen = torch.Generator().manual_seed(seed)
    experts = int(torch.randint(1, 40, (1,), generator=gen))
    gpus = int(torch.randint(1, 9, (1,), generator=gen))
    slots = gpus * -(-experts // gpus) + gpus * int(torch.randint(0, 4, (1,), generator=gen))
    topology = Topology(slots, num_gpus=gpus)
    phy2log, rank = _random_layout(gen, 5, experts, slots)
    fast = ExpertLayout.from_plan(phy2log.numpy(), rank.numpy(), topology, experts)
    slow = ExpertLayout.from_phy2log(phy2log, topology, experts, rank=rank)
    assert fast.equals(slow)
    for a, b in zip(
        (fast.phy2log, fast.log2phy, fast.logcnt, fast.replica_share),
        (slow.phy2log, slow.log2phy, slow.logcnt, slow.replica_share),
    ):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
    fast.validate()


def test_from_plan_refuses_inconsistent_arrays():
    topology = Topology(6, num_gpus=2)
    phy2log = np.array([[0, 1, 2, 3, 0, 1]])
    rank = np.array([[0, 0, 0, 0, 1, 1]])
    ExpertLayout.from_plan(phy2log, rank, topology, 4).validate()
    with pytest.raises(ValueError, match="no slot"):
        ExpertLayout.from_plan(np.array([[0, 1, 2, 2, 0, 1]]), rank, topology, 4)
    with pytest.raises(ValueError, match="repeat"):
        ExpertLayout.from_plan(phy2log, np.array([[0, 0, 0, 0, 1, 0]]), topology, 4)
    with pytest.raises(ValueError, match="replica indices must lie"):
        ExpertLayout.from_plan(phy2log, np.array([[0, 0, 0, 0, 2, 1]]), topology, 4)
    with pytest.raises(ValueError, match="ids must lie"):
        ExpertLayout.from_plan(np.array([[0, 1, 2, 4, 0, 1]]), rank, topology, 4)
    with pytest.raises(ValueError, match="do not fit"):
        ExpertLayout.from_plan(phy2log[:, :4], rank[:, :4], topology, 4)


def _loads(gen: torch.Generator, kind: str, shape: tuple[int, int]) -> torch.Tensor:
    """Integer-valued float32 loads (sums exact in float32 and float64 alike, so that the
    reference's float accumulation ranks packs exactly as ours)."""
    if kind == "spread":
        return torch.randint(0, 1000, shape, generator=gen).float()
    if kind == "ties":
        return torch.randint(0, 3, shape, generator=gen).float()
    if kind == "zero_tail":  # the greedy's batches stop at the zero loads
        w = torch.randint(1, 500, shape, generator=gen).float()
        w[:, : shape[1] // 3] = 0
        return w
    return torch.zeros(shape)


@pytest.mark.parametrize("kind", ["spread", "ties", "zero_tail", "zeros"])
@pytest.mark.parametrize("packs,per_pack", [(4, 3), (16, 2), (40, 5), (64, 5)])
def test_packing_matches_the_reference(kind, packs, per_pack):
    gen = torch.Generator().manual_seed(packs * 10 + per_pack)
    weight = _loads(gen, kind, (7, packs * per_pack))
    ours = deepseek.balanced_packing(weight, packs)
    ref = eplb_reference.balanced_packing(weight, packs)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_packing_sums_float32_as_eplb_py_not_float64_as_sglangs_copy():
    # token counts over replica counts: near-ties that float32 and float64 sums order apart.
    # deepseek-ai/EPLB adds the float32 tensor's elements; SGLang's copy adds Python floats.
    gen = torch.Generator().manual_seed(12)
    counts = torch.randint(1, 2000, (16, 32), generator=gen).float()
    weight = counts / torch.randint(1, 4, (16, 32), generator=gen).float()
    ours = deepseek.balanced_packing(weight, 8)
    ref = eplb_reference.balanced_packing(weight, 8)
    sglang = eplb_reference.balanced_packing_sglang(weight, 8)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert not torch.equal(sglang[0], ref[0])  # the case tells the two apart


def test_packing_batches_place_whole_rounds_on_spread_loads():
    # distinct loads: each round of heaviest-first packing holds whole
    weight = torch.randperm(64 * 5, generator=torch.Generator().manual_seed(1)).float() + 1
    weight = weight.view(1, -1).expand(3, -1).contiguous()
    order = weight.sort(-1, descending=True).indices.numpy()
    sorted_load = np.take_along_axis(weight.numpy(), order, -1)
    packs = np.empty(sorted_load.shape, dtype=np.int64)
    ranks = np.empty(sorted_load.shape, dtype=np.int64)
    assert deepseek._packing_batches(sorted_load, 5, packs, ranks) == 5  # a step per round
    ours = deepseek.balanced_packing(weight, 64)
    ref = eplb_reference.balanced_packing(weight, 64)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


@pytest.mark.parametrize("kind", ["spread", "ties", "zero_tail", "zeros"])
@pytest.mark.parametrize("packs,per_pack", [(2, 4), (4, 2), (8, 9), (8, 3), (32, 3)])
def test_packing_batches_match_one_item_steps(kind, packs, per_pack):
    # rows move on by their own step lengths: each must still match the one-item greedy
    gen = torch.Generator().manual_seed(packs * 100 + per_pack)
    weight = _loads(gen, kind, (40, packs * per_pack))
    weight[::3] /= 7  # sums that float32 rounds
    order = weight.sort(-1, descending=True).indices.numpy()
    sorted_load = np.take_along_axis(weight.numpy(), order, -1)
    batched = [np.empty(sorted_load.shape, dtype=np.int64) for _ in range(2)]
    deepseek._packing_batches(sorted_load, per_pack, *batched)
    stepped = [np.empty(sorted_load.shape, dtype=np.int64) for _ in range(2)]
    deepseek._packing_steps(sorted_load, packs, *stepped)
    assert all(np.array_equal(a, b) for a, b in zip(batched, stepped))


@pytest.mark.parametrize("shape", [(232, 72), (58, 8), (58, 320), (7, 17), (58, 1024)])
def test_sort_order_is_torchs_float_sort(shape, monkeypatch):
    monkeypatch.setattr(deepseek, "_INT_SORT_SIZE", 1)
    # ties (the replicas of an expert have equal loads), -0.0, inf and distinct loads
    gen = torch.Generator().manual_seed(shape[1])
    for weight in (
        torch.randint(0, 3, shape, generator=gen).float(),
        torch.randint(0, 1000, shape, generator=gen).float() / 7,
        torch.rand(shape, generator=gen),
        torch.where(torch.rand(shape, generator=gen) < 0.3, float("inf"), 1.0),
        torch.where(torch.rand(shape, generator=gen) < 0.5, -0.0, 2.0),
        torch.randint(-3, 3, shape, generator=gen).float(),  # negative: the float sort
    ):
        expected = weight.sort(-1, descending=True).indices.numpy()
        assert np.array_equal(deepseek._sort_order(weight), expected)


@pytest.mark.parametrize("descending", [False, True])
def test_argsort_stable_is_numpys_stable_argsort(descending):
    rng = np.random.default_rng(int(descending))
    for trial in range(60):
        shape = (int(rng.integers(0, 30)), int(rng.integers(1, 200)))
        values = [
            rng.integers(0, 3, shape).astype(np.float64),  # ties
            rng.random(shape),
            np.where(rng.random(shape) < 0.3, np.inf, rng.integers(-5, 5, shape) * 1.0),
            rng.integers(-2, 3, shape) * 1e-300,  # -0.0, +0.0 and subnormals
            1.0 + rng.integers(0, 3, shape) * 2.0**-50,  # apart only in the dropped bits
            rng.integers(-3, 3, shape).astype(np.float32),
            rng.integers(0, 9, shape).astype(np.int32),
            np.where(rng.random(shape) < 0.1, np.nan, rng.random(shape)),
        ][trial % 8]
        got = placement.argsort_stable(values, descending)
        expected = np.argsort(-values if descending else values, axis=-1, kind="stable")
        assert got.dtype == expected.dtype and np.array_equal(got, expected), trial


@pytest.mark.parametrize("halvings", [0, 3, 12, 28])
def test_replica_counts_are_the_greedys_at_any_bisection_depth(halvings, monkeypatch):
    monkeypatch.setattr(placement, "BISECTION_STEPS", halvings)
    rng = np.random.default_rng(halvings)
    for trial in range(40):
        rows, experts = int(rng.integers(1, 6)), int(rng.integers(2, 80))
        slots = experts + int(rng.integers(9, 3 * experts + 10))
        shape = (rows, experts)
        weight = [
            rng.lognormal(0, 1, shape),
            rng.integers(0, 4, shape).astype(float),  # ties
            np.zeros(shape),
            np.round(rng.lognormal(0, 2, shape) * 3),
        ][trial % 4]
        greedy = np.ones(shape, dtype=np.int64)
        for _ in range(slots - experts):
            greedy[np.arange(rows), (weight / greedy).argmax(-1)] += 1
        assert np.array_equal(placement.replica_counts(weight, slots), greedy), trial


@pytest.mark.parametrize("n", range(10))
def test_sum_last_is_numpys_sum_bit_for_bit(n):
    rng = np.random.default_rng(n)
    values = rng.lognormal(0, 3, (40, 16, n)) * rng.choice([1.0, 1e-9, 1e9], (40, 16, n))
    got, expected = refine.sum_last(values), values.sum(-1)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_packing_and_replication_take_no_rows(monkeypatch):
    monkeypatch.setattr(deepseek, "_SORTED_PICKS", 0)
    pack, rank = deepseek.balanced_packing(torch.zeros(0, 16), 8)
    assert pack.shape == rank.shape == (0, 16)
    assert deepseek.replicate_experts(torch.zeros(0, 4), 9)[0].shape == (0, 9)


def test_packing_with_infinite_loads_fills_every_pack_exactly():
    weight = torch.full((2, 48), float("inf"))
    weight[:, ::3] = 1.0
    pack, rank = deepseek.balanced_packing(weight, 16)
    for row in range(2):
        assert torch.bincount(pack[row], minlength=16).tolist() == [3] * 16
        assert len(set(zip(pack[row].tolist(), rank[row].tolist()))) == 48


@pytest.mark.parametrize("kind", ["spread", "ties", "zero_tail", "zeros"])
def test_replication_matches_the_reference(kind):
    gen = torch.Generator().manual_seed(3)
    weight = _loads(gen, kind, (5, 24))
    for slots in (24, 31, 80):
        ours = deepseek.replicate_experts(weight, slots)
        ref = eplb_reference.replicate_experts(weight, slots)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))


@pytest.mark.parametrize("kind", ["spread", "ties", "zero_tail", "zeros", "fractions"])
def test_replication_by_sorting_matches_the_reference(kind, monkeypatch):
    monkeypatch.setattr(deepseek, "_SORTED_PICKS", 0)  # every call tries the sort
    gen = torch.Generator().manual_seed(4)
    if kind == "fractions":  # loads per replica that float32 rounds, near-ties
        weight = torch.rand(6, 40, generator=gen) * 3 + 1
    else:
        weight = _loads(gen, kind, (6, 40))
    for slots in (41, 57, 80, 200):
        picks = deepseek._extra_replicas(weight.numpy(), slots - 40)
        if kind == "spread":
            assert picks is not None  # the sort's result stands (no fallback)
        ours = deepseek.replicate_experts(weight, slots)
        ref = eplb_reference.replicate_experts(weight, slots)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref)), slots


@pytest.mark.filterwarnings("ignore::eplb_plugin.policies.LoadWarning")  # the zero layer
def test_float32_loads_plan_as_their_float64_copies():
    # plan() keeps a float32 load as it is unless a layer needs scaling or filling
    weight = _digest_load(1, 6, 64, "lognormal")
    weight[1] *= 2.0**50  # scaled
    weight[2] = 0.0  # filled
    weight[3, :5] = -0.0
    for policy in ("deepseek", "default"):
        for load in (weight, weight[[0, 3, 4, 5]]):
            a = plan(load, Topology(96, 8, 4, 16), policy)
            b = plan(load.double(), Topology(96, 8, 4, 16), policy)
            assert a.equals(b) and torch.equal(a.replica_share, b.replica_share)


# sha256 (first 16 hex digits) of phy2log, log2phy, logcnt and replica_share, recorded with
# the plan code before the speed work (commit 49a79e6): the faster paths plan the same
# layouts bit for bit. (Shapes that take repartition_pairs' float32 matmul are left out:
# BLAS may sum in another order on another CPU.)
_DIGESTS = {
    "lognormal-(96, 8, 4, 16)-deepseek-{}": "a252dff29a18ef34",
    "lognormal-(96, 8, 4, 16)-default-{}": "808e527ba26de3f9",
    'lognormal-(96, 8, 4, 16)-default-{"dispatch": "local"}': "3014d6572f05f142",
    'lognormal-(96, 8, 4, 16)-default-{"dispatch": "global"}': "3014d6572f05f142",
    'lognormal-(96, 8, 4, 16)-default-{"phase": "decode"}': "0f587174a241fe3e",
    "lognormal-(256, 1, 2, 32)-deepseek-{}": "fb230efa7379fcf4",
    "lognormal-(256, 1, 2, 32)-default-{}": "95b93caa9aed6661",
    'lognormal-(256, 1, 2, 32)-default-{"dispatch": "local"}': "e7e3360ff87082c5",
    'lognormal-(256, 1, 2, 32)-default-{"dispatch": "global"}': "e7e3360ff87082c5",
    'lognormal-(256, 1, 2, 32)-default-{"phase": "decode"}': "95b93caa9aed6661",
    "ties-(96, 8, 4, 16)-deepseek-{}": "194758aa3224fff0",
    "ties-(96, 8, 4, 16)-default-{}": "d8921816e9c9ec83",
    'ties-(96, 8, 4, 16)-default-{"dispatch": "local"}': "542b77d4501d9142",
    'ties-(96, 8, 4, 16)-default-{"dispatch": "global"}': "542b77d4501d9142",
    'ties-(96, 8, 4, 16)-default-{"phase": "decode"}': "f1334394a1d43ad9",
    "ties-(256, 1, 2, 32)-deepseek-{}": "c47bbb6d47cd4c91",
    "ties-(256, 1, 2, 32)-default-{}": "de7a08e6fe2e7443",
    'ties-(256, 1, 2, 32)-default-{"dispatch": "local"}': "e1b67c7541f239fa",
    'ties-(256, 1, 2, 32)-default-{"dispatch": "global"}': "e1b67c7541f239fa",
    'ties-(256, 1, 2, 32)-default-{"phase": "decode"}': "de7a08e6fe2e7443",
}


def _digest_load(seed: int, layers: int, experts: int, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "lognormal":
        popularity = torch.exp(torch.randn(layers, experts, generator=gen))
        return torch.stack([
            torch.bincount(torch.multinomial(p / p.sum(), 4096, True, generator=gen),
                           minlength=experts)
            for p in popularity
        ]).float()  # fmt: skip
    return torch.randint(0, 3, (layers, experts), generator=gen).float()


def test_plans_are_those_of_the_code_before_the_speed_work():
    cases = [
        ("lognormal", (96, 8, 4, 16)), ("lognormal", (80, 1, 1, 16)),
        ("lognormal", (256, 1, 2, 32)), ("ties", (96, 8, 4, 16)), ("ties", (80, 1, 1, 16)),
        ("ties", (256, 1, 2, 32)),
    ]  # fmt: skip
    options = [{}, {"dispatch": "local"}, {"dispatch": "global"}, {"phase": "decode"}]
    checked = 0
    for seed, (kind, topology) in enumerate(cases):
        weight = _digest_load(seed, 6, 64, kind)
        for policy, opts in [("deepseek", {})] + [("default", o) for o in options]:
            key = f"{kind}-{topology}-{policy}-{json.dumps(opts, sort_keys=True)}"
            if key not in _DIGESTS:
                continue
            layout = plan(weight, Topology(*topology), policy, **opts)
            digest = hashlib.sha256()
            for tensor in (layout.phy2log, layout.log2phy, layout.logcnt, layout.replica_share):
                digest.update(tensor.numpy().tobytes())
            assert digest.hexdigest()[:16] == _DIGESTS[key], key
            checked += 1
    assert checked == len(_DIGESTS)
