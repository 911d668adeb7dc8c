"""Worker of ``benchmarks/gpu_check.py``: runs check sections in one process, one JSON line each.

Started by ``gpu_check.py`` (never needed by hand), which gives it the sections to run, a
deadline and a records file. Every check appends one JSON line to that file as soon as it
ends, so the parent keeps what was done if this process dies (a sticky CUDA error, a
segfault, a hang it kills). After a check that raised on CUDA the worker probes the device;
if the context is broken it exits with ``EXIT_UNHEALTHY`` and the parent starts a fresh
worker for the sections left.

Oracles here share no code with the kernels: the dispatch apportionment is written from
``docs/dispatch.md`` in numpy float32, the weight moves are byte copies of host snapshots.
The torch references are reached through the public switch ``EPLB_KERNELS=torch``.
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # before any kernel module is imported (Triton decides then)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# the parent's names (gpu_check.py imports no torch and runs nothing on import); this file
# runs as a script from benchmarks/, which is therefore on sys.path
from gpu_check import EXIT_NO_DEVICE, EXIT_UNHEALTHY, SPEED_SECTIONS  # noqa: E402

from eplb_plugin.kernels._backend import forced_backend as kernels  # noqa: E402

SHUFFLE_GOAL = 1.5  # shuffle time / copy time of the same bytes (issue 16)
# docs/dispatch.md, apportionment step 3
DITHER_EXPERT = np.float32(0.6180339887)
DITHER_SEED = np.float32(0.7548776662)


class CheckFailed(AssertionError):
    """A check's result disagreed with its oracle; ``details`` go to the record."""

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


def require(ok: bool, message: str, **details) -> None:
    if not ok:
        raise CheckFailed(message, details)


# ----------------------------------------------------------------------------- context
@dataclass
class Sizes:
    """Problem sizes of one mode of the kit (GPU or CPU smoke)."""

    experts: int
    slots: int
    gpus: int
    layers: int
    top_k: int
    decode: tuple[int, ...]
    prefill: tuple[int, ...]
    weight_slots: int
    hidden: int
    inter: int
    graph: tuple[int, int, int, int, int]  # experts, slots, layers, top_k, tokens
    speed_tokens: tuple[int, ...]
    speed_inner: int
    speed_reps: int
    bench_slots: int
    bench_models: tuple[tuple[str, str, int, int], ...]  # name, dtype, hidden, inter
    copy_bytes: int
    e2e_args: tuple[str, ...]


GPU_SIZES = Sizes(
    experts=256,
    slots=288,
    gpus=8,
    layers=3,
    top_k=8,
    decode=(1, 7, 64, 256),
    prefill=(4096, 32768),
    weight_slots=18,
    hidden=1152,
    inter=328,
    graph=(64, 80, 4, 8, 64),
    speed_tokens=(1, 4, 16, 64, 128, 256, 4096, 32768),
    speed_inner=20,
    speed_reps=15,
    bench_slots=16,
    bench_models=(
        ("Qwen3-30B-A3B layer, bf16", "bf16", 2048, 768),
        ("DeepSeek-V3 layer, fp8 + block scales", "fp8", 7168, 2048),
    ),
    copy_bytes=1 << 30,
    e2e_args=(),
)
SMOKE_SIZES = Sizes(
    experts=16,
    slots=20,
    gpus=4,
    layers=2,
    top_k=4,
    decode=(1, 7),
    prefill=(300,),
    weight_slots=7,
    hidden=24,
    inter=10,
    graph=(8, 12, 2, 2, 6),
    speed_tokens=(8,),
    speed_inner=2,
    speed_reps=1,
    bench_slots=6,
    bench_models=(("tiny bf16", "bf16", 32, 12), ("tiny fp8", "fp8", 40, 16)),
    copy_bytes=1 << 20,
    e2e_args=("--prompts", "2", "--steps", "3", "--routing", "skewed"),
)


class Context:
    """What every section needs: device, sizes, the records file, the deadline."""

    def __init__(self, records: str, deadline: float, smoke: bool) -> None:
        self.records = records
        self.deadline = deadline
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.cuda = self.device.type == "cuda"
        self.sizes = SMOKE_SIZES if smoke else GPU_SIZES
        self.section = ""

    def emit(self, event: dict) -> None:
        with open(self.records, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, default=_jsonable) + "\n")
            f.flush()

    def left(self) -> float:
        return self.deadline - time.time()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def check(self, name: str, kind: str, fn, *args) -> dict | None:
        """Run ``fn(*args)`` -> details; record passed/measured/failed with its time."""
        start = time.perf_counter()
        record = {"event": "check", "section": self.section, "name": name, "kind": kind}
        details = None
        try:
            details = fn(*args) or {}
            record.update(status="measured" if kind == "speed" else "passed", details=details)
        except CheckFailed as exc:
            record.update(status="failed", error=str(exc), details=exc.details)
        except Exception as exc:  # noqa: BLE001 - recorded; the next check runs
            record.update(
                status="failed",
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc()[-3000:],
            )
        record["seconds"] = round(time.perf_counter() - start, 3)
        self.emit(record)
        if record["status"] == "failed" and "traceback" in record:
            self.probe()
        return details

    def skip(self, name: str, kind: str, reason: str) -> None:
        self.emit(
            {
                "event": "check",
                "section": self.section,
                "name": name,
                "kind": kind,
                "status": "skipped",
                "error": reason,
                "seconds": 0.0,
            }
        )

    def probe(self) -> None:
        """Exit for a fresh worker if the CUDA context is broken (errors are sticky)."""
        if not self.cuda:
            return
        try:
            torch.cuda.synchronize()
            (torch.ones(4, device=self.device) + 1).sum().item()
        except Exception as exc:  # noqa: BLE001
            self.emit({"event": "unhealthy", "section": self.section, "error": str(exc)[:2000]})
            os._exit(EXIT_UNHEALTHY)

    def speed_ok(self, name: str, need_s: float) -> bool:
        """False (and a skip recorded) when the budget has less than ``need_s`` left."""
        left = self.left()
        if left >= need_s:
            return True
        self.skip(name, "speed", f"time budget: {max(left, 0):.0f} s left, needs ~{need_s:.0f} s")
        return False


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def dispatch_modes() -> tuple[str, ...]:
    """Every dispatch mode the package serves (``eplb_plugin.dispatch.DISPATCH_MODES``)."""
    from eplb_plugin.dispatch import DISPATCH_MODES

    return tuple(DISPATCH_MODES)


def op_modes() -> tuple[str, ...]:
    """The modes ``map_and_count`` itself takes (others, e.g. global, go through route)."""
    from eplb_plugin.kernels import map_and_count

    taken = []
    for mode in dispatch_modes():
        maps = _tiny_maps()
        try:
            with kernels("torch"):
                map_and_count(
                    *maps,
                    0,
                    1,
                    dispatch=mode,
                    slots_per_gpu=1,
                    phy2log=torch.zeros(1, 2, dtype=torch.int64),
                )
        except ValueError as exc:
            if "dispatch" in str(exc):
                continue
        taken.append(mode)
    return tuple(taken)


def _tiny_maps():
    ids = torch.zeros(1, 1, dtype=torch.int64)
    log2phy = torch.tensor([[[0, 1]]])
    logcnt = torch.tensor([[2]])
    share = torch.tensor([[0.5, 0.5]])
    counts = torch.zeros(1, 2, dtype=torch.int32)
    return ids, log2phy, logcnt, share, counts


