"""map_and_count: the Triton kernel (interpreted) and the torch path, each against the
dispatch contract of docs/dispatch.md written out here entry by entry in numpy float32 (an
oracle that shares no code with the op). Outputs are integers: compared exactly."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

from eplb_plugin.kernels import checks
from eplb_plugin.kernels._backend import backend_for
from eplb_plugin.kernels._backend import forced_backend as kernels
from eplb_plugin.kernels.map_and_count import map_and_count
from eplb_plugin.kernels.waterfill import waterfill_shares
from eplb_plugin.layout import ExpertLayout, Topology

# --------------------------------------------------------------------------- helpers


def random_layout(
    num_layers: int, num_experts: int, num_slots: int, num_gpus: int, seed: int, uniform=False
) -> ExpertLayout:
    """Every expert at least once, the rest random (so some experts get 3-4 replicas, some
    twice on one GPU); shares random per expert unless ``uniform``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_layers):
        extra = torch.randint(0, num_experts, (num_slots - num_experts,), generator=g)
        row = torch.cat([torch.arange(num_experts), extra])
        rows.append(row[torch.randperm(num_slots, generator=g)])
    phy2log = torch.stack(rows)
    topo = Topology(num_replicas=num_slots, num_gpus=num_gpus)
    if uniform:
        return ExpertLayout.from_phy2log(phy2log, topo, num_experts=num_experts)
    raw = torch.rand(num_layers, num_slots, generator=g) + 0.05
    total = torch.zeros(num_layers, num_experts).scatter_add_(1, phy2log, raw)
    share = (raw / total.gather(1, phy2log)).float()
    return ExpertLayout.from_phy2log(phy2log, topo, num_experts=num_experts, replica_share=share)


