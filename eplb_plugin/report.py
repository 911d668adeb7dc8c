"""Figures of an EP run with and without EPLB, and the PNG report of ``eplb demo``.

The figures are pure functions of the per-step loads the reference engine records
(``gpu_loads`` [steps, L, G], ``expert_loads`` [steps, L, E]); matplotlib is imported only
by :func:`write_report_png` (extra ``plot``).
"""

from __future__ import annotations

import torch

from .fileio import atomic_write
from .layout import balancedness_of


def balancedness_per_step(gpu_loads: torch.Tensor) -> list[float]:
    """gpu_loads [steps, L, G] -> per step, mean over layers of mean/max GPU load."""
    return [balancedness_of(gpu_loads[s]) for s in range(gpu_loads.shape[0])]


def load_figures(gpu_loads: torch.Tensor, start: int = 0) -> dict:
    """Balance figures over steps ``start..`` of one run.

    Args:
        gpu_loads: [steps, L, G] float (token, expert) entries served per GPU.
        start: first step measured.
    Returns:
        ``balancedness``: mean over steps of the per-step balancedness;
        ``max_over_mean``: mean over steps and layers of max/mean GPU load;
        ``gpu_share``: [G] each GPU's share of the mean load, all measured steps and layers
        (a long-run figure: rebalancing moves the hot spot, so these even out either way);
        ``busiest_share``: [G] the k-th busiest GPU's load / mean GPU load, GPUs sorted per
        step and layer, averaged over them: entry 0 equals ``max_over_mean``, and this is the
        profile the step time follows (the busiest GPU sets the pace);
        ``steps``: steps measured.
    """
    loads = gpu_loads[start:].to(torch.float64)
    if loads.shape[0] == 0:
        raise ValueError(f"start={start} leaves no step of {gpu_loads.shape[0]} to measure")
    mean = loads.mean(-1)
    ratio = torch.where(mean > 0, loads.amax(-1) / mean.clamp(min=1e-300), torch.ones_like(mean))
    total = loads.sum((0, 1))
    ranked = loads.sort(-1, descending=True).values
    busiest = torch.where(
        mean[..., None] > 0, ranked / mean[..., None].clamp(min=1e-300), torch.ones_like(ranked)
    )
    return {
        "balancedness": sum(balancedness_per_step(loads)) / loads.shape[0],
        "max_over_mean": float(ratio.mean()),
        "gpu_share": (total / total.mean().clamp(min=1e-300)).tolist(),
        "busiest_share": busiest.mean((0, 1)).tolist(),
        "steps": int(loads.shape[0]),
    }


def write_report_png(
    path: str,
    expert_loads: torch.Tensor,
    gpu_before: list[float],
    gpu_after: list[float],
    balancedness_off: list[float],
    balancedness_on: list[float],
    rebalance_steps: list[int],
    title: str,
) -> str:
    """Write the demo's report: expert-load heat map per layer, GPU loads, balance over steps.

    Args:
        path: output .png file (written to a temp file, then renamed).
        expert_loads: [L, E] tokens per logical expert over the run (the same in both runs).
        gpu_before, gpu_after: [G] ``busiest_share`` of :func:`load_figures` without / with
            EPLB (k-th busiest GPU's load / mean, per step and layer, averaged).
        balancedness_off, balancedness_on: per-step balancedness of each run.
        rebalance_steps: first step served by each completed rebalance.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not path.endswith(".png"):
        raise ValueError(f"report path {path!r} must end with .png")
    fig = plt.figure(figsize=(13, 8.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.1, 1])
    fig.suptitle(title)

    heat = fig.add_subplot(grid[0, :])
    loads = expert_loads.to(torch.float64)
    share = loads / loads.mean(1, keepdim=True).clamp(min=1e-300)
    image = heat.imshow(share.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    heat.set_title("expert load per MoE layer over the run (tokens / layer mean)")
    heat.set_xlabel("logical expert")
    heat.set_ylabel("MoE layer")
    heat.set_yticks(range(loads.shape[0]))
    fig.colorbar(image, ax=heat, fraction=0.025, pad=0.01)

    bars = fig.add_subplot(grid[1, 0])
    gpus = torch.arange(len(gpu_before)).numpy()
    width = 0.4
    bars.bar(gpus - width / 2, gpu_before, width, label="EPLB off", color="#c44e52")
    bars.bar(gpus + width / 2, gpu_after, width, label="EPLB on (after rebalance)", color="#4c72b0")
    bars.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    bars.set_xticks(gpus, [str(g + 1) for g in gpus])
    bars.set_xlabel("GPUs ranked by load in each step and layer (1 = busiest)")
    bars.set_ylabel("load / mean GPU load")
    bars.set_title("GPU loads, busiest first (bar 1 = max / mean of the table)")
    bars.set_ylim(0, max(1.35, max(gpu_before + gpu_after) * 1.2))
    bars.legend(loc="upper center", ncol=2)

    line = fig.add_subplot(grid[1, 1])
    line.plot(range(len(balancedness_off)), balancedness_off, label="EPLB off", color="#c44e52")
    line.plot(range(len(balancedness_on)), balancedness_on, label="EPLB on", color="#4c72b0")
    shown = [s for s in rebalance_steps if s < len(balancedness_on)]
    for i, step in enumerate(shown):
        line.axvline(step, color="gray", linestyle=":", label="rebalance" if i == 0 else None)
    line.set_ylim(0, 1.05)
    line.set_xlabel("engine step")
    line.set_ylabel("balancedness (mean / max GPU load)")
    line.set_title("balancedness over steps")
    line.legend(loc="lower right")

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