# ----------------------------------------------------------------------------- inputs
def random_layout(layers: int, experts: int, slots: int, gpus: int, seed: int):
    """Every expert once, the other slots random replicas; random shares per expert."""
    from eplb_plugin.layout import ExpertLayout, Topology

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(layers):
        extra = torch.randint(0, experts, (slots - experts,), generator=g)
        row = torch.cat([torch.arange(experts), extra])
        rows.append(row[torch.randperm(slots, generator=g)])
    phy2log = torch.stack(rows)
    raw = torch.rand(layers, slots, generator=g) + 0.05
    total = torch.zeros(layers, experts).scatter_add_(1, phy2log, raw)
    share = (raw / total.gather(1, phy2log)).float()
    topo = Topology(num_replicas=slots, num_gpus=gpus)
    return ExpertLayout.from_phy2log(phy2log, topo, num_experts=experts, replica_share=share)


def random_ids(
    tokens: int, top_k: int, experts: int, seed: int, minus_one: float = 0.05, hot: int = 0
) -> torch.Tensor:
    """[tokens, top_k] int64: distinct skewed experts per token (a router's top-k), some -1.

    ``hot`` > 0 puts most of the weight on experts ``0 .. hot-1``.
    """
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(experts, generator=g) ** 3 + 0.01
    if hot:
        weights[:hot] += 5.0
    ids = torch.multinomial(weights.expand(tokens, -1), top_k, generator=g)
    if minus_one:
        ids[torch.rand(tokens, top_k, generator=g) < minus_one] = -1
    return ids


def rank_zero_of(world: int):
    """A communicator for rank 0 of ``world`` EP ranks whose other ranks routed no tokens
    this step: every all-reduce over ranks equals this rank's own values, so one process can
    route with a multi-GPU topology (water-filling then spreads over several GPUs). Only
    routing uses it; nothing is ever moved."""
    from eplb_plugin.comm import LocalCommunicator

    class RankZero(LocalCommunicator):
        def split(self, size: int) -> LocalCommunicator:  # node dispatch: rank 0's node
            return rank_zero_of(min(size, self.world_size))

    comm = RankZero()
    comm.world_size = world
    return comm


def route_balancer(layout, mode: str, device: torch.device):
    """A Balancer serving ``layout`` with ``mode`` dispatch, as rank 0 of its GPUs."""
    from eplb_plugin import Balancer, EplbConfig

    per_gpu = layout.topology.slots_per_gpu
    config = EplbConfig(num_redundant_experts=layout.num_slots - layout.num_experts, dispatch=mode)
    tensors = [[torch.zeros(per_gpu, 1, device=device)] for _ in range(layout.num_layers)]
    comm = rank_zero_of(layout.topology.num_gpus)
    return Balancer(config, layout, tensors, communicator=comm)


# ----------------------------------------------------------------------------- oracles
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def apportion(ids, log2phy, logcnt, share, num_valid: int, seed: int):
    """docs/dispatch.md's apportionment in numpy float32, entry-vectorised.

    Args:
        ids: [N, K] int64 logical ids (-1 = none); log2phy: [E, X] int64; logcnt: [E] int64;
        share: [P] float32 shares used; num_valid: rows counted; seed: dither seed.
    Returns:
        ([N, K] int64 slots, [P] int64 counts).
    """
    num_tokens, top_k = ids.shape
    experts, width = log2phy.shape
    num_slots = share.shape[0]
    rows = np.arange(num_tokens)[:, None]
    flat = ids.reshape(-1)
    known = flat >= 0
    valid = (known.reshape(num_tokens, top_k) & (rows < num_valid)).reshape(-1)
    c = np.bincount(flat[valid], minlength=experts).astype(np.int64)
    # cumulative shares, summed left to right in float32; S_last = 1 (b_last = c)
    cum = np.zeros((experts, width), np.float32)
    running = np.zeros(experts, np.float32)
    for j in range(width):
        used = j < logcnt
        s_j = np.where(used, share[np.clip(log2phy[:, j], 0, None)], np.float32(0))
        running = (running + s_j.astype(np.float32)).astype(np.float32)
        cum[:, j] = running
    e1 = np.arange(1, experts + 1, dtype=np.float32)
    x = (e1 * DITHER_EXPERT).astype(np.float32) + np.float32(seed) * DITHER_SEED
    x = x.astype(np.float32)
    u = (x - np.floor(x)).astype(np.float32)
    cf = c.astype(np.float32)
    raw = np.floor(((cf[:, None] * cum).astype(np.float32) + u[:, None]).astype(np.float32))
    bounds = np.zeros((experts, width), np.int64)
    prev = np.zeros(experts, np.int64)
    for j in range(width):
        # clamp to [b_{j-1}, c] (docs/kernels.md); the last replica ends at c exactly
        b = np.minimum(np.maximum(raw[:, j].astype(np.int64), prev), c)
        b = np.where(j >= logcnt - 1, c, b)
        bounds[:, j] = b
        prev = b
    out = np.full(flat.shape, -1, np.int64)
    pad = known & ~valid
    out[pad] = log2phy[flat[pad], 0]
    vi = np.nonzero(valid)[0]
    e = flat[vi]
    order = np.argsort(e, kind="stable")
    sorted_e = e[order]
    starts = np.searchsorted(sorted_e, sorted_e, side="left")
    n = np.empty_like(order)
    n[order] = np.arange(len(order)) - starts
    cols = np.arange(width)[None, :]
    last = (logcnt[e] - 1)[:, None]
    j = ((bounds[e] <= n[:, None]) & (cols < last)).sum(1)
    out[vi] = log2phy[e, j]
    counts = np.zeros(num_slots, np.int64)
    prev = np.zeros(experts, np.int64)
    for jj in range(width):
        used = jj < logcnt
        np.add.at(counts, np.clip(log2phy[used, jj], 0, None), (bounds[used, jj] - prev[used]))
        prev = np.where(used, bounds[:, jj], prev)
    return out.reshape(num_tokens, top_k), counts