def random_ids(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    seed: int,
    dtype=torch.int64,
    minus_one: float = 0.0,
) -> torch.Tensor:
    """Distinct experts per token (as a router's top-k), skewed, some entries -1."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_experts, generator=g) ** 3 + 0.01
    ids = torch.multinomial(weights.expand(num_tokens, -1), top_k, generator=g)
    if minus_one:
        ids[torch.rand(num_tokens, top_k, generator=g) < minus_one] = -1
    return ids.to(dtype)


def contract(topk_ids, layout, share, layer, num_valid, seed=0):
    """docs/dispatch.md literally: one entry at a time, numpy float32 arithmetic."""
    ids = topk_ids.tolist()
    l2p = layout.log2phy[layer].tolist()
    cnt = layout.logcnt[layer].tolist()
    sh = share.numpy().astype(np.float32)
    num_experts = len(cnt)
    c = [0] * num_experts
    for t in range(num_valid):
        for e in ids[t]:
            if e >= 0:
                c[e] += 1
    bounds = []
    for e in range(num_experts):
        x = np.float32(e + 1) * np.float32(0.6180339887) + np.float32(seed) * np.float32(
            0.7548776662
        )
        u = np.float32(x - np.floor(x))
        total, prev, ends = np.float32(0.0), 0, []
        for j in range(cnt[e]):
            total = np.float32(total + sh[l2p[e][j]])
            if j == cnt[e] - 1:
                b = c[e]
            else:
                b = int(np.floor(np.float32(np.float32(c[e]) * total) + u))
                b = min(max(b, prev), c[e])
            ends.append(b)
            prev = b
        bounds.append(ends)
    seen = [0] * num_experts
    phys = []
    for t, row in enumerate(ids):
        out = []
        for e in row:
            if e < 0:
                out.append(-1)
            elif t >= num_valid:
                out.append(l2p[e][0])
            else:
                n = seen[e]
                seen[e] += 1
                j = sum(1 for b in bounds[e][:-1] if b <= n)
                out.append(l2p[e][j])
        phys.append(out)
    counts = [0] * share.shape[0]
    for e in range(num_experts):
        prev = 0
        for j, b in enumerate(bounds[e]):
            counts[l2p[e][j]] += b - prev
            prev = b
    return (
        torch.tensor(phys, dtype=torch.int64).view(len(ids), topk_ids.shape[1]),
        torch.tensor(counts),
        c,
    )


def run(backend, topk_ids, layout, layer, num_valid, counts, **kw):
    with kernels(backend):
        return map_and_count(
            topk_ids, layout.log2phy, layout.logcnt, layout.replica_share, counts, layer,
            num_valid, **kw,
        )  # fmt: skip


def local_share(topk_ids, layout, layer, num_valid, slots_per_gpu, iters=8):
    """The contract's shares of ``local`` dispatch: water-filled on the batch's counts."""
    c = expert_counts(topk_ids, num_valid, layout.num_experts).float()
    rows = slice(layer, layer + 1)
    return waterfill_shares(
        c.unsqueeze(0), layout.phy2log[rows], layout.log2phy[rows], layout.logcnt[rows],
        slots_per_gpu, layout.replica_share[rows], iters,
    )[0]  # fmt: skip


def both(topk_ids, layout, layer, num_valid, counts=None, **kw):
    """Run the Triton kernel and the torch path on copies, check each against the contract
    oracle; return both (out, counts)."""
    if counts is None:
        counts = torch.zeros(layout.num_layers, layout.num_slots, dtype=torch.int32)
    nv = int(num_valid)
    if kw.get("dispatch", "static") == "local":
        share = local_share(topk_ids, layout, layer, nv, kw["slots_per_gpu"])
    else:
        share = layout.replica_share[layer]
    seed = kw.get("seed")
    phys, want, _ = contract(topk_ids, layout, share, layer, nv, 0 if seed is None else int(seed))
    results = []
    for backend in ("triton", "torch"):
        c = counts.clone()
        out = run(backend, topk_ids.clone(), layout, layer, num_valid, c, **kw)
        assert torch.equal(out.long(), phys), backend
        assert torch.equal(c[layer].long() - counts[layer].long(), want), backend
        others = [i for i in range(layout.num_layers) if i != layer]
        assert torch.equal(c[others], counts[others]), backend
        results.append((out, c))
    return results


def expert_counts(topk_ids, num_valid, num_experts):
    ids = topk_ids[:num_valid].reshape(-1)
    ids = ids[ids >= 0]
    return torch.bincount(ids.long(), minlength=num_experts)


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("seed", [0, 7, 123456])
def test_both_backends_are_the_contract(seed):
    layout = random_layout(2, 8, 14, 2, seed=seed)
    ids = random_ids(41, 3, 8, seed=seed, minus_one=0.1)
    for layer, num_valid in ((0, 41), (1, 30), (1, 0)):
        both(ids, layout, layer, num_valid, seed=seed)  # checks each against the contract


def test_counts_within_one_token_of_shares():
    layout = random_layout(3, 16, 24, 4, seed=3)
    for layer in range(3):
        ids = random_ids(200, 4, 16, seed=layer)
        counts = torch.zeros(3, 24, dtype=torch.int32)
        out = map_and_count(
            ids,
            layout.log2phy,
            layout.logcnt,
            layout.replica_share,
            counts,
            layer,
            180,
            seed=layer,
            block_size=256,
        )
        c = expert_counts(ids, 180, 16).float()
        ideal = c[layout.phy2log[layer]] * layout.replica_share[layer]
        assert (counts[layer].float() - ideal).abs().max() <= 1.0
        # the counts are what the mapping actually did with the valid rows
        done = torch.bincount(out[:180].reshape(-1), minlength=24)
        assert torch.equal(done, counts[layer].long())
        # padding rows go to replica 0 of their expert
        assert torch.equal(out[180:], layout.log2phy[layer][ids[180:], 0])


def test_rounding_is_unbiased_over_seeds():
    layout = random_layout(1, 6, 10, 2, seed=11)
    ids = random_ids(9, 2, 6, seed=2)
    c = expert_counts(ids, 9, 6).float()
    ideal = c[layout.phy2log[0]] * layout.replica_share[0]
    total = torch.zeros(10)
    runs = 400
    for seed in range(runs):
        counts = torch.zeros(1, 10, dtype=torch.int32)
        run("torch", ids, layout, 0, 9, counts, seed=torch.tensor(seed))
        total += counts[0]
    assert (total / runs - ideal).abs().max() < 0.05


def test_local_dispatch_follows_waterfill():
    layout = random_layout(2, 12, 20, 4, seed=5, uniform=True)
    ids = random_ids(90, 4, 12, seed=9)
    for layer in (0, 1):
        (out_t, cnt_t), (out_r, cnt_r) = both(
            ids,
            layout,
            layer,
            80,
            dispatch="local",
            phy2log=layout.phy2log,
            slots_per_gpu=5,
            seed=3,
            block_size=128,
        )
        assert torch.equal(out_t, out_r) and torch.equal(cnt_t, cnt_r)
        c = expert_counts(ids, 80, 12).float()
        ideal = c[layout.phy2log[layer]] * local_share(ids, layout, layer, 80, 5)
        assert (cnt_t[layer].float() - ideal).abs().max() <= 1.0


# --------------------------------------------------------------------------- Triton vs torch


@pytest.mark.parametrize(
    "num_tokens,top_k,num_valid,block_size,dtype",
    [
        (1, 1, 1, None, torch.int32),
        (7, 3, 5, None, torch.int64),
        (37, 6, 37, 16, torch.int32),  # many blocks, an odd tail
        (250, 8, 211, 256, torch.int64),
        (133, 5, 0, 64, torch.int32),  # all padding
        (0, 8, 0, None, torch.int64),  # empty batch
    ],
)
def test_triton_and_torch_match_the_contract(num_tokens, top_k, num_valid, block_size, dtype):
    layout = random_layout(2, 10, 17, 1, seed=num_tokens)
    ids = random_ids(num_tokens, top_k, 10, seed=num_tokens, dtype=dtype, minus_one=0.05)
    (out_t, cnt_t), (out_r, cnt_r) = both(
        ids, layout, 1, num_valid, seed=num_tokens, block_size=block_size
    )
    assert out_t.dtype == dtype and out_t.shape == ids.shape
    assert torch.equal(out_t, out_r)
    assert torch.equal(cnt_t, cnt_r)
    assert int(cnt_t.sum()) == int((ids[:num_valid] >= 0).sum())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("ranks,block_size", [(3, None), (4, 16)])
def test_all_rank_numbering_splits_like_one_batch(backend, ranks, block_size):
    """Batches numbered after each other (offsets) and apportioned on the total (totals)
    map and count exactly as the one batch of them all, in rank order."""
    layout = random_layout(2, 10, 20, 4, seed=21)
    parts = [random_ids(13 + r, 4, 10, seed=30 + r, minus_one=0.05) for r in range(ranks)]
    valid = [11 + r for r in range(ranks)]
    whole = torch.cat([p[:v] for p, v in zip(parts, valid)])
    per = [torch.bincount(p[:v][p[:v] >= 0], minlength=10) for p, v in zip(parts, valid)]
    totals = sum(per)
    want_counts = torch.zeros(2, 20, dtype=torch.int32)
    want = run(backend, whole, layout, 1, whole.shape[0], want_counts, seed=5)
    counts = torch.zeros(2, 20, dtype=torch.int32)
    got, start = [], torch.zeros(10, dtype=torch.int64)
    for p, v, n in zip(parts, valid, per):
        out = run(backend, p.clone(), layout, 1, torch.tensor(v), counts, seed=5,
                  offsets=start.clone(), totals=totals, block_size=block_size)  # fmt: skip
        assert torch.equal(layout.phy2log[1][out[v:].clamp(min=0)][p[v:] >= 0], p[v:][p[v:] >= 0])
        got.append(out[:v])
        start += n
    assert torch.equal(torch.cat(got), want)
    assert torch.equal(counts, want_counts)


def test_triton_device_scalars_inplace_and_strided_ids():
    layout = random_layout(1, 9, 16, 2, seed=1)
    ids = random_ids(60, 5, 9, seed=4).t().contiguous().t()  # [60, 5], strides (1, 60)
    assert not ids.is_contiguous()
    num_valid, seed = torch.tensor(47), torch.tensor(2**40 + 3)
    counts = torch.full((1, 16), 3, dtype=torch.int32)  # accumulates onto existing counts
    want_counts = counts.clone()
    want, add, _ = contract(ids, layout, layout.replica_share[0], 0, 47, seed=2**40 + 3)
    want_counts[0] += add.int()
    inplace = ids.clone()
    got = map_and_count(
        inplace,
        layout.log2phy,
        layout.logcnt,
        layout.replica_share,
        counts,
        0,
        num_valid,
        seed=seed,
        out=inplace,
        block_size=64,
    )
    assert got is inplace
    assert torch.equal(inplace, want) and torch.equal(counts, want_counts)
    assert torch.equal(both(ids, layout, 0, num_valid, seed=seed)[0][0], want)
    strided = map_and_count(
        ids,
        layout.log2phy,
        layout.logcnt,
        layout.replica_share,
        torch.zeros(1, 16, dtype=torch.int32),
        0,
        num_valid,
        seed=seed,
    )
    assert torch.equal(strided, want)


def test_preallocated_workspace_covers_smaller_batches():
    layout = random_layout(1, 16, 20, 4, seed=8)
    work = checks.make_map_and_count_workspace(300, 4, 16, "cpu")
    assert work.numel() == checks.map_and_count_workspace_size(300, 4, 16)
    for n in (300, 65, 1):
        ids = random_ids(n, 4, 16, seed=n)
        (out_t, cnt_t), (out_r, cnt_r) = both(ids, layout, 0, n, workspace=work)
        assert torch.equal(out_t, out_r) and torch.equal(cnt_t, cnt_r)


def test_real_trace_layer(traces_dir):
    from eplb_plugin.policies import plan

    trace = np.load(traces_dir / "esft_intent.npz")["topk_ids"][:160]  # [T, 26, 6] int8
    ids = torch.from_numpy(trace.astype(np.int64))
    load = torch.stack([torch.bincount(ids[:, l].reshape(-1), minlength=64) for l in range(26)])
    layout = plan(load.float(), Topology(num_replicas=80, num_gpus=8))
    layer = 5
    (out_t, cnt_t), (out_r, cnt_r) = both(ids[:, layer].contiguous(), layout, layer, 150, seed=1)
    assert torch.equal(out_t, out_r) and torch.equal(cnt_t, cnt_r)
    c = expert_counts(ids[:, layer], 150, 64).float()
    ideal = c[layout.phy2log[layer]] * layout.replica_share[layer]
    assert (cnt_t[layer].float() - ideal).abs().max() <= 1.0


# --------------------------------------------------------------------------- backend choice


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("EPLB_KERNELS", raising=False)
    assert backend_for(cpu) == "triton"
    monkeypatch.setenv("EPLB_KERNELS", "torch")
    assert backend_for(cpu) == "torch"
    monkeypatch.setenv("EPLB_KERNELS", "cuda")
    with pytest.raises(ValueError, match="EPLB_KERNELS"):
        backend_for(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("EPLB_KERNELS", "triton")
    with pytest.raises(ValueError, match="cannot run"):
        backend_for(cpu)
    monkeypatch.delenv("EPLB_KERNELS")
    assert backend_for(cpu) == "torch"


def test_forced_torch_path_skips_triton(monkeypatch):
    # the package's `map_and_count` attribute is the function; the module is in sys.modules
    module = importlib.import_module("eplb_plugin.kernels.map_and_count")

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton path ran although EPLB_KERNELS=torch")

    monkeypatch.setattr(module, "_map_and_count_triton", no_triton)
    layout = random_layout(1, 8, 12, 2, seed=6)
    ids = random_ids(30, 3, 8, seed=6)
    counts = torch.zeros(1, 12, dtype=torch.int32)
    out = run("torch", ids, layout, 0, 25, counts)
    phys, want, _ = contract(ids, layout, layout.replica_share[0], 0, 25)
    assert torch.equal(out, phys) and torch.equal(counts[0].long(), want)
    with pytest.raises(AssertionError, match="Triton path ran"):
        run(None, ids, layout, 0, 25, counts)  # the default under TRITON_INTERPRET=1


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def small():
    layout = random_layout(2, 6, 8, 2, seed=0)
    ids = random_ids(10, 2, 6, seed=0)
    counts = torch.zeros(2, 8, dtype=torch.int32)
    return layout, ids, counts


def _put(ids, value):
    ids = ids.clone()
    ids[7, 1] = value
    return ids


def _call(layout, ids, counts_, **kw):
    args = dict(
        log2phy=layout.log2phy,
        logcnt=layout.logcnt,
        replica_share=layout.replica_share,
        counts=counts_,
        layer=0,
        num_valid=10,
    )
    args.update(kw)
    return map_and_count(ids, **args)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda lay, ids, c: dict(ids=_put(ids, 6)), "expert ids in"),
        (lambda lay, ids, c: dict(ids=_put(ids, -2)), "expert ids in"),
        (lambda lay, ids, c: dict(ids=ids.float()), "topk_ids must have dtype"),
        (lambda lay, ids, c: dict(ids=ids[0]), "topk_ids must be 2-D"),
        (lambda lay, ids, c: dict(counts=c[:, :7].contiguous()), "counts must be"),
        (lambda lay, ids, c: dict(counts=c.long()), "counts must have dtype"),
        (lambda lay, ids, c: dict(counts=c.t()), "counts must be"),
        (lambda lay, ids, c: dict(replica_share=lay.replica_share.double()), "replica_share"),
        (lambda lay, ids, c: dict(logcnt=lay.logcnt.to("meta")), "logcnt must be on"),
        (lambda lay, ids, c: dict(num_valid=torch.tensor(3, device="meta")), "num_valid must be"),
        (lambda lay, ids, c: dict(num_valid=11), "num_valid must be"),
        (lambda lay, ids, c: dict(num_valid=torch.tensor(True)), "0-dim integer"),
        (lambda lay, ids, c: dict(seed=torch.tensor([1])), "seed must be a 0-dim"),
        (lambda lay, ids, c: dict(num_valid=torch.tensor(11)), "num_valid must be in"),
        (lambda lay, ids, c: dict(layer=2), "layer must be"),
        (lambda lay, ids, c: dict(dispatch="global"), "dispatch must be"),
        (lambda lay, ids, c: dict(dispatch="local"), "needs phy2log"),
        (
            lambda lay, ids, c: dict(dispatch="local", phy2log=lay.phy2log, slots_per_gpu=3),
            "slots_per_gpu",
        ),
        (lambda lay, ids, c: dict(out=torch.empty(10, 2, dtype=torch.int32)), "out must have"),
        (lambda lay, ids, c: dict(workspace=torch.empty(3, dtype=torch.int32)), "workspace"),
        (lambda lay, ids, c: dict(seed=1.5), "seed must be"),
        (lambda lay, ids, c: dict(block_size=48), "block_size"),
        (lambda lay, ids, c: dict(offsets=torch.zeros(6, dtype=torch.int64)), "go together"),
        (
            lambda lay, ids, c: dict(
                offsets=torch.zeros(5, dtype=torch.int64), totals=torch.zeros(5, dtype=torch.int64)
            ),
            "offsets must be",
        ),
        (
            lambda lay, ids, c: dict(offsets=torch.full((6,), -1), totals=torch.zeros(6).long()),
            ">= 0",
        ),
        (
            lambda lay, ids, c: dict(
                dispatch="local",
                phy2log=lay.phy2log,
                slots_per_gpu=4,
                offsets=torch.zeros(6).long(),
                totals=torch.zeros(6).long(),
            ),
            "need dispatch='static'",
        ),
    ],
)
def test_bad_input_raises_before_writing(small, change, match):
    layout, ids, counts = small
    kw = change(layout, ids, counts)
    ids_in = kw.pop("ids", ids)
    out = torch.full(ids.shape, -7, dtype=ids.dtype)
    kw.setdefault("out", out)
    before = counts.clone()
    with pytest.raises(ValueError, match=match):
        _call(layout, ids_in, counts, **kw)
    assert torch.equal(counts, before)
    assert out.eq(-7).all()


# --------------------------------------------------------------------------- on a GPU

GPU_SCRIPT = r"""
import torch
import os
from eplb_plugin.kernels import (backend_for, make_map_and_count_workspace, map_and_count,
                                 pack_slots, shuffle_experts, unpack_slots)


