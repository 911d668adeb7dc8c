"""Step-time model of one MoE layer: what each dispatch mode costs and what its balance saves.

One MoE layer of one step is modelled as (all times in microseconds)::

    t_layer = max over GPUs g of t_expert(g) + t_dispatch + t_combine + t_mode

- ``t_expert(g) = max(flops_g / gemm_rate, bytes_g / hbm_bandwidth)``: the grouped GEMM of the
  GPU's experts is bound by its arithmetic (``6 * hidden * intermediate`` FLOP per routed token:
  gate, up and down projections) or by its memory reads (the weights of every slot that
  received at least one token, plus the tokens' activations in and out), whichever is larger.
  Small decode batches are memory-bound: every active expert's weights are read whatever
  its token count, so balancing tokens changes little there; large batches are
  compute-bound and the most loaded GPU sets the pace.
- ``t_dispatch``, ``t_combine``: DeepEP's low-latency all-to-all at this EP size, the same
  for every dispatch mode (DeepEP README latencies at 128 tokens per GPU and hidden 7168,
  scaled linearly in tokens and hidden size above that; below 128 tokens the 128-token
  latency is kept, an estimate: the kernels' latency there is not published).
- ``t_mode``: ``global`` dispatch all-reduces an ``[R, E + 1]`` float32 table per layer on
  the critical path (each rank's counts and seed in its row: ``eplb_plugin.routing.Router``;
  NCCL's own latency model: tree or ring with the LL protocol, whichever is faster,
  intra-node hops over NVLink and inter-node hops over the network, plus bytes / bandwidth);
  ``local`` and ``global`` run the water-fill on the device (``waterfill_us``), modelled in
  one of two implementations (``Hardware.fused_waterfill``):

  * ``fused`` (default): the fused Triton kernel (``kernels/waterfill_fused.py``), what the
    device ops run where Triton runs (every CUDA GPU with Triton installed): one launch
    (``kernel_us``) plus ``fused_sweep_us`` per sweep and one more sweep's worth for
    loading, duplicate detection and renormalisation;
  * ``torch``: the torch ops of ``waterfill_shares``, the path where Triton cannot run (or
    ``EPLB_KERNELS=torch``): the device kernels it launches (30 plus 47 per sweep, counted
    with the torch profiler) times ``kernel_us``, the time of one tiny kernel replayed in a
    CUDA graph.

  Both are estimates: neither has been measured on a GPU here (``benchmarks/gpu_check.py``
  times both where a GPU is lent); a measured figure goes in ``Hardware.waterfill_us``.
  ``static`` pays nothing.

Every figure a preset uses, and where it comes from, is listed in ``docs/policy.md``
("Step-time model"). All parameters can be overridden (``dataclasses.replace``, or
``eplb simulate --hw-param name=value``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from .dispatch import check_dispatch

# The fused kernel (kernels/waterfill_fused.py) runs a layer row in ONE thread block, so it
# is bound by the latency of its dependent chain, not by bandwidth: a sweep touches about
# 4 (P + 2 E X + E + G) bytes of scratch, ~11 KB at P = 320, E = 256, X = 4, which one
# SM's L1 (~128 B per clock) moves in ~100 cycles. The chain of one sweep is
#   4 exchanges through the scratch row (store, bar.sync, load: an L2 round trip of a few
#   hundred cycles, Chips and Cheese's H100 measurements; ~300 cycles each), and
#   ~2 S + 4 X + 6 cross-thread reductions (S slots per GPU, X replicas per expert; a warp
#   shuffle tree or shared-memory reduction, ~100 cycles each, counted as if serial),
# e.g. 1200 + 40 x 100 = 5200 cycles at S = 9, X = 4 (DeepSeek-V3 prefill, 288 slots on 32
# GPUs), 2.6 us at 1.98 GHz (H100/H200 boost clock). Rounded to 2.5 us per sweep for every
# shape: an ESTIMATE to be replaced by benchmarks/gpu_check.py's measurement.
FUSED_SWEEP_US = 2.5


@dataclass(frozen=True)
class Hardware:
    """One GPU type and its interconnect.

    Attributes:
        name: preset name.
        gpus_per_node: GPUs per node (NVLink domain).
        hbm_gbps: memory bandwidth the expert GEMMs achieve, GB/s.
        gemm_tflops: arithmetic rate the expert GEMMs achieve, TFLOP/s.
        a2a_ep: EP sizes of the dispatch/combine latency table, ascending.
        dispatch_us: dispatch latency per EP size at ``a2a_ref_tokens`` tokens per GPU.
        combine_us: combine latency per EP size, idem.
        a2a_ref_tokens: tokens per GPU of the latency table.
        a2a_ref_hidden: hidden size of the latency table.
        ar_base_us: NCCL base latency of an all-reduce (tree / LL protocol).
        ar_ring_base_us: NCCL base latency of a ring all-reduce (LL protocol).
        ar_nvlink_hop_us: per-hop latency inside a node (NVLink, LL).
        ar_net_tree_hop_us: per-hop latency between nodes, tree (LL).
        ar_net_ring_hop_us: per-hop latency between nodes, ring (LL).
        ar_net_overhead_us: per-step network post overhead of an inter-node ring.
        ar_gbps: all-reduce algorithm bandwidth of the LL protocol, GB/s (tiny messages:
            the bytes term is negligible next to the latency).
        a2a_hidden: fraction of the dispatch + combine time hidden behind other work (0:
            serial; DeepSeek's two-micro-batch overlap hides most of it).
        kernel_us: time of one tiny kernel replayed in a CUDA graph, us (estimate).
        fused_waterfill: 1 (default) models the fused Triton water-fill kernel, the one the
            device ops run where Triton runs; 0 the torch ops of the reference path (a
            number, so that ``--hw-param fused_waterfill=0`` selects it).
        fused_sweep_us: on-chip time of one sweep of the fused kernel, us (estimate,
            derived where ``FUSED_SWEEP_US`` is defined).
        waterfill_us: measured device time of one water-fill per layer, us, for the
            implementation ``fused_waterfill`` selects; negative (default): estimated.
    """

    name: str
    gpus_per_node: int
    hbm_gbps: float
    gemm_tflops: float
    a2a_ep: tuple[int, ...]
    dispatch_us: tuple[float, ...]
    combine_us: tuple[float, ...]
    a2a_ref_tokens: int = 128
    a2a_ref_hidden: int = 7168
    ar_base_us: float = 6.8
    ar_ring_base_us: float = 6.6
    ar_nvlink_hop_us: float = 0.6
    ar_net_tree_hop_us: float = 5.0
    ar_net_ring_hop_us: float = 2.7
    ar_net_overhead_us: float = 1.0
    ar_gbps: float = 19.0
    a2a_hidden: float = 0.0
    kernel_us: float = 2.0
    fused_waterfill: float = 1.0
    fused_sweep_us: float = FUSED_SWEEP_US
    waterfill_us: float = -1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "a2a_ep", "dispatch_us", "combine_us"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Hardware.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or (value < 0 and f.name != "waterfill_us"):
                raise ValueError(f"Hardware.{f.name} must be finite and >= 0, got {value!r}")
        if self.fused_waterfill not in (0, 1):
            raise ValueError(
                f"Hardware.fused_waterfill must be 0 (torch ops) or 1 (fused kernel), "
                f"got {self.fused_waterfill!r}"
            )
        if self.a2a_hidden > 1:
            raise ValueError(f"Hardware.a2a_hidden must lie in [0, 1], got {self.a2a_hidden!r}")
        for name in ("gpus_per_node", "hbm_gbps", "gemm_tflops", "a2a_ref_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Hardware.{name} must be > 0, got {getattr(self, name)!r}")
        n = len(self.a2a_ep)
        if n == 0 or len(self.dispatch_us) != n or len(self.combine_us) != n:
            raise ValueError("Hardware: a2a_ep, dispatch_us and combine_us need equal, >0 lengths")
        if list(self.a2a_ep) != sorted(set(self.a2a_ep)) or self.a2a_ep[0] < 1:
            raise ValueError(f"Hardware.a2a_ep must be ascending EP sizes, got {self.a2a_ep}")


@dataclass(frozen=True)
class MoeShape:
    """The routed experts of one MoE layer.

    Attributes:
        name: preset name.
        hidden: model hidden size H.
        intermediate: expert intermediate size I (each expert: gate and up H x I, down I x H).
        top_k: experts per token.
        num_experts: routed (logical) experts E.
        weight_bytes: bytes per expert weight element (1 for FP8, 2 for BF16).
        act_bytes: activation bytes per hidden element read and written per routed token
            (FP8 in, BF16 out: 3).
    """

    name: str
    hidden: int
    intermediate: int
    top_k: int
    num_experts: int
    weight_bytes: float = 1.0
    act_bytes: float = 3.0

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "top_k", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoeShape.{name} must be a positive integer, got {value!r}")
        for name in ("weight_bytes", "act_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"MoeShape.{name} must be a number > 0, got {value!r}")

    @property
    def expert_bytes(self) -> float:
        return 3.0 * self.hidden * self.intermediate * self.weight_bytes

    @property
    def flops_per_token(self) -> float:
        return 6.0 * self.hidden * self.intermediate


# DeepEP README, low-latency kernels (H800, CX7 400 Gb/s InfiniBand, 128 tokens per batch,
# hidden 7168, top-8, FP8 dispatch, BF16 combine).
_DEEPEP_LL_EP = (8, 16, 32, 64, 128, 256)
_DEEPEP_LL_DISPATCH = (77.0, 118.0, 155.0, 173.0, 192.0, 194.0)
_DEEPEP_LL_COMBINE = (114.0, 195.0, 273.0, 314.0, 369.0, 360.0)

# What every preset shares: 8 GPUs per node, Hopper FP8 GEMM rate, DeepEP's low-latency
# all-to-all figures.
_HOPPER = dict(
    gpus_per_node=8,
    gemm_tflops=1200.0,
    a2a_ep=_DEEPEP_LL_EP,
    dispatch_us=_DEEPEP_LL_DISPATCH,
    combine_us=_DEEPEP_LL_COMBINE,
)
# H800 SXM: DeepGEMM README (H800) reaches 2047-2064 GB/s in masked grouped GEMMs of
# 256 tokens per expert and 1093-1297 TFLOP/s in contiguous grouped FP8 GEMMs.
_H800_HBM_GBPS = 2050.0
# H200 SXM: same Hopper compute as the H800/H100 (datasheet), HBM3e 4.8 TB/s against the
# H800's 3.35 TB/s: the achieved bandwidth is the H800's scaled by 4.8 / 3.35 (estimate).
_H200_HBM_GBPS = _H800_HBM_GBPS * 4.8 / 3.35

HARDWARE: dict[str, Hardware] = {
    "h800-ib400-multinode": Hardware(
        name="h800-ib400-multinode", hbm_gbps=_H800_HBM_GBPS, **_HOPPER
    ),
    # DeepEP's EP-8 row is measured over RDMA; inside one NVLink node it is an upper bound.
    "h200-nvlink-node": Hardware(
        name="h200-nvlink-node", hbm_gbps=_H200_HBM_GBPS, ar_gbps=87.7, **_HOPPER
    ),
    "h200-ib400-multinode": Hardware(
        name="h200-ib400-multinode", hbm_gbps=_H200_HBM_GBPS, **_HOPPER
    ),
}

MODELS: dict[str, MoeShape] = {
    # config.json of deepseek-ai/DeepSeek-V3: hidden 7168, moe_intermediate 2048, 8 of 256
    # routed experts, FP8 weights.
    "deepseek-v3": MoeShape("deepseek-v3", 7168, 2048, 8, 256, weight_bytes=1.0),
    # deepseek-ai/DeepSeek-V2-Lite: hidden 2048, moe_intermediate 1408, 6 of 64, BF16 (the
    # model of the bundled traces).
    "deepseek-v2-lite": MoeShape(
        "deepseek-v2-lite", 2048, 1408, 6, 64, weight_bytes=2.0, act_bytes=4.0
    ),
}


def get_hardware(name: str, **overrides: float) -> Hardware:
    """A preset, with some fields replaced (``ValueError`` naming an unknown one)."""
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware preset {name!r}; available: {', '.join(HARDWARE)}")
    known = {f.name for f in fields(Hardware)} - {"name", "a2a_ep", "dispatch_us", "combine_us"}
    for key in overrides:
        if key not in known:
            settable = ", ".join(sorted(known))
            raise ValueError(f"unknown hardware parameter {key!r}; settable: {settable}")
    return replace(HARDWARE[name], **overrides)


def get_model(name: str) -> MoeShape:
    if name not in MODELS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]


def _interp_ep(hw: Hardware, table: tuple[float, ...], ep: int) -> float:
    """Latency at ``ep`` ranks: the table's, linear in log2(EP) between rows, clamped."""
    xs = [math.log2(e) for e in hw.a2a_ep]
    x = math.log2(max(ep, 1))
    if x <= xs[0]:
        return table[0]
    if x >= xs[-1]:
        return table[-1]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return table[i - 1] + w * (table[i] - table[i - 1])
    return table[-1]  # pragma: no cover


def all_to_all_us(hw: Hardware, ep: int, tokens_per_gpu: float, hidden: int) -> float:
    """Dispatch + combine time of one layer left on the critical path, us (the same for
    every dispatch mode; ``a2a_hidden`` of it overlaps other work)."""
    if ep <= 1:
        return 0.0
    scale = max(tokens_per_gpu / hw.a2a_ref_tokens, 1.0) * hidden / hw.a2a_ref_hidden
    both = _interp_ep(hw, hw.dispatch_us, ep) + _interp_ep(hw, hw.combine_us, ep)
    return both * scale * (1.0 - hw.a2a_hidden)


def allreduce_us(hw: Hardware, nbytes: float, ranks: int, nodes: int) -> float:
    """NCCL all-reduce of ``nbytes`` over ``ranks`` GPUs on ``nodes`` nodes, us.

    NCCL's tuning model (``src/graph/tuning.cc``), LL protocol: tree latency
    ``base + 2 ((ranks/nodes - 1) nvlink_hop + log2(nodes) net_hop)``; ring latency
    ``base + (2 (ranks - 1) - n_inter) intra + n_inter net_hop`` with ``n_inter = 2 nodes``
    across nodes; the faster of the two, plus ``nbytes / bandwidth``.
    """
    if ranks <= 1:
        return 0.0
    nodes = max(1, min(nodes, ranks))
    per_node = ranks / nodes
    tree = hw.ar_base_us + 2 * (
        (per_node - 1) * hw.ar_nvlink_hop_us + math.log2(nodes) * hw.ar_net_tree_hop_us
    )
    steps = 2 * (ranks - 1)
    inter = 2 * nodes if nodes > 1 else 0
    intra = max(hw.ar_nvlink_hop_us, hw.ar_net_overhead_us) if nodes > 1 else hw.ar_nvlink_hop_us
    ring = hw.ar_ring_base_us + (steps - inter) * intra + inter * hw.ar_net_ring_hop_us
    return min(tree, ring) + nbytes / (hw.ar_gbps * 1e3)


# device kernels of one ``waterfill_shares`` call: fixed part and per sweep (torch profiler,
# top-level ops that launch a kernel; views and reshapes excluded): 36 per plain sweep, and
# the momentum step (kernels.waterfill.MOMENTUM) adds 11 (the profiler's leaf aten ops with
# and without it: 39 -> 50 per sweep, counted the same way)
WATERFILL_KERNELS_FIXED = 30
WATERFILL_KERNELS_PER_SWEEP = 36 + 11


WATERFILL_IMPLS = ("torch", "fused")


def waterfill_impl(hw: Hardware) -> str:
    """``"torch"`` or ``"fused"``: the water-fill implementation ``hw`` models."""
    return WATERFILL_IMPLS[int(hw.fused_waterfill)]


def waterfill_us(hw: Hardware, iters: int, impl: str | None = None) -> float:
    """Device time of one water-fill of ``iters`` sweeps per layer, us.

    ``impl``: ``"torch"`` (the torch ops: kernel count x ``kernel_us``), ``"fused"`` (one
    Triton launch: ``kernel_us + (iters + 1) x fused_sweep_us``) or None (the one ``hw``
    selects). ``hw.waterfill_us``, when set, replaces the selected implementation's figure.
    """
    selected = waterfill_impl(hw)
    impl = selected if impl is None else impl
    if impl not in WATERFILL_IMPLS:
        raise ValueError(
            f"water-fill implementation must be one of {WATERFILL_IMPLS}, got {impl!r}"
        )
    if impl == selected and hw.waterfill_us >= 0:
        return hw.waterfill_us
    if impl == "fused":
        return hw.kernel_us + (iters + 1) * hw.fused_sweep_us
    return (WATERFILL_KERNELS_FIXED + WATERFILL_KERNELS_PER_SWEEP * iters) * hw.kernel_us


def mode_overhead_us(
    hw: Hardware, model: MoeShape, dispatch: str, ranks: int, nodes: int, iters: int = 8
) -> float:
    """What the dispatch mode itself adds to a layer, us (``iters``: water-fill sweeps)."""
    if check_dispatch(dispatch) == "static":
        return 0.0
    cost = waterfill_us(hw, iters)
    if dispatch == "global":
        # one row of E counts and the seed per rank (eplb_plugin.routing.Router)
        cost += allreduce_us(hw, 4.0 * ranks * (model.num_experts + 1), ranks, nodes)
    elif dispatch == "node":
        # the same table over one node's ranks: NVLink hops only
        per_node = -(-ranks // nodes)
        cost += allreduce_us(hw, 4.0 * per_node * (model.num_experts + 1), per_node, 1)
    return cost


def expert_us(
    hw: Hardware, model: MoeShape, gpu_tokens: torch.Tensor, gpu_active: torch.Tensor
) -> torch.Tensor:
    """Expert GEMM time of each GPU (roofline of compute and memory reads).

    Args:
        gpu_tokens: [..., G] float routed tokens (token-expert pairs) per GPU.
        gpu_active: [..., G] float slots per GPU that received at least one token.
    Returns:
        [..., G] float64 microseconds.
    """
    tokens = gpu_tokens.double()
    compute = tokens * model.flops_per_token / (hw.gemm_tflops * 1e6)
    nbytes = gpu_active.double() * model.expert_bytes + tokens * model.hidden * model.act_bytes
    memory = nbytes / (hw.hbm_gbps * 1e3)
    return torch.maximum(compute, memory)


def layer_us(
    hw: Hardware,
    model: MoeShape,
    slot_load: torch.Tensor,
    slots_per_gpu: int,
    dispatch: str,
    nodes: int,
    tokens_per_gpu: float,
    iters: int = 8,
) -> torch.Tensor:
    """Modelled time of each MoE layer in one step.

    Args:
        slot_load: [L, P] float tokens each slot receives (``slot_loads``).
        slots_per_gpu: P / G.
        dispatch: the mode serving the step.
        nodes: nodes the G GPUs span.
        tokens_per_gpu: tokens each GPU routes this step (before top-k), for the all-to-all.
        iters: water-fill sweeps of ``local``/``node``/``global``.
    Returns:
        [L] float64 microseconds.
    """
    num_gpus = slot_load.shape[-1] // slots_per_gpu
    per_gpu = slot_load.double().unflatten(-1, (num_gpus, slots_per_gpu))
    # apportionment rounds to whole tokens: a slot with under half a token gets none
    active = (per_gpu >= 0.5).double().sum(-1)
    experts = expert_us(hw, model, per_gpu.sum(-1), active).amax(-1)
    fixed = all_to_all_us(hw, num_gpus, tokens_per_gpu, model.hidden)
    return experts + fixed + mode_overhead_us(hw, model, dispatch, num_gpus, nodes, iters)


def balanced_layer_us(
    hw: Hardware,
    model: MoeShape,
    ep: int,
    nodes: int,
    tokens_per_gpu: float,
    slots_per_gpu: int,
    balancedness: float,
    dispatch: str,
    iters: int = 8,
) -> float:
    """Layer time when the busiest GPU carries ``1 / balancedness`` of the mean load and every
    slot is active: the closed form behind ``eplb simulate --recommend``'s table."""
    if not 0 < balancedness <= 1:
        raise ValueError(f"balancedness must lie in (0, 1], got {balancedness!r}")
    peak = torch.tensor([tokens_per_gpu * model.top_k / balancedness])
    active = torch.tensor([float(slots_per_gpu)])
    experts = float(expert_us(hw, model, peak, active)[0])
    return (
        experts
        + all_to_all_us(hw, ep, tokens_per_gpu, model.hidden)
        + mode_overhead_us(hw, model, dispatch, ep, nodes, iters)
    )
