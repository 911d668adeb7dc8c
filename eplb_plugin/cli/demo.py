"""``eplb demo``: the whole plugin end to end on a local MoE model, on CPU ranks.

With no arguments: a tiny DeepSeek-V3-architecture model with random weights is built
locally, sharded over 4 gloo ranks (data-parallel attention, expert parallelism), and decoded
greedily twice from the same prompts, with routing replayed from a real routing trace: once
with EPLB off (the logical experts as they are) and once with EPLB on (redundant slots,
counts recorded, rebalances between steps, weights moved in place). It prints a before/after
table, checks that both runs generated the same tokens and writes a PNG report.

``--model`` may name an ``eplb export`` folder: each rank then loads the shared tensors and
its own expert files only, and both runs start from the export's pre-balanced layout (the
first run keeps it, the second rebalances from it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import tempfile
import time

from ..config import EplbConfig
from .common import add_eplb_options, eplb_config_from_args, format_table
from .plan import check_out_folder

# The demo's EPLB settings: a real engine re-plans every few thousand steps; the demo runs
# tens of steps, so it records a short window and re-plans often. Any --eplb-* option given
# on the command line overrides these.
# Dispatch "global" splits each replicated expert's tokens by the step's real load (one
# all-reduce of [E] counts per layer): decode batches are small, so per-step noise is as large
# as the imbalance a placement alone can remove.
DEMO_EPLB = dict(
    enable=True, num_redundant_experts=16, window=12, interval=12, plan_delay=1, plan_wait_s=60.0,
    layers_per_step=1, min_gain=0.005, dispatch="global",
)  # fmt: skip

ROUTINGS = ("trace", "skewed", "model")


def bundled_trace() -> pathlib.Path:
    """``examples/traces/esft_intent.npz`` (real DeepSeek-V2-Lite routing): inside the installed
    package (a wheel ships examples/ as ``eplb_plugin/examples``), else in the source tree."""
    package = pathlib.Path(__file__).resolve().parents[1]
    for root in (package / "examples", package.parent / "examples"):
        path = root / "traces" / "esft_intent.npz"
        if path.is_file():
            return path
    return package / "examples" / "traces" / "esft_intent.npz"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run EPLB end to end on a local MoE model over CPU ranks",
        description="Shard a MoE model's experts over N local ranks, decode with EPLB off "
        "and on, check the tokens are identical, print a before/after table and write a "
        "PNG report. Without --model a tiny DeepSeek-V3-architecture model with random "
        "weights is built locally (no download). EPLB is always on in the second run "
        "(--enable-eplb is implied); the --eplb-* options configure it.",
    )
    p.add_argument("--model", help="local checkpoint folder (DeepseekV3, Mixtral, Qwen2-MoE, "
                   "Qwen3-MoE) or `eplb export` folder of one; default: a tiny random "
                   "DeepSeek-V3 model")  # fmt: skip
    p.add_argument("--ranks", type=int, default=None,
                   help="EP ranks (processes; default 4, or an export's ep_size)")  # fmt: skip
    p.add_argument("--steps", type=int, default=40, help="tokens generated per sequence")
    p.add_argument("--prompts", type=int, default=128, help="sequences (default 128)")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default 8)")
    p.add_argument(
        "--routing", choices=ROUTINGS, default=None,
        help="'trace': replay --trace (default for the built-in model when the bundled trace "
        "is present, else 'skewed'); 'skewed': a synthetic Zipf trace; 'model': the model's "
        "own router (default with --model)",
    )  # fmt: skip
    p.add_argument("--trace", help="routing trace .npz (topk_ids [T, L, K], seq_offsets); "
                   "default: the bundled examples/traces/esft_intent.npz")  # fmt: skip
    p.add_argument("--report", default="eplb-demo-report.png", help="PNG report path")
    p.add_argument("--no-report", action="store_true", help="do not write the PNG report")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo ranks; cuda: NCCL, one GPU per rank")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the tiny model's weights, the prompts and a synthetic "
                   "routing trace (EPLB's own seed, of the dispatch dither, is the 'seed' "
                   "key of --eplb-config)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_eplb_options(p, DEMO_EPLB, enable_option=False)
    p.set_defaults(func=run)


def demo_config(args: argparse.Namespace, export=None) -> EplbConfig:
    """The EPLB-on run's config: the demo's defaults (an export's slot count and topology
    where ``export`` is given), then every EPLB setting given (--eplb-*, --eplb-config)."""
    values = dict(DEMO_EPLB)
    if export is not None:
        topology = export.layout.topology
        values.update(
            num_redundant_experts=export.num_slots - export.num_experts,
            num_nodes=topology.num_nodes, num_groups=topology.num_groups,
        )  # fmt: skip
    config, _ = eplb_config_from_args("eplb demo", args, values)
    return config


def check_demo_config(config: EplbConfig) -> None:
    """What EplbConfig allows but the demo's engine cannot honour, refused before it starts."""
    from ..policies import MAX_SLOTS_PER_LAYER

    if config.initial_layout:
        # the transformers engine shards from the checkpoint or export it loads
        raise ValueError(
            "initial_layout: the demo does not read it; give an `eplb export` folder as "
            "--model to start from its layout"
        )
    if config.num_redundant_experts > MAX_SLOTS_PER_LAYER:
        # every rank would allocate its share of the slots before the first plan refuses
        raise ValueError(
            f"num_redundant_experts={config.num_redundant_experts}: the balancer plans at most "
            f"{MAX_SLOTS_PER_LAYER} slots per layer"
        )