def torch_path(*args, **kwargs):
    os.environ["EPLB_KERNELS"] = "torch"
    try:
        return map_and_count(*args, **kwargs)
    finally:
        del os.environ["EPLB_KERNELS"]

from eplb_plugin.layout import ExpertLayout, Topology

dev = torch.device("cuda")
assert backend_for(dev) == "triton"
g = torch.Generator().manual_seed(0)
E, P, K, N = 64, 80, 8, 700
row = torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=g)])
row = row[torch.randperm(P, generator=g)]
raw = torch.rand(1, P, generator=g) + 0.05
total = torch.zeros(1, E).scatter_add_(1, row[None], raw)
layout = ExpertLayout.from_phy2log(row[None], Topology(P, num_gpus=8), num_experts=E,
                                   replica_share=raw / total.gather(1, row[None]))
maps = [t.to(dev) for t in (layout.log2phy, layout.logcnt, layout.replica_share)]
phy2log = layout.phy2log.to(dev)
weights = torch.rand(E, generator=g) ** 3 + 0.01
ids = torch.multinomial(weights.expand(N, -1), K, generator=g).to(torch.int32).to(dev)
num_valid, seed = torch.tensor(650, device=dev), torch.tensor(5, device=dev)

for mode in ("static", "local"):
    kw = dict(dispatch=mode, phy2log=phy2log, slots_per_gpu=10, seed=seed)
    c_ref = torch.zeros(1, P, dtype=torch.int32, device=dev)
    want = torch_path(ids, *maps, c_ref, 0, num_valid, **kw)
    c_tri = torch.zeros_like(c_ref)
    got = map_and_count(ids, *maps, c_tri, 0, num_valid, **kw)
    assert torch.equal(got, want) and torch.equal(c_tri, c_ref), mode

