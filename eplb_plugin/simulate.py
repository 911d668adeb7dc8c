"""Replay simulator: what a policy and a dispatch mode realize on a real, shifting load.

The trace is a sequence of steps of per-rank counts ``[S, R, L, E]`` (see
:func:`eplb_plugin.traces.steps_from_routing_trace`). Every ``interval`` steps a new layout
is planned from the ``window`` steps before it (as an engine re-plans from its recorder);
each step is served by the layout then in service and the chosen dispatch mode, and scored
by its realized balancedness: the mean over layers of mean GPU load / max GPU load.

Two references frame every result (``compare``):

- the vLLM/SGLang **baseline**: DeepSeek's policy on the window sum, static uniform split;
- an **oracle**: DeepSeek's policy planned on each step's own counts (knows the future).

``gap_closed = (b - baseline) / (oracle - baseline)`` says how much of the loss to shifting
loads a configuration wins back.

With a :class:`CostSpec` every served step is also timed by the step-time model
(:mod:`eplb_plugin.costmodel`): the mean over layers of the modelled MoE-layer time, from the
step's slot loads, the dispatch mode's collectives and the shared all-to-all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .config import MAX_WATERFILL_ITERS
from .costmodel import Hardware, MoeShape, layer_us
from .dispatch import WATERFILL_ITERS, check_dispatch, gpu_loads_of, slot_loads, token_loads
from .layout import ExpertLayout, Topology
from .names import DSV2_LITE_EXPERT_BYTES as DSV2_LITE_EXPERT_BYTES
from .names import MEMORY_WINDOWS, ROUNDINGS
from .plan_memory import PlanMemory
from .policies import dispatch_option, get_policy, plan
from .predictor import PREDICTORS as PREDICTORS  # re-exported for the CLI
from .predictor import check_predictor, predict_from_history
from .recorder import PLAN_STEPS
from .shift import FOLLOW_UP_RUNS, SHIFT_THRESHOLD, ShiftDetector, cut_runs


@dataclass(frozen=True)
class CostSpec:
    """What the step-time model needs besides the slot loads.

    Attributes:
        hardware: GPU and interconnect figures.
        model: the MoE layer's shape (its ``top_k`` turns counted token-expert pairs back
            into tokens per GPU for the all-to-all).
        nodes: nodes the EP ranks span (the all-reduce's inter-node hops).
    """

    hardware: Hardware
    model: MoeShape
    nodes: int = 1


def step_layer_us(
    cost: CostSpec, layout: ExpertLayout, loads: torch.Tensor, dispatch: str, iters: int = 8
) -> float:
    """Mean over layers of the modelled MoE-layer time of one step, us.

    Args:
        loads: [L, P] float64 tokens per slot of the step.
    """
    t = layout.topology
    tokens_per_gpu = float(loads.sum(-1).mean()) / (cost.model.top_k * t.num_gpus)
    per_layer = layer_us(
        cost.hardware, cost.model, loads, t.slots_per_gpu, dispatch, cost.nodes,
        tokens_per_gpu, iters,
    )  # fmt: skip
    return float(per_layer.mean())


@dataclass
class SimConfig:
    """How the replay re-plans and serves.

    Attributes:
        policy: registered policy name.
        dispatch: ``static``, ``local``, ``node`` or ``global``.
        interval: steps between re-plans (N).
        window: past steps each plan sees (W).
        predictor: ``window`` (the window's sum) or ``ema`` (exponential moving average of
            all past steps, ``ema_decay`` per step, scaled to a window's worth of steps).
        ema_decay: weight kept per step by the ``ema`` predictor, in (0, 1).
        migrate: pass the layout in service as ``previous=`` (migration-aware planning).
        bytes_per_slot: bytes of one expert's weights, to report bytes moved.
        policy_options: extra keyword options for the policy.
        waterfill_iters: water-fill sweeps of ``local``/``global`` dispatch.
        rounding: ``fractional`` (:func:`~eplb_plugin.dispatch.slot_loads`: each rank's
            tokens split in fractions) or ``tokens`` (:func:`~eplb_plugin.dispatch.token_loads`:
            the whole tokens the device op gives each slot, rank by rank, with the dither
            seeds the engines use).
        shift_threshold: re-plan at once when a run of steps departs from the plan's
            forecast this many times as far as a run of that load would (:mod:`eplb_plugin.shift`,
            as the Balancer does; window predictor only); 0: only every ``interval`` steps.
        memory_windows: windows a plan sees, its own and the earlier plans' back to the
            last detected shift (:mod:`eplb_plugin.plan_memory`, as the Balancer does;
            window predictor only); 1: its own window only.
    """

    policy: str = "default"
    dispatch: str = "static"
    interval: int = 4
    window: int = 4
    predictor: str = "window"
    ema_decay: float = 0.8
    migrate: bool = False
    bytes_per_slot: int = DSV2_LITE_EXPERT_BYTES
    policy_options: dict = field(default_factory=dict)
    waterfill_iters: int = WATERFILL_ITERS
    rounding: str = "fractional"
    shift_threshold: float = SHIFT_THRESHOLD
    memory_windows: int = MEMORY_WINDOWS

    def __post_init__(self) -> None:
        get_policy(self.policy)
        check_dispatch(self.dispatch)
        if self.rounding not in ROUNDINGS:
            raise ValueError(
                f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}"
            )
        for name in ("interval", "window", "waterfill_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.waterfill_iters > MAX_WATERFILL_ITERS:  # the device op's (EplbConfig's) bound
            raise ValueError(
                f"waterfill_iters must be <= {MAX_WATERFILL_ITERS}, got {self.waterfill_iters}"
            )
        check_predictor(self.predictor, self.ema_decay)
        ShiftDetector(self.shift_threshold)  # validates it
        PlanMemory(self.memory_windows)  # validates it, with EplbConfig's bound
        if isinstance(self.bytes_per_slot, bool) or not isinstance(self.bytes_per_slot, int):
            raise ValueError(f"bytes_per_slot must be an integer, got {self.bytes_per_slot!r}")
        if self.bytes_per_slot < 0:
            raise ValueError(f"bytes_per_slot must be >= 0, got {self.bytes_per_slot}")

    @property
    def label(self) -> str:
        return f"{self.policy}/{self.dispatch}" + ("+migrate" if self.migrate else "")


@dataclass
class ReplayResult:
    """What one configuration realized.

    Attributes:
        label: ``policy/dispatch``.
        steps: indices of the scored steps.
        balancedness: [scored steps] float64 realized balancedness per step.
        slots_moved: slots whose expert changed at each rebalance after the first.
        plan_ms: wall time of each plan, milliseconds.
        shift_steps: steps at which a plan was made on a detected shift (those plans are
            in ``plan_ms`` too).
        layer_us: [scored steps] float64 modelled MoE-layer time per step (mean over
            layers), or None without a cost model.
    """

    label: str
    steps: list[int]
    balancedness: torch.Tensor
    slots_moved: list[int]
    plan_ms: list[float]
    num_slots: int = 0
    bytes_per_slot: int = 0
    layer_us: torch.Tensor | None = None
    shift_steps: list[int] = field(default_factory=list)

    @property
    def shift_plans(self) -> int:
        return len(self.shift_steps)

    @property
    def mean(self) -> float:
        return float(self.balancedness.mean()) if self.balancedness.numel() else math.nan

    @property
    def mean_layer_us(self) -> float:
        if self.layer_us is None or not self.layer_us.numel():
            return math.nan
        return float(self.layer_us.mean())

    def summary(self) -> dict:
        moved = self.slots_moved
        mean_moved = sum(moved) / len(moved) if moved else 0.0
        times = sorted(self.plan_ms)
        return {
            "label": self.label,
            "balancedness": self.mean,
            "rebalances": len(self.plan_ms),
            "shift_rebalances": self.shift_plans,
            "shift_steps": list(self.shift_steps),
            "slots_moved_per_rebalance": mean_moved,
            "slots_moved_fraction": mean_moved / self.num_slots if self.num_slots else 0.0,
            "max_slots_moved_fraction": max(moved) / self.num_slots if moved else 0.0,
            "bytes_moved_per_rebalance": mean_moved * self.bytes_per_slot,
            "plan_ms_median": times[len(times) // 2] if times else 0.0,
            "plan_ms_mean": sum(times) / len(times) if times else 0.0,
            "layer_us": None if self.layer_us is None else self.mean_layer_us,
        }


def step_balancedness(gpu_loads: torch.Tensor) -> torch.Tensor:
    """[..., L, G] GPU loads -> [...] mean over layers of mean/max (idle layers count 1)."""
    loads = gpu_loads.to(torch.float64)
    peak = loads.amax(-1)
    ratio = torch.where(peak > 0, loads.mean(-1) / peak.clamp(min=1e-300), torch.ones_like(peak))
    return ratio.mean(-1)


def served_loads(
    layout: ExpertLayout, rank_counts: torch.Tensor, dispatch: str, step: int, config: SimConfig
) -> torch.Tensor:
    """[L, P] float64 tokens per slot of one served step, counted as ``config.rounding`` says.

    Args:
        rank_counts: [R, L, E] the step's per-rank counts.
        step: the step's index (``tokens`` rounding: the dither seeds of
            ``routing.dither_seed(0, step, rank, R)``, as the engines pass them).
    """
    if config.rounding == "fractional":
        return slot_loads(layout, rank_counts, dispatch, config.waterfill_iters)
    from .routing import dither_seed

    ranks = rank_counts.shape[0]
    seeds = [dither_seed(0, step, rank, ranks) for rank in range(ranks)]
    return token_loads(layout, rank_counts, dispatch, seeds, config.waterfill_iters)


def first_scored_step(config: SimConfig) -> int:
    """Steps before this one only fill the first window; scoring starts here."""
    return config.window


def predict(history: torch.Tensor, config: SimConfig) -> torch.Tensor:
    """The load a plan is made from.

    Args:
        history: [s, L, E] all-rank counts of the steps so far (s >= 1).
    Returns:
        ``window``: [W', L, E] float32, the last W steps (``plan`` sums them, and policies
        that model the step-to-step variation use them one by one);
        ``ema``: [L, E] float32, the exponential moving average of all steps so far
        (``ema_decay`` per step), scaled to W steps: the runtime's EMA
        (:mod:`eplb_plugin.predictor`).
    """
    return predict_from_history(history, config.predictor, config.window, config.ema_decay)


def replay(
    rank_counts: torch.Tensor,
    topology: Topology,
    config: SimConfig,
    progress: Callable[[int], None] | None = None,
    cost: CostSpec | None = None,
) -> ReplayResult:
    """Replay one configuration.

    Args:
        rank_counts: [S, R, L, E] per-step, per-rank logical counts.
        topology: the deployment.
        config: policy, dispatch mode, cadence.
        progress: called with 1 after each simulated step.
        cost: time each step with the step-time model, if given.
    """
    totals = rank_counts.sum(1)  # [S, L, E]
    start = first_scored_step(config)
    layout: ExpertLayout | None = None
    scores, moved, times, step_us = [], [], [], []
    # the Balancer's cadence: every `interval` steps, and at once on a detected shift
    detector = ShiftDetector(config.shift_threshold if config.predictor == "window" else 0)
    planned_at, due, shift_at, shifts = start, config.interval, 0, []
    memory = PlanMemory(config.memory_windows if config.predictor == "window" else 1)
    for step in range(start, rank_counts.shape[0]):
        since = step - planned_at
        shifted, run = False, detector.run_steps
        if layout is not None and since < due and detector.ready and since % run == 0:
            if detector.shifted(totals[step - run : step].sum(0)):
                shifted, shift_at = True, step - run
                shifts.append(step)
                memory.forget_before(shift_at)
        if layout is None or since >= due or shifted:
            # a plan never looks back past a detected shift
            load = predict(totals[shift_at:step], config)
            if load.dim() == 3:  # as the Balancer hands it over: at most PLAN_STEPS runs
                window, run_steps = cut_runs(load, PLAN_STEPS)
                load, forecast = memory.extend(window, step - load.shape[0], load.shape[0])
            previous = layout if config.migrate else None
            tic = time.perf_counter()
            options = {
                **dispatch_option(config.policy, config.dispatch),
                **config.policy_options,
            }
            new = plan(load, topology, config.policy, previous=previous, **options)
            times.append((time.perf_counter() - tic) * 1e3)
            if layout is not None:
                moved.append(int(new.diff(layout).sum()))
            if detector.enabled and load.dim() == 3:
                detector.calibrate(forecast, run_steps, window)
            layout, planned_at = new, step
            due = FOLLOW_UP_RUNS * run if shifted else config.interval
        loads = served_loads(layout, rank_counts[step], config.dispatch, step, config)
        scores.append(float(step_balancedness(gpu_loads_of(layout, loads))))
        if cost is not None:
            step_us.append(
                step_layer_us(cost, layout, loads, config.dispatch, config.waterfill_iters)
            )
        if progress is not None:
            progress(1)
    return ReplayResult(
        config.label, list(range(start, rank_counts.shape[0])),
        torch.tensor(scores, dtype=torch.float64), moved, times,
        rank_counts.shape[2] * topology.num_replicas, config.bytes_per_slot,
        _times(step_us, cost), shifts,
    )  # fmt: skip


def _times(step_us: list[float], cost: CostSpec | None) -> torch.Tensor | None:
    return None if cost is None else torch.tensor(step_us, dtype=torch.float64)


def oracle(
    rank_counts: torch.Tensor,
    topology: Topology,
    config: SimConfig,
    progress: Callable[[int], None] | None = None,
    cost: CostSpec | None = None,
) -> ReplayResult:
    """DeepSeek's policy planned on each scored step's own counts, static uniform split
    (rounded to whole tokens per rank as the other configurations, ``config.rounding``)."""
    totals = rank_counts.sum(1)
    start = first_scored_step(config)
    scores, times, step_us = [], [], []
    for step in range(start, rank_counts.shape[0]):
        tic = time.perf_counter()
        layout = plan(totals[step], topology, "deepseek")
        times.append((time.perf_counter() - tic) * 1e3)
        loads = served_loads(layout, rank_counts[step], "static", step, config)
        scores.append(float(step_balancedness(gpu_loads_of(layout, loads))))
        if cost is not None:
            step_us.append(step_layer_us(cost, layout, loads, "static"))
        if progress is not None:
            progress(1)
    return ReplayResult(
        "oracle (deepseek on each step's own counts)", list(range(start, rank_counts.shape[0])),
        torch.tensor(scores, dtype=torch.float64), [], times,
        rank_counts.shape[2] * topology.num_replicas, config.bytes_per_slot,
        _times(step_us, cost),
    )  # fmt: skip


def baseline_config(config: SimConfig) -> SimConfig:
    """vLLM/SGLang: DeepSeek's policy on the window sum, static uniform split."""
    return SimConfig(
        policy="deepseek", dispatch="static", interval=config.interval, window=config.window,
        predictor="window", bytes_per_slot=config.bytes_per_slot, rounding=config.rounding,
        shift_threshold=0.0, memory_windows=1,
    )  # fmt: skip


def gap_closed(value: float, baseline: float, best: float) -> float:
    """Share of the baseline-to-oracle gap that ``value`` closes (nan if there is no gap)."""
    gap = best - baseline
    return (value - baseline) / gap if gap > 1e-12 else math.nan


def compare(
    rank_counts: torch.Tensor,
    topology: Topology,
    configs: Iterable[SimConfig],
    progress: Callable[[int], None] | None = None,
    cost: CostSpec | None = None,
) -> dict:
    """Baseline, oracle and each configuration on the same steps.

    Returns:
        ``{"baseline": ReplayResult, "oracle": ReplayResult, "results": [ReplayResult],
        "gap_closed": [float], "speedup": [float] | None}`` (per configuration: the share of
        the gap closed, and with ``cost`` the modelled throughput against the baseline,
        baseline MoE-layer time / the configuration's).
    """
    configs = list(configs)
    if not configs:
        raise ValueError("compare needs at least one configuration")
    base = replay(rank_counts, topology, baseline_config(configs[0]), progress, cost)
    base.label = "baseline (deepseek/static, window sum)"
    best = oracle(rank_counts, topology, configs[0], progress, cost)
    results = [replay(rank_counts, topology, c, progress, cost) for c in configs]
    return {
        "baseline": base,
        "oracle": best,
        "results": results,
        "gap_closed": [gap_closed(r.mean, base.mean, best.mean) for r in results],
        "speedup": None
        if cost is None
        else [base.mean_layer_us / r.mean_layer_us for r in results],
    }


def num_scored_steps(num_steps: int, config: SimConfig) -> int:
    return max(num_steps - first_scored_step(config), 0)


# ------------------------------------------------------------------------- recommendation
RECOMMEND_MODES = ("static", "local", "node", "global")


def synthetic_rank_counts(
    num_steps: int,
    num_ranks: int,
    num_layers: int,
    model: MoeShape,
    tokens_per_rank: float,
    *,
    skew: float = 0.6,
    drift: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Per-rank counts of a drifting synthetic load, for deployments without a trace.

    Per layer each expert has a persistent log-popularity ``N(0, skew^2)`` plus a drift term
    that moves by ``N(0, drift^2)`` per step (a random walk pulled back towards 0 by 10% per
    step, so the spread stays bounded); each rank routes ``tokens_per_rank * top_k`` pairs,
    Poisson per expert around the step's popularity (the noise of a finite batch).

    Returns:
        [num_steps, num_ranks, num_layers, num_experts] float64 counts.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (num_layers, model.num_experts)
    base = torch.randn(shape, generator=gen, dtype=torch.float64) * skew
    walk = torch.zeros(shape, dtype=torch.float64)
    out = torch.empty(num_steps, num_ranks, *shape, dtype=torch.float64)
    pairs = tokens_per_rank * model.top_k
    for step in range(num_steps):
        walk = 0.9 * walk + torch.randn(shape, generator=gen, dtype=torch.float64) * drift
        popularity = torch.softmax(base + walk, -1)
        # an expert takes at most one of a token's top-k choices
        mean = (pairs * popularity).clamp(max=tokens_per_rank)
        out[step] = torch.poisson(mean.expand(num_ranks, *shape).contiguous(), generator=gen)
    return out


def recommend(
    cost: CostSpec,
    topology: Topology,
    tokens_grid: Iterable[int],
    *,
    num_layers: int = 4,
    steps: int = 12,
    config: SimConfig | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Modelled MoE-layer time of each dispatch mode over a range of batch sizes.

    For every tokens-per-GPU value a synthetic drifting load (:func:`synthetic_rank_counts`)
    is replayed through the baseline (DeepSeek, static split) and the default policy with
    each dispatch mode, and every served step is timed by the step-time model.

    Returns:
        One row per batch size: ``{"tokens_per_gpu", "baseline_us", "<mode>_us",
        "<mode>_balancedness", "baseline_balancedness", "best", "speedup"}`` where ``best``
        is the fastest mode and ``speedup`` its throughput against the baseline.
    """
    config = config or SimConfig()
    rows = []
    for tokens in tokens_grid:
        counts = synthetic_rank_counts(
            steps, topology.num_gpus, num_layers, cost.model, tokens, seed=seed
        )
        row: dict = {"tokens_per_gpu": tokens}
        base = replay(counts, topology, baseline_config(config), progress, cost)
        row["baseline_us"] = base.mean_layer_us
        row["baseline_balancedness"] = base.mean
        for mode in RECOMMEND_MODES:
            options = dict(config.policy_options)
            sim = SimConfig(
                policy="default", dispatch=mode, interval=config.interval,
                window=config.window, policy_options=options,
                waterfill_iters=config.waterfill_iters, shift_threshold=config.shift_threshold,
                memory_windows=config.memory_windows,
            )  # fmt: skip
            result = replay(counts, topology, sim, progress, cost)
            row[f"{mode}_us"] = result.mean_layer_us
            row[f"{mode}_balancedness"] = result.mean
        best = min(RECOMMEND_MODES, key=lambda m: row[f"{m}_us"])
        row["best"] = best
        row["speedup"] = row["baseline_us"] / row[f"{best}_us"]
        rows.append(row)
    return rows


def crossovers(rows: list[dict]) -> list[tuple[int, int, str, str]]:
    """``(tokens_below, tokens_above, best_below, best_above)`` where the best mode changes."""
    return [
        (a["tokens_per_gpu"], b["tokens_per_gpu"], a["best"], b["best"])
        for a, b in zip(rows, rows[1:])
        if a["best"] != b["best"]
    ]