def _open_export(model: str | None):
    """The export at ``--model`` (index and layout only), or None for a checkpoint."""
    from eplb_plugin.integrations.transformers.loading import is_export

    if model is None or not os.path.isdir(model) or not is_export(model):
        return None
    from ..export import open_export

    return open_export(model)


def _check_args(args: argparse.Namespace, export=None) -> None:
    if args.ranks is None:
        args.ranks = export.ep_size if export is not None else 4
    for name in ("ranks", "steps", "prompts", "prompt_len"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be positive")
    if args.prompts < args.ranks:
        raise ValueError(f"--prompts={args.prompts} must be >= --ranks={args.ranks}")
    if not args.no_report:
        if not args.report.endswith(".png"):
            raise ValueError(f"--report {args.report!r} must end with .png")
        # before the engines start: a missing folder would otherwise show after the whole run
        check_out_folder(args.report, "--report")
    if not 0 < args.timeout < math.inf:  # nan fails too
        raise ValueError(f"--timeout={args.timeout} must be a positive number of seconds")
    if args.model is not None and not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a folder")
    if not args.no_report:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "the PNG report needs matplotlib (pip install 'eplb-plugin[plot]'); "
                "or pass --no-report"
            )


def run(args: argparse.Namespace) -> int:
    import torch  # here, not at module level: `eplb demo --help` does not import torch

    from eplb_plugin.integrations.transformers.engine import (
        EngineSpec,
        RunSpec,
        run_engine,
        validate_spec,
    )
    from eplb_plugin.integrations.transformers.loading import check_checkpoint
    from eplb_plugin.integrations.transformers.models import require_transformers

    require_transformers()
    export = _open_export(args.model)
    _check_args(args, export)
    on = demo_config(args, export)
    check_demo_config(on)
    off = EplbConfig(**{**on.to_dict(), "enable": False})
    routing = args.routing or _default_routing(args)
    if args.trace is not None and routing != "trace":
        raise ValueError(f"--trace is only used with --routing trace, not {routing!r}")
    say = (lambda *a, **k: None) if args.json else print
    if routing == "skewed" and args.routing is None:
        say(
            f"the bundled trace {bundled_trace()} is not installed: replaying a synthetic "
            "skewed trace instead"
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eplb-demo-") as work:
        model_path = args.model or _build_tiny(work, args.seed, say)
        family, config = check_checkpoint(model_path)
        trace_path = _trace_for(routing, args.trace, work, family, config, args.seed)
        vocab = int(config.vocab_size)
        gen = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=gen)
        spec = EngineSpec(
            model_path=model_path, ranks=args.ranks, prompts=prompts, steps=args.steps,
            runs=[RunSpec("EPLB off", off), RunSpec("EPLB on", on)], trace_path=trace_path,
            device=args.device, timeout_s=args.timeout,
            kernels=os.environ.get("EPLB_KERNELS") or None,
        )  # fmt: skip
        validate_spec(spec)
        say(
            f"{family.name}: {family.num_experts(config)} experts, top-{family.top_k(config)}, "
            f"on {args.ranks} {args.device} ranks; {args.prompts} sequences x {args.steps} "
            f"tokens; routing: {routing}"
            + (f" ({os.path.basename(trace_path)})" if trace_path else "")
        )
        if export is not None:
            say(
                f"loading export: {export.num_slots} slots over ep_size={export.ep_size} "
                f"({export.slots_per_rank} per rank); each rank reads the shared files and "
                f"its own expert files; both runs start from the export's layout"
            )
        say(
            f"EPLB on: {on.num_redundant_experts} redundant slots, dispatch {on.dispatch}, "
            f"window {on.window}, re-plan every {on.interval} steps, policy {on.policy}"
        )
        result_off, result_on = run_engine(spec, progress=not args.json)
    summary = summarize(result_off, result_on, on, args)
    summary.update(model=args.model or "tiny DeepSeek-V3 (random weights)", family=family.name,
                   routing=routing, wall_s=time.perf_counter() - start)  # fmt: skip
    if export is not None:
        summary["export"] = {
            "ep_size": export.ep_size, "num_slots": export.num_slots,
            "files_read": result_on.files_read,
        }  # fmt: skip
    if not args.no_report:
        _write_report(args.report, result_off, result_on, summary)
        summary["report"] = args.report
    summary["wall_s"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0 if summary["tokens_identical"] else 1


def _default_routing(args: argparse.Namespace) -> str:
    """'model' with --model; else the bundled trace, or a synthetic one where it is absent
    (an install without the source tree's examples/)."""
    if args.model is not None:
        return "model"
    return "trace" if args.trace is not None or bundled_trace().is_file() else "skewed"


def _build_tiny(work: str, seed: int, say) -> str:
    from eplb_plugin.integrations.transformers.tiny import DEMO_CONFIG, save_tiny_model

    say("building a tiny DeepSeek-V3-architecture model with random weights (no download)")
    return save_tiny_model("deepseek_v3", os.path.join(work, "model"), seed=seed, **DEMO_CONFIG)


def _trace_for(routing, trace, work, family, config, seed) -> str | None:
    if routing == "model":
        return None
    if routing == "trace":
        path = trace or str(bundled_trace())
        if not os.path.isfile(path):
            raise ValueError(f"routing trace {path!r} not found (give --trace or --routing skewed)")
        return path
    import numpy as np

    from eplb_plugin.integrations.transformers.routing import synthetic_trace

    num_layers = sum(family.is_moe_layer(config, i) for i in range(config.num_hidden_layers))
    ids, offsets = synthetic_trace(
        64, 256, num_layers, family.num_experts(config), family.top_k(config), seed=seed
    )
    path = os.path.join(work, "skewed.npz")
    np.savez(path, topk_ids=ids, seq_offsets=offsets)
    return path


# ---------------------------------------------------------------------- figures
def first_commit_step(reports: list[dict]) -> int | None:
    """Engine step from which the first completed rebalance is in force (None: never)."""
    for report in reports:
        if report.get("event") == "done":
            return int(report["step"])
    return None


def summarize(result_off, result_on, config: EplbConfig, args) -> dict:
    import torch

    from ..report import load_figures

    start = first_commit_step(result_on.reports)
    after = start if start is not None and start < result_on.gpu_loads.shape[0] else 0
    stats = result_on.stats
    return {
        "ranks": args.ranks,
        "steps": args.steps,
        "sequences": args.prompts,
        "eplb": config.to_dict(),
        "tokens_identical": bool(torch.equal(result_off.tokens, result_on.tokens)),
        "tokens_compared": int(result_off.tokens.numel()),
        "measured_from_step": after,
        "off": load_figures(result_off.gpu_loads, after),
        "on": load_figures(result_on.gpu_loads, after),
        "rebalances": int(stats.get("rebalances", 0)),
        "failures": int(stats.get("failures", 0)),
        "slots_moved": int(stats.get("slots_moved", 0)),
        "bytes_moved": int(stats.get("bytes_moved", 0)),
        "longest_pause_s": float(stats.get("longest_pause_s", 0.0)),
        "decode_s": {"off": result_off.wall_s, "on": result_on.wall_s},
    }


def print_summary(s: dict) -> None:
    off, on = s["off"], s["on"]
    rows = [
        ["balancedness (mean/max GPU load)", off["balancedness"], on["balancedness"]],
        ["max / mean GPU load", off["max_over_mean"], on["max_over_mean"]],
        ["rebalances", 0, s["rebalances"]],
        ["slots moved", 0, s["slots_moved"]],
        ["bytes moved", 0, _bytes(s["bytes_moved"])],
        ["longest pause", "-", f"{s['longest_pause_s'] * 1e3:.1f} ms"],
        ["decode wall time", f"{s['decode_s']['off']:.1f} s", f"{s['decode_s']['on']:.1f} s"],
    ]
    print()
    print(f"measured over engine steps {s['measured_from_step']}..{s['steps'] - 1} "
          f"(from the first completed rebalance on)")  # fmt: skip
    # from an export, the first run serves the export's offline layout as it is
    first = "export layout" if s.get("export") else "EPLB off"
    print(format_table(["", first, "EPLB on"], rows))
    print("\nGPU load / mean GPU load, GPUs ranked by load in each step and layer:")
    ranked = zip(off["busiest_share"], on["busiest_share"])
    gpu_rows = [[k + 1, a, b] for k, (a, b) in enumerate(ranked)]
    print(format_table(["k-th busiest", first, "EPLB on"], gpu_rows))
    verdict = "identical" if s["tokens_identical"] else "DIFFERENT"
    print(f"\ngenerated tokens with EPLB on vs off: {verdict} "
          f"({s['sequences']} sequences x {s['steps']} tokens)")  # fmt: skip
    if s.get("failures"):
        print(f"rebalance chunks abandoned: {s['failures']}")
    for rank, files in enumerate((s.get("export") or {}).get("files_read") or []):
        print(f"rank {rank} read: {', '.join(files)}")
    if "report" in s:
        print(f"report written to {s['report']}")
    print(f"total wall time {s['wall_s']:.1f} s")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _write_report(path, result_off, result_on, summary) -> None:
    from ..report import balancedness_per_step, write_report_png

    done = [int(r["step"]) for r in result_on.reports if r.get("event") == "done"]
    write_report_png(
        path,
        result_off.expert_loads.sum(0),
        summary["off"]["busiest_share"],
        summary["on"]["busiest_share"],
        balancedness_per_step(result_off.gpu_loads),
        balancedness_per_step(result_on.gpu_loads),
        done,
        f"eplb demo: {summary['model']} on {summary['ranks']} ranks, routing {summary['routing']}",
    )