# in place, preallocated workspace, captured in a CUDA graph and replayed twice
work = make_map_and_count_workspace(N, K, E, dev)
static_ids = ids.clone()
out = torch.empty_like(ids)
counts = torch.zeros(1, P, dtype=torch.int32, device=dev)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):  # warm-up compiles the kernels outside the capture
    map_and_count(static_ids, *maps, counts, 0, num_valid, seed=seed, out=out, workspace=work)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    map_and_count(static_ids, *maps, counts, 0, num_valid, seed=seed, out=out, workspace=work)
counts.zero_()
graph.replay()
graph.replay()
torch.cuda.synchronize()
c_ref = torch.zeros_like(counts)
want = torch_path(ids, *maps, c_ref, 0, num_valid, seed=seed)
assert torch.equal(out, want) and torch.equal(counts, 2 * c_ref)
inplace = ids.clone()
map_and_count(inplace, *maps, torch.zeros_like(counts), 0, num_valid, seed=seed, out=inplace)
assert torch.equal(inplace, want)

# weights: shuffle and pack/unpack, bit exact, fp8 and bf16
S = 12
mapping = [3, 4, 5, 0, 1, 2, 2, 7, 11, -1, 9, 10]
for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.uint8):
    raw = torch.randint(0, 256, (S, 33, 40 * dtype.itemsize), dtype=torch.uint8, device=dev)
    t = raw.view(dtype)
    want = [t.clone()]
    old = want[0].clone()
    for s, m in enumerate(mapping):
        if m >= 0:
            want[0][s] = old[m]
    shuffle_experts([t], torch.tensor(mapping, device=dev))
    assert torch.equal(t.view(torch.uint8), want[0].view(torch.uint8)), dtype
    bias = torch.randn(S, 7, device=dev)
    buf = pack_slots([t, bias], [5, 1, 5])
    layout_bytes = [x[s].reshape(-1).view(torch.uint8) for s in (5, 1, 5) for x in (t, bias)]
    assert torch.equal(buf, torch.cat(layout_bytes))
    fresh = [torch.zeros_like(t), torch.zeros_like(bias)]
    unpack_slots(fresh, torch.tensor([0, 1, 2], device=dev), buf)
    assert torch.equal(fresh[0][1].view(torch.uint8), t[1].view(torch.uint8))
    assert torch.equal(fresh[1][2], bias[5])
print("GPU OK")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_gpu_triton_matches_torch_and_captures_in_a_graph():
    # The test session interprets Triton (conftest); compiled kernels need a fresh process.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EPLB_KERNELS")}
    result = subprocess.run(
        [sys.executable, "-c", GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "GPU OK" in result.stdout