def check_routing(ids, out, counts, layout, layer: int, num_valid: int, mode: str) -> dict:
    """Mode-independent oracle of one routed batch; raises CheckFailed.

    Every valid entry lands on a slot of its expert; -1 stays -1; padding rows go to
    replica 0; the counts are what the mapping did; within an expert, entries in row-major
    order take replicas in order (the apportionment's runs); and per slot the count is within
    one token of ``slot_loads`` (the package's aggregate model of the mode).
    """
    from eplb_plugin.dispatch import slot_loads

    phy2log, log2phy = _np(layout.phy2log[layer]), _np(layout.log2phy[layer])
    logcnt = _np(layout.logcnt[layer])
    num_tokens, _ = ids.shape
    num_slots = phy2log.shape[0]
    rows = np.arange(num_tokens)[:, None]
    none = ids < 0
    valid = ~none & (rows < num_valid)
    pad = ~none & (rows >= num_valid)
    require(bool((out[none] == -1).all()), "an entry with id -1 was mapped to a slot")
    require(
        bool((out[pad] == log2phy[ids[pad], 0]).all()),
        "a padding row was not mapped to replica 0 of its expert",
    )
    got = out[valid]
    require(bool(((got >= 0) & (got < num_slots)).all()), "a valid entry got no slot")
    require(
        bool((phy2log[got] == ids[valid]).all()),
        "a valid entry was sent to a slot holding another expert",
        bad=int((phy2log[got] != ids[valid]).sum()),
    )
    did = np.bincount(got, minlength=num_slots)
    require(
        bool((did == counts).all()),
        "counts differ from the tokens the mapping sent to each slot",
        max_diff=int(np.abs(did - counts).max()),
    )
    replica = np.zeros(num_slots, np.int64)
    for e in range(log2phy.shape[0]):
        for j in range(int(logcnt[e])):
            replica[log2phy[e, j]] = j
    e_flat = ids[valid]  # row-major order of the valid entries
    order = np.argsort(e_flat, kind="stable")
    same = e_flat[order][1:] == e_flat[order][:-1]
    steps = np.diff(replica[got[order]])
    require(
        bool((steps[same] >= 0).all()),
        "an expert's entries do not take its replicas in row-major runs",
    )
    rank_counts = torch.zeros(1, layout.num_layers, layout.num_experts, dtype=torch.float64)
    c = np.bincount(ids[valid], minlength=layout.num_experts)
    rank_counts[0, layer] = torch.from_numpy(c.astype(np.float64))
    ideal = _np(slot_loads(layout, rank_counts, mode)[layer])
    dev = np.abs(counts - ideal)
    # water-filled shares are recomputed on the host here: allow float differences
    slack = 1.0 + (1e-6 if mode == "static" else 1e-3) * c[phy2log]
    require(
        bool((dev <= slack).all()),
        f"a slot's count is more than one token from slot_loads({mode})",
        max_deviation=float(dev.max()),
    )
    return {"max_deviation_from_slot_loads": float(dev.max()), "entries": int(valid.sum())}


# ----------------------------------------------------------------------------- sections
def sec_env(ctx: Context) -> None:
    def env() -> dict:
        from eplb_plugin.kernels import HAS_TRITON, backend_for

        info = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "numpy": np.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "device": str(ctx.device),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
            "EPLB_KERNELS": os.environ.get("EPLB_KERNELS"),
            "has_triton": HAS_TRITON,
            "backend": backend_for(ctx.device),
            "dispatch_modes": list(dispatch_modes()),
            "op_dispatch_modes": list(op_modes()),
        }
        if ctx.cuda:
            props = torch.cuda.get_device_properties(ctx.device)
            info.update(
                gpu=props.name,
                capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1),
                nccl=_nccl_version(),
            )
        require(
            info["backend"] == "triton",
            f"the kernels would run the {info['backend']} path on {ctx.device}: "
            "nothing compiled would be checked",
            **info,
        )
        return info

    ctx.check("environment", "correctness", env)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: reported as None
        return None


def _nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
        return ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001
        return None


def sec_map_and_count(ctx: Context) -> None:
    z = ctx.sizes
    layout = random_layout(z.layers, z.experts, z.slots, z.gpus, seed=1)
    cases = [(n, "decode") for n in z.decode] + [(n, "prefill") for n in z.prefill]
    for mode in dispatch_modes():
        bal = route_balancer(layout, mode, ctx.device)
        for i, (tokens, phase) in enumerate(cases):
            for dtype in (torch.int32, torch.int64):
                name = f"map_and_count/{mode}/{phase}-{tokens}/{str(dtype)[6:]}"
                ctx.check(name, "correctness", route_case, ctx, bal, layout, mode, tokens, dtype, i)
        bal.close()
    ctx.check("map_and_count/op-extras", "correctness", op_extras, ctx, layout)


def route_case(ctx, bal, layout, mode, tokens, dtype, index) -> dict:
    """Balancer.route (the engines' path) on the compiled kernel, the torch path and the
    oracles, for one batch."""
    z = ctx.sizes
    layer = index % z.layers
    ids = random_ids(tokens, z.top_k, z.experts, seed=100 + index + tokens)
    # num_valid: every row for even cases, fewer (some padding) for odd ones
    num_valid = tokens if index % 2 == 0 else max(0, tokens - max(1, tokens // 5))
    seed = 3 * index + 1
    dev_ids = ids.to(dtype).to(ctx.device)
    nv = torch.tensor(num_valid, device=ctx.device)
    sd = torch.tensor(seed, dtype=torch.int64, device=ctx.device)
    results = {}
    for backend in (None, "torch"):
        with kernels(backend):
            bal.counts.zero_()
            poisoned = torch.full_like(dev_ids, -7)  # no valid output is -7: all must be written
            out = bal.route(dev_ids.clone(), layer, nv, seed=sd, out=poisoned)
            ctx.sync()
            results[backend or "compiled"] = (_np(out.long()), _np(bal.counts.long()))
            require(out.dtype == dtype, f"route returned {out.dtype} for {dtype} ids")
    (out_k, cnt_k), (out_t, cnt_t) = results["compiled"], results["torch"]
    others = np.delete(cnt_k, layer, axis=0)
    require(not others.any(), "route counted into another layer's row")
    agree = same_routing([out_k], cnt_k, [out_t], cnt_t, mode, "compiled kernel and torch path")
    ids_np = _np(ids)
    details = check_routing(ids_np, out_k, cnt_k[layer], layout, layer, num_valid, mode)
    share = _np(layout.replica_share[layer]).astype(np.float32)
    log2phy, logcnt = _np(layout.log2phy[layer]), _np(layout.logcnt[layer])
    if mode == "static":
        want_out, want_counts = apportion(ids_np, log2phy, logcnt, share, num_valid, seed)
        require(
            np.array_equal(out_k, want_out) and np.array_equal(cnt_k[layer], want_counts),
            "the kernel differs from the dispatch contract (docs/dispatch.md)",
            entries_differing=int((out_k != want_out).sum()),
        )
        details["contract"] = "exact"
    details.update(tokens=tokens, num_valid=num_valid, layer=layer, dtype=str(dtype), **agree)
    return details


def same_routing(outs_k, cnt_k, outs_t, cnt_t, mode: str, what: str) -> dict:
    """The compiled path's routing against the torch path's.

    ``static``: bit for bit. Modes that water-fill on the device: the compiled path runs the
    fused Triton water-fill, whose shares agree with the torch reference's within float32
    rounding (sums in another order), so an interval end ``floor(c S_j + u)`` lying within
    rounding of an integer may move by one entry: allowed are per-slot counts within 2 (both
    ends of a slot's interval) and at most one differing entry per slot.
    """
    differing = int(sum(int((a != b).sum()) for a, b in zip(outs_k, outs_t)))
    count_diff = int(np.abs(cnt_k - cnt_t).max()) if cnt_k.size else 0
    if mode == "static":
        ok = differing == 0 and count_diff == 0
    else:
        ok = count_diff <= 2 and differing <= cnt_k.shape[-1] * len(outs_k)
    require(ok, f"{what} disagree", entries_differing=differing, count_diff=count_diff)
    return {"entries_differing_from_torch": differing, "count_diff_from_torch": count_diff}


def op_extras(ctx: Context, layout) -> dict:
    """map_and_count called directly: in place, strided ids, preallocated workspace,
    out-of-range ids unvalidated (-1, not counted) and validated (ValueError, nothing
    written)."""
    from eplb_plugin.kernels import make_map_and_count_workspace, map_and_count

    z = ctx.sizes
    dev = ctx.device
    maps = [t.to(dev) for t in (layout.log2phy, layout.logcnt, layout.replica_share)]
    tokens = z.decode[-1] + 3
    ids = random_ids(tokens, z.top_k, z.experts, seed=7).to(torch.int32)
    want, want_counts = apportion(
        _np(ids.long()),
        _np(layout.log2phy[1]),
        _np(layout.logcnt[1]),
        _np(layout.replica_share[1]).astype(np.float32),
        tokens,
        5,
    )
    counts = torch.zeros(z.layers, z.slots, dtype=torch.int32, device=dev)
    inplace = ids.to(dev, copy=True)
    work = make_map_and_count_workspace(tokens + 5, z.top_k, z.experts, dev)
    map_and_count(inplace, *maps, counts, 1, tokens, seed=5, out=inplace, workspace=work)
    require(np.array_equal(_np(inplace.long()), want), "in place (out=topk_ids) differs")
    require(np.array_equal(_np(counts[1].long()), want_counts), "in-place counts differ")
    wide = torch.full((tokens, 2 * z.top_k), 7, dtype=torch.int64, device=dev)
    wide[:, ::2] = ids.long().to(dev)
    counts.zero_()
    out = map_and_count(wide[:, ::2], *maps, counts, 1, tokens, seed=5)
    require(np.array_equal(_np(out), want), "strided topk_ids differ")
    require(bool((wide[:, 1::2] == 7).all()), "the op wrote into its input's gaps")
    bad = ids.clone()
    bad[0, 0], bad[1, 0] = z.experts, z.experts + 100
    counts.zero_()
    out = map_and_count(bad.to(dev), *maps, counts, 1, tokens, seed=5, validate=False)
    require(int(out[0, 0]) == -1 and int(out[1, 0]) == -1, "an out-of-range id got a slot")
    counted = int(((bad >= 0) & (bad < z.experts)).sum())
    require(int(counts.sum()) == counted, "out-of-range ids were counted")
    counts.zero_()
    try:
        map_and_count(bad.to(dev), *maps, counts, 1, tokens, validate=True)
        raise CheckFailed("validate=True accepted an out-of-range id")
    except ValueError:
        pass
    require(not bool(counts.any()), "a rejected call wrote counts")
    return {"tokens": tokens}


# ----------------------------------------------------------------------------- weights
def guarded(shape: tuple[int, ...], dtype: torch.dtype, device, offset: int = 64):
    """A tensor of random bytes inside a uint8 buffer with ``offset`` guard bytes each side.

    Returns (tensor, raw buffer); the guards let a check see writes outside the tensor.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = itemsize
    for s in shape:
        nbytes *= s
    raw = torch.randint(0, 256, (offset + nbytes + 64,), dtype=torch.uint8, device=device)
    return raw[offset : offset + nbytes].view(dtype).view(shape), raw


def weight_sets(ctx: Context):
    """[(name, tensors, raws)]: bf16, fp8 with scales, odd shapes and odd addresses."""
    z, dev, s = ctx.sizes, ctx.device, ctx.sizes.weight_slots
    fp8 = torch.float8_e4m3fn
    hid, inter = z.hidden, z.inter
    blk = 8 if ctx.smoke else 128

    def cdiv(a, b):
        return -(-a // b)

    specs = {
        "bf16 w13/w2 + fp32 bias": [
            ((s, 2 * inter, hid), torch.bfloat16, 64),
            ((s, hid, inter), torch.bfloat16, 64),
            ((s, 2 * inter), torch.float32, 64),
        ],
        "fp8 e4m3fn w13/w2 + fp32 block scales": [
            ((s, 2 * inter, hid), fp8, 64),
            ((s, cdiv(2 * inter, blk), cdiv(hid, blk)), torch.float32, 64),
            ((s, hid, inter), fp8, 64),
            ((s, cdiv(hid, blk), cdiv(inter, blk)), torch.float32, 64),
        ],
        "odd shapes and addresses": [
            ((s, 3, 7), torch.bfloat16, 64),
            ((s, 5), fp8, 65),
            ((s, 1), torch.uint8, 3),
            ((s, 13, 3), torch.float32, 64),
            ((s, 2, 3), torch.int8, 1),
        ],
    }
    out = []
    for name, spec in specs.items():
        pairs = [guarded(shape, dtype, dev, off) for shape, dtype, off in spec]
        out.append((name, [p[0] for p in pairs], [p[1] for p in pairs]))
    # a view with a free slot stride: slot rows contiguous, gaps between them
    raw = torch.randint(0, 256, (s * 2 * 34 * 2,), dtype=torch.uint8, device=dev)
    out.append(("slot-strided bf16 view", [raw.view(torch.bfloat16).view(s, 2, 34)[:, 1]], [raw]))
    return out


def mappings(slots: int, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    perm = list(range(slots))
    rng.shuffle(perm)
    replicas = [rng.randrange(slots) if s % 4 == 3 else perm[s] for s in range(slots)]
    replicas[1] = -1
    return {
        "random permutation (cycles)": perm,
        "one long cycle": [(s + 1) % slots for s in range(slots)],
        "swaps": [s ^ 1 if (s ^ 1) < slots else s for s in range(slots)],
        "replication and holes": replicas,
        "fan-out of one slot": [3] * slots,
        "identity": list(range(slots)),
    }


def host_bytes(tensors) -> list[np.ndarray]:
    """[S, row_bytes] uint8 snapshots of each tensor's slot rows (on the host)."""
    return [_np(t.contiguous().view(torch.uint8).reshape(t.shape[0], -1)).copy() for t in tensors]


def sec_weights(ctx: Context) -> None:
    from eplb_plugin.kernels import bytes_per_slot

    for set_index, (name, tensors, raws) in enumerate(weight_sets(ctx)):
        slots = tensors[0].shape[0]
        row_bytes = [r.shape[1] for r in host_bytes(tensors)]
        ctx.check(
            f"bytes_per_slot/{name}",
            "correctness",
            lambda t=tensors, rb=row_bytes: require(
                bytes_per_slot(t) == sum(rb), f"bytes_per_slot {bytes_per_slot(t)} != {sum(rb)}"
            ),
        )
        for map_name, mapping in mappings(slots, set_index).items():
            ctx.check(
                f"shuffle/{name}/{map_name}",
                "correctness",
                shuffle_case,
                ctx,
                tensors,
                raws,
                mapping,
                row_bytes,
            )
        ctx.check(f"pack_unpack/{name}", "correctness", pack_case, ctx, tensors, raws)


def _guards(raws, tensors):
    """Bytes of each raw buffer outside its tensor (host copies)."""
    out = []
    for raw, t in zip(raws, tensors):
        if t.data_ptr() == raw.data_ptr() and t.numel() * t.element_size() == raw.numel():
            out.append(None)
            continue
        out.append(_np(raw).copy())
    return out


def _outside_changed(raws, tensors, before) -> bool:
    for raw, t, old in zip(raws, tensors, before):
        if old is None:
            continue
        now = _np(raw)
        inside = np.zeros(now.shape, bool)
        start = t.data_ptr() - raw.data_ptr()
        rows = host_bytes([t])[0]
        stride = t.stride(0) * t.element_size()
        for s in range(t.shape[0]):
            inside[start + s * stride : start + s * stride + rows.shape[1]] = True
        if not np.array_equal(now[~inside], old[~inside]):
            return True
    return False


def shuffle_case(ctx: Context, tensors, raws, mapping, row_bytes) -> dict:
    from eplb_plugin.kernels import shuffle_experts

    budgets = {"default": None, "tight": max(row_bytes), "8 rows": 8 * sum(row_bytes) + 1024}
    if ctx.smoke:  # the interpreter runs each launch in Python: keep the smoke short
        del budgets["8 rows"]
    runs = 0
    for backend in (None, "torch"):
        for budget_name, budget in budgets.items():
            before = host_bytes(tensors)
            guards = _guards(raws, tensors)
            want = [
                np.stack([b[m] if m >= 0 else b[s] for s, m in enumerate(mapping)]) for b in before
            ]
            index = torch.tensor(mapping, device=ctx.device) if runs % 2 else mapping
            with kernels(backend):
                shuffle_experts(tensors, index, staging_bytes=budget)
            ctx.sync()
            after = host_bytes(tensors)
            for i, (a, w) in enumerate(zip(after, want)):
                require(
                    np.array_equal(a, w),
                    f"tensor {i} ({tensors[i].dtype}) not bit exact "
                    f"({backend or 'compiled'}, staging {budget_name})",
                    rows_differing=int((a != w).any(1).sum()),
                )
            require(
                not _outside_changed(raws, tensors, guards),
                f"bytes outside the tensors changed ({backend or 'compiled'}, {budget_name})",
            )
            runs += 1
    return {"runs": runs, "slots": len(mapping)}


def pack_case(ctx: Context, tensors, raws) -> dict:
    from eplb_plugin.kernels import pack_slots, unpack_slots

    slots = tensors[0].shape[0]
    sources = [slots - 1, 0, 2, 2, slots // 2]  # a repeat: packing allows it
    dests = [1, 3, 0, slots - 1, 5]
    rows = host_bytes(tensors)
    want = np.concatenate([np.concatenate([r[s] for r in rows]) for s in sources])
    for backend in (None, "torch"):
        tag = backend or "compiled"
        with kernels(backend):
            buf = pack_slots(tensors, sources)
            poisoned = torch.full_like(buf, 0xA5)
            pack_slots(tensors, torch.tensor(sources, device=ctx.device), out=poisoned)
        require(np.array_equal(_np(buf), want), f"pack_slots layout differs ({tag})")
        require(np.array_equal(_np(poisoned), want), f"pack_slots out= not fully written ({tag})")
        fresh_pairs = [guarded(tuple(t.shape), t.dtype, ctx.device, 64) for t in tensors]
        fresh = [p[0] for p in fresh_pairs]
        for t in fresh:
            t.view(torch.uint8).fill_(0x5A)
        before = host_bytes(fresh)
        guards = _guards([p[1] for p in fresh_pairs], fresh)
        with kernels(backend):
            unpack_slots(fresh, dests, buf)
        ctx.sync()
        after = host_bytes(fresh)
        for i, (a, b) in enumerate(zip(after, before)):
            expect = b.copy()
            for d, s in zip(dests, sources):
                expect[d] = rows[i][s]
            require(np.array_equal(a, expect), f"unpack_slots tensor {i} differs ({tag})")
        require(
            not _outside_changed([p[1] for p in fresh_pairs], fresh, guards),
            f"unpack_slots wrote outside the tensors ({tag})",
        )
    return {"bytes": int(want.size)}


# ----------------------------------------------------------------------------- graphs
def capture(ctx: Context, fn):
    """(replay, captured): a CUDA graph of ``fn`` after a warm-up on a side stream; on CPU
    the eager ``fn`` stands in (the checks around it still run)."""
    if not ctx.cuda:
        fn()
        return fn, False
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and allocates outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay, True


def sec_graphs(ctx: Context) -> None:
    for mode in dispatch_modes():
        ctx.check(f"graphs/{mode}", "correctness", graph_case, ctx, mode)


def map_pointers(bal) -> list[int]:
    m = bal.maps
    return [t.data_ptr() for t in (m.phy2log, m.log2phy, m.logcnt, m.replica_share)]


def graph_case(ctx: Context, mode: str) -> dict:
    """Capture a step routing every layer through Balancer.route, commit a rebalance with
    Balancer.step() (maps rewritten in place, weights shuffled), replay without re-capture:
    outputs and counts must follow the new maps, weights the new layout."""
    from eplb_plugin import Balancer, EplbConfig
    from eplb_plugin.layout import ExpertLayout, Topology

    experts, slots, layers, top_k, tokens = ctx.sizes.graph
    dev = ctx.device
    spare = slots - experts
    # redundant slots hold the coldest experts; the load below is on the hottest
    row = torch.cat([torch.arange(experts), torch.arange(experts - spare, experts)])
    phy2log0 = row.expand(layers, -1).clone()
    layout = ExpertLayout.from_phy2log(phy2log0, Topology(slots, num_gpus=1), experts)
    g = torch.Generator().manual_seed(11)
    sig_w = torch.randint(0, 256, (layers, experts, 4, 32), dtype=torch.uint8, generator=g)
    sig_w = sig_w.view(torch.bfloat16)
    sig_s = torch.randn(layers, experts, 3, generator=g)
    tensors = [
        [sig_w[i][phy2log0[i]].to(dev), sig_s[i][phy2log0[i]].to(dev)] for i in range(layers)
    ]
    config = EplbConfig(
        num_redundant_experts=spare,
        window=2,
        interval=2,
        plan_delay=0,
        layers_per_step=0,
        min_gain=0.0,
        dispatch=mode,
    )
    bal = Balancer(config, layout, tensors)
    ids_buf = torch.empty(tokens, top_k, dtype=torch.int32, device=dev)
    num_valid = tokens - 2
    nv = torch.tensor(num_valid, device=dev)
    seed = torch.tensor(1, dtype=torch.int64, device=dev)
    outs = [torch.full((tokens, top_k), -7, dtype=torch.int32, device=dev) for _ in range(layers)]

    def step_fn():
        for layer in range(layers):
            bal.route(ids_buf, layer, nv, seed=seed, out=outs[layer])

    def load(batch_seed: int) -> np.ndarray:
        ids = random_ids(tokens, top_k, experts, batch_seed, minus_one=0.05, hot=spare)
        ids_buf.copy_(ids.to(torch.int32).to(dev))
        return _np(ids)

    ids_np = load(21)
    ptrs = map_pointers(bal)
    replay, captured = capture(ctx, step_fn)

    def verify(ids: np.ndarray, tag: str) -> tuple[list[np.ndarray], np.ndarray]:
        bal.counts.zero_()
        for o in outs:
            o.fill_(-7)  # the replay must write every entry
        replay()
        ctx.sync()
        got = [_np(o.long()) for o in outs]
        got_counts = _np(bal.counts.long())
        bal.counts.zero_()
        with kernels("torch"):
            ref = [_np(bal.route(ids_buf.clone(), i, nv, seed=seed).long()) for i in range(layers)]
        ref_counts = _np(bal.counts.long())
        what = f"{tag}: replayed routing and the eager torch path on the current maps"
        same_routing(got, got_counts, ref, ref_counts, mode, what)
        current = bal.layout
        for i in range(layers):
            check_routing(ids, got[i], got_counts[i], current, i, num_valid, mode)
        return got, got_counts

    verify(ids_np, "before the commit")
    bal.step()  # step 1: records the load the eager reference left in counts
    load(22)
    bal.counts.zero_()
    replay()
    report = bal.step()  # step 2: plan due, planned, moved and committed in this step
    ctx.sync()
    require(
        report is not None and report.event == "done",
        f"no rebalance was committed (report: {report})",
    )
    after = bal.layout.phy2log
    moved = int((after != phy2log0).sum())
    require(moved > 0, "the commit left every slot as it was: the replay would prove nothing")
    require(
        map_pointers(bal) == ptrs,
        "the commit reallocated the maps (a captured graph would read stale ones)",
    )
    for i in range(layers):
        w = host_bytes([tensors[i][0]])[0]
        want = host_bytes([sig_w[i][after[i]]])[0]
        require(np.array_equal(w, want), f"layer {i}: weights do not follow the new layout")
        require(
            torch.equal(tensors[i][1].cpu(), sig_s[i][after[i]]),
            f"layer {i}: scales do not follow the new layout",
        )
    ids_np = load(23)
    got, _ = verify(ids_np, "after the commit")
    old = _np(phy2log0)
    rows = np.arange(tokens)[:, None]
    valid = (ids_np >= 0) & (rows < num_valid)
    stale = sum(int((old[i][got[i][valid]] != ids_np[valid]).sum()) for i in range(layers))
    require(stale > 0, "no entry went to a slot that is new for its expert")
    return {
        "captured": captured,
        "layers": layers,
        "slots_changed": moved,
        "entries_on_new_slots": stale,
        "tokens": tokens,
    }


# ----------------------------------------------------------------------------- e2e
def sec_e2e(ctx: Context) -> None:
    modes = (None,) if ctx.smoke else dispatch_modes()
    for mode in modes:
        name = f"e2e/demo/{mode or 'default dispatch'}"
        need = 30.0 if ctx.smoke else 60.0
        if ctx.left() < need:
            ctx.skip(name, "e2e", f"time budget: {max(ctx.left(), 0):.0f} s left")
            continue
        ctx.check(name, "e2e", e2e_case, ctx, mode)


def e2e_case(ctx: Context, mode: str | None) -> dict:
    """``eplb demo`` with one rank on this device: tokens identical with EPLB off and on."""
    if ctx.cuda:
        torch.cuda.empty_cache()
    # below the parent's stall timeout (300 s): a slow demo is a failure, not a killed worker
    timeout = max(30.0, min(ctx.left(), 240.0))
    argv = [
        sys.executable,
        "-m",
        "eplb_plugin.cli.main",
        "demo",
        "--device",
        ctx.device.type,
        "--ranks",
        "1",
        "--no-report",
        "--json",
        "--timeout",
        str(int(timeout)),
        *ctx.sizes.e2e_args,
    ]
    if mode is not None:
        argv += ["--eplb-dispatch", mode]
    start = time.perf_counter()
    try:
        # from a neutral folder: `-m` puts the working directory on sys.path, and in the
        # repository root our kernels/ folder would shadow Hugging Face's `kernels` package
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout + 15, cwd=tempfile.gettempdir()
        )
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"eplb demo ran past {timeout + 15:.0f} s", {"argv": argv}) from exc
    wall = time.perf_counter() - start
    text = proc.stdout
    summary = None
    if "{" in text:
        with contextlib.suppress(ValueError):
            summary = json.loads(text[text.index("{") :])
    require(
        proc.returncode == 0 and summary is not None,
        f"eplb demo exited {proc.returncode}: {proc.stderr[-1500:]}",
        argv=" ".join(argv),
    )
    require(bool(summary["tokens_identical"]), "tokens differ with EPLB on and off", **summary)
    require(int(summary["tokens_compared"]) > 0, "no tokens were compared")
    return {
        "command": " ".join(["eplb"] + argv[3:]),
        "dispatch": (summary.get("eplb") or {}).get("dispatch", mode),
        "tokens_compared": summary["tokens_compared"],
        "decode_s": summary.get("decode_s"),
        "rebalances": summary.get("rebalances"),
        "wall_s": round(wall, 1),
    }


# ----------------------------------------------------------------------------- timing
class Clock:
    """Medians of device time: CUDA events on a GPU, a host clock after a sync on CPU."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.scratch = None

    def flush(self) -> None:
        """Evict the L2 by writing a buffer larger than any L2 (H200: 60 MB)."""
        if not self.ctx.cuda:
            return
        if self.scratch is None:
            self.scratch = torch.empty(256 << 20, dtype=torch.uint8, device=self.ctx.device)
        self.scratch.zero_()

    def times(self, fn, reps: int, warmup: int = 2, inner: int = 1, flush: bool = False):
        """Seconds per call of ``fn`` (``inner`` calls per timed region), ``reps`` regions."""
        for _ in range(1 if self.ctx.smoke else warmup):
            fn()
        self.ctx.sync()
        out = []
        for _ in range(reps):
            if flush:
                self.flush()
            if self.ctx.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                out.append((time.perf_counter() - t0) / inner)
        return out


def stats(times: list[float]) -> dict:
    arr = np.array(times)
    return {
        "median_s": float(np.median(arr)),
        "min_s": float(arr.min()),
        "max_s": float(arr.max()),
        "reps": len(times),
    }


def sec_speed_bandwidth(ctx: Context) -> None:
    clock = Clock(ctx)
    bw = ctx.check("memory bandwidth (device-to-device copy)", "speed", copy_bandwidth, ctx, clock)
    copy_bw = (bw or {}).get("bandwidth_GBps")
    for name, dtype, hidden, inter in ctx.sizes.bench_models:
        if ctx.speed_ok(f"shuffle/{name}", 20.0 if ctx.cuda else 1.0):
            ctx.check(
                f"shuffle/{name}", "speed", shuffle_speed, ctx, clock, dtype, hidden, inter, copy_bw
            )
    del clock


def copy_bandwidth(ctx: Context, clock: Clock) -> dict:
    n = ctx.sizes.copy_bytes
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    t = stats(clock.times(lambda: dst.copy_(src), reps=ctx.sizes.speed_reps, flush=True))
    t["bytes"] = n
    t["bandwidth_GBps"] = 2 * n / t["median_s"] / 1e9  # read + write
    return t


def bench_tensors(ctx: Context, dtype: str, hidden: int, inter: int):
    s, dev = ctx.sizes.bench_slots, ctx.device

    def rand(shape, dt):
        nbytes = torch.empty(0, dtype=dt).element_size()
        for x in shape:
            nbytes *= x
        return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev).view(dt).view(shape)

    if dtype == "bf16":
        return [
            rand((s, 2 * inter, hidden), torch.bfloat16),
            rand((s, hidden, inter), torch.bfloat16),
            rand((s, 2 * inter), torch.float32),
        ]
    blk = 128 if ctx.cuda else 8
    fp8 = torch.float8_e4m3fn
    return [
        rand((s, 2 * inter, hidden), fp8),
        rand((s, -(-2 * inter // blk), -(-hidden // blk)), torch.float32),
        rand((s, hidden, inter), fp8),
        rand((s, -(-hidden // blk), -(-inter // blk)), torch.float32),
    ]


def shuffle_speed(ctx: Context, clock: Clock, dtype: str, hidden: int, inter: int, copy_bw):
    """shuffle_experts and pack/unpack against copy_ of the same bytes, and the copy
    bandwidth of this run."""
    from eplb_plugin.kernels import bytes_per_slot, pack_slots, shuffle_experts, unpack_slots

    tensors = bench_tensors(ctx, dtype, hidden, inter)
    slots = tensors[0].shape[0]
    per_slot = bytes_per_slot(tensors)
    rng = random.Random(0)
    perm = list(range(slots))
    rng.shuffle(perm)
    mapping = [rng.randrange(slots) if s % 8 == 7 else perm[s] for s in range(slots)]
    written = sum(1 for s, m in enumerate(mapping) if m >= 0 and m != s)
    src = torch.empty(written * per_slot, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    reps = ctx.sizes.speed_reps
    base = stats(clock.times(lambda: dst.copy_(src), reps=reps, flush=True))
    out = {
        "slots": slots,
        "bytes_per_slot": per_slot,
        "slots_written": written,
        "bytes_written": written * per_slot,
        "copy": base,
        "goal_ratio": SHUFFLE_GOAL,
        "copy_bandwidth_GBps": copy_bw,
    }
    for label, budget in (
        ("shuffle, staging 1 row/tensor", None),
        ("shuffle, staging 8 rows/tensor", 8 * per_slot + 1024),
    ):
        t = stats(
            clock.times(
                lambda b=budget: shuffle_experts(tensors, mapping, staging_bytes=b),
                reps=reps,
                flush=True,
            )
        )
        t["ratio_to_copy"] = t["median_s"] / base["median_s"]
        t["goal_met"] = t["ratio_to_copy"] <= SHUFFLE_GOAL
        t["bandwidth_GBps"] = 2 * written * per_slot / t["median_s"] / 1e9
        if copy_bw:
            t["fraction_of_copy_bandwidth"] = t["bandwidth_GBps"] / copy_bw
        out[label] = t
    half = list(range(0, slots, 2))
    buf = pack_slots(tensors, half)
    other = torch.empty_like(buf)
    pbase = stats(clock.times(lambda: other.copy_(buf), reps=reps, flush=True))
    out["pack/unpack copy"] = pbase
    for label, fn in (
        ("pack_slots", lambda: pack_slots(tensors, half, out=buf)),
        ("unpack_slots", lambda: unpack_slots(tensors, half, buf)),
    ):
        t = stats(clock.times(fn, reps=reps, flush=True))
        t["ratio_to_copy"] = t["median_s"] / pbase["median_s"]
        t["bandwidth_GBps"] = 2 * buf.numel() / t["median_s"] / 1e9
        out[label] = t
    out["bytes_packed"] = int(buf.numel())
    return out


def sec_speed_map_and_count(ctx: Context) -> None:
    z = ctx.sizes
    layout = random_layout(4, z.experts, z.slots, z.gpus, seed=2)
    for mode in op_modes():
        for tokens in z.speed_tokens:
            name = f"map_and_count latency/{mode}/N={tokens}"
            if ctx.speed_ok(name, 8.0 if ctx.cuda else 0.5):
                ctx.check(name, "speed", map_speed, ctx, layout, mode, tokens)


def map_speed(ctx: Context, layout, mode: str, tokens: int) -> dict:
    """Per-layer latency of map_and_count vs a plain log2phy gather + bincount (eager,
    bincount syncs on CUDA) and gather + scatter_add_ (graph-capturable), eager and in a
    CUDA graph of ``inner`` calls over the layers."""
    from eplb_plugin.kernels import make_map_and_count_workspace, map_and_count

    z, dev = ctx.sizes, ctx.device
    layers, slots, top_k = layout.num_layers, layout.num_slots, z.top_k
    log2phy, logcnt = layout.log2phy.to(dev), layout.logcnt.to(dev)
    share, phy2log = layout.replica_share.to(dev), layout.phy2log.to(dev)
    ids = random_ids(tokens, top_k, layout.num_experts, seed=tokens, minus_one=0.0)
    ids = ids.to(torch.int32).to(dev)
    out = torch.empty_like(ids)
    work = make_map_and_count_workspace(tokens, top_k, layout.num_experts, dev)
    counts = torch.zeros(layers, slots, dtype=torch.int32, device=dev)
    nv = torch.tensor(tokens, device=dev)
    seed = torch.tensor(0, dtype=torch.int64, device=dev)
    ones = torch.ones(tokens * top_k, dtype=torch.int32, device=dev)
    inner = z.speed_inner
    spg = layout.topology.slots_per_gpu

    def op():
        for i in range(inner):
            map_and_count(
                ids,
                log2phy,
                logcnt,
                share,
                counts,
                i % layers,
                nv,
                dispatch=mode,
                phy2log=phy2log,
                slots_per_gpu=spg,
                seed=seed,
                out=out,
                workspace=work,
            )

    def gather_bincount():
        for i in range(inner):
            phys = log2phy[i % layers, ids.long(), 0]
            torch.bincount(phys.view(-1), minlength=slots)

    def gather_scatter():
        for i in range(inner):
            phys = log2phy[i % layers, ids.long(), 0]
            counts[i % layers].scatter_add_(0, phys.view(-1), ones)

    clock = Clock(ctx)
    reps = z.speed_reps
    res = {
        "tokens": tokens,
        "top_k": top_k,
        "experts": layout.num_experts,
        "slots": slots,
        "calls_per_timing": inner,
    }
    res["op_eager"] = stats([t / inner for t in clock.times(op, reps)])
    res["gather_bincount_eager"] = stats([t / inner for t in clock.times(gather_bincount, reps)])
    res["gather_scatter_eager"] = stats([t / inner for t in clock.times(gather_scatter, reps)])
    res["ratio_eager_vs_bincount"] = (
        res["op_eager"]["median_s"] / res["gather_bincount_eager"]["median_s"]
    )
    if ctx.cuda:
        for label, fn in (("op_graph", op), ("gather_scatter_graph", gather_scatter)):
            replay, _ = capture(ctx, fn)
            res[label] = stats([t / inner for t in clock.times(replay, reps)])
            del replay
        res["ratio_graph_vs_scatter"] = (
            res["op_graph"]["median_s"] / res["gather_scatter_graph"]["median_s"]
        )
        torch.cuda.empty_cache()
    return res


def sec_speed_global(ctx: Context) -> None:
    if ctx.speed_ok("global dispatch all-reduce", 20.0 if ctx.cuda else 1.0):
        ctx.check("global dispatch all-reduce", "speed", global_speed, ctx)


def global_speed(ctx: Context) -> dict:
    """What ``global`` dispatch adds per layer, on a one-rank process group of this device.

    - ``all_reduce``: a plain all_reduce of the [E] float32 expert counts (NCCL on a GPU: its
      launch and local copy; one GPU has no link to measure);
    - ``communicator_all_reduce``: the same through the Balancer's communicator, the call
      ``global`` routing makes per layer on several ranks (its control group may be gloo,
      with device-host copies);
    - ``route_*_per_layer``: ``Balancer.route`` with static and global dispatch over this
      group (on one rank the routing may skip the collective: then the difference is the
      counting and water-filling alone).
    """
    import torch.distributed as dist

    from eplb_plugin import Balancer, EplbConfig
    from eplb_plugin.layout import ExpertLayout, Topology

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this worker")
    backend = "nccl" if ctx.cuda else "gloo"
    z, dev = ctx.sizes, ctx.device
    clock = Clock(ctx)
    reps, inner = z.speed_reps, z.speed_inner
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        dist.init_process_group(
            backend, init_method=f"file://{os.path.join(work, 'store')}", rank=0, world_size=1
        )
        balancers = []
        try:
            res = {"backend": backend, "experts": z.experts}
            vec = torch.rand(z.experts, dtype=torch.float32, device=dev)
            res["all_reduce"] = stats(
                clock.times(lambda: dist.all_reduce(vec), reps, warmup=3, inner=inner)
            )
            layout = ExpertLayout.identity(z.layers, z.experts, Topology(z.slots, num_gpus=1))
            tokens = 64 if ctx.cuda else 8
            ids = random_ids(tokens, z.top_k, z.experts, seed=3, minus_one=0.0)
            ids = ids.to(torch.int32).to(dev)
            for mode in ("static", "global"):
                if mode not in dispatch_modes():
                    continue
                config = EplbConfig(num_redundant_experts=z.slots - z.experts, dispatch=mode)
                tensors = [[torch.zeros(z.slots, 1, device=dev)] for _ in range(z.layers)]
                bal = Balancer(config, layout, tensors, group=dist.group.WORLD)
                balancers.append(bal)

                def route(b=bal):
                    for i in range(z.layers):
                        b.route(ids, i, tokens)

                t = clock.times(route, reps, warmup=2)
                res[f"route_{mode}_per_layer"] = stats([x / z.layers for x in t])
            comm = balancers[-1].comm
            group = getattr(comm, "control_group", None)
            res["communicator"] = type(comm).__name__
            res["communicator_backend"] = str(dist.get_backend(group)) if group else None
            res["communicator_all_reduce"] = stats(
                clock.times(lambda: comm.all_reduce(vec), reps, warmup=2, inner=inner)
            )
            if "route_global_per_layer" in res:
                res["global_extra_per_layer_s"] = (
                    res["route_global_per_layer"]["median_s"]
                    - res["route_static_per_layer"]["median_s"]
                )
            res["tokens"] = tokens
            return res
        finally:
            for bal in balancers:
                bal.close()
            dist.destroy_process_group()


WATERFILL_DEPLOYMENTS = ((288, 8), (288, 32), (320, 32), (320, 64), (320, 320))  # slots, GPUs
WATERFILL_SWEEPS = (8, 32)


def sec_speed_waterfill(ctx: Context) -> None:
    """The water-fill of one layer (what ``local``/``global`` dispatch add per layer): the
    fused Triton kernel against the torch ops, DeepSeek-V3 shapes (256 experts)."""
    z = ctx.sizes
    if ctx.smoke:
        cases = [(z.slots, z.gpus, 8)]
    else:
        cases = [(s, g, it) for s, g in WATERFILL_DEPLOYMENTS for it in WATERFILL_SWEEPS]
    for slots, gpus, iters in cases:
        name = f"water-fill/E={z.experts}/P={slots}/G={gpus}/sweeps={iters}"
        if ctx.speed_ok(name, 10.0 if ctx.cuda else 1.0):
            ctx.check(name, "speed", waterfill_speed, ctx, slots, gpus, iters)


def waterfill_speed(ctx: Context, slots: int, gpus: int, iters: int) -> dict:
    """Per-call time of ``waterfill_shares`` (torch ops) and ``waterfill_shares_triton``
    (one launch) on one layer, eager and replayed in a CUDA graph (``inner`` calls per
    timed region), and the largest difference of their shares (must stay within 2e-5,
    as in tests/test_kernels_waterfill.py)."""
    from eplb_plugin.kernels.waterfill import waterfill_shares
    from eplb_plugin.kernels.waterfill_fused import waterfill_shares_triton

    z, dev = ctx.sizes, ctx.device
    layout = random_layout(1, z.experts, slots, gpus, seed=slots + gpus)
    g = torch.Generator().manual_seed(7)
    counts = (torch.rand(1, z.experts, generator=g) ** 3 * 2000).round().to(dev)
    args = (counts, layout.phy2log.to(dev), layout.log2phy.to(dev), layout.logcnt.to(dev),
            slots // gpus, layout.replica_share.to(dev), iters)  # fmt: skip
    fused, ref = waterfill_shares_triton(*args), waterfill_shares(*args)
    ctx.sync()
    diff = float((fused - ref).abs().max())
    require(diff <= 2e-5, "fused water-fill and torch reference disagree", max_abs_diff=diff)
    inner, reps = z.speed_inner, z.speed_reps
    clock = Clock(ctx)
    res = {"experts": z.experts, "slots": slots, "gpus": gpus, "sweeps": iters,
           "max_replicas": int(layout.logcnt.max()), "max_abs_diff": diff,
           "calls_per_timing": inner}  # fmt: skip
    for label, fn in (("torch", waterfill_shares), ("fused", waterfill_shares_triton)):

        def calls(fn=fn):
            for _ in range(inner):
                fn(*args)

        res[f"{label}_eager"] = stats([t / inner for t in clock.times(calls, reps)])
        if ctx.cuda:
            replay, _ = capture(ctx, calls)
            res[f"{label}_graph"] = stats([t / inner for t in clock.times(replay, reps)])
            del replay
    kind = "graph" if ctx.cuda else "eager"
    res["ratio_torch_vs_fused"] = (
        res[f"torch_{kind}"]["median_s"] / res[f"fused_{kind}"]["median_s"]
    )
    if ctx.cuda:
        torch.cuda.empty_cache()
    return res


RUNNERS = {
    "env": sec_env,
    "map_and_count": sec_map_and_count,
    "weights": sec_weights,
    "graphs": sec_graphs,
    "e2e": sec_e2e,
    "speed_bandwidth": sec_speed_bandwidth,
    "speed_map_and_count": sec_speed_map_and_count,
    "speed_global": sec_speed_global,
    "speed_waterfill": sec_speed_waterfill,
}


def exit_with_parent() -> None:
    """If gpu_check.py dies (SIGKILL), end this worker and its process group (eplb demo's
    ranks): started in a session of its own, it would otherwise hold the GPU on."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                os._exit(1)

    threading.Thread(target=loop, name="gpu-check-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="gpu_check.py's worker (see gpu_check.py)")
    p.add_argument("--records", required=True)
    p.add_argument("--sections", required=True)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    exit_with_parent()
    ctx = Context(args.records, args.deadline, args.cpu_smoke)
    if not ctx.smoke and not torch.cuda.is_available():
        ctx.emit(
            {
                "event": "fatal",
                "error": "no CUDA device visible to torch "
                f"{torch.__version__}; run with --cpu-smoke for the CPU check",
            }
        )
        return EXIT_NO_DEVICE
    # tests: "section:crash" or "section:hang" entries make this worker die or hang there
    faults = dict(f.split(":", 1) for f in os.environ.get("GPU_CHECK_FAULTS", "").split(",") if f)
    for section in args.sections.split(","):
        ctx.section = section
        ctx.emit({"event": "start", "section": section, "time": time.time()})
        if faults.get(section) == "crash":
            os._exit(9)
        if faults.get(section) == "hang":
            time.sleep(3600)
        if section in SPEED_SECTIONS and ctx.left() <= 0:
            ctx.skip(section, "speed", "time budget spent before this section")
        else:
            try:
                RUNNERS[section](ctx)
            except Exception as exc:  # noqa: BLE001 - a section's own setup failed
                ctx.emit(
                    {
                        "event": "check",
                        "section": section,
                        "name": f"{section} (setup)",
                        "kind": "correctness",
                        "status": "failed",
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-3000:],
                        "seconds": 0.0,
                    }
                )
                ctx.probe()
        ctx.emit({"event": "end", "section": section, "time": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
