"""Reference expert-parallel engine: N processes, data-parallel attention, sharded experts.

Each rank (one process; gloo on CPU, NCCL on GPU) loads the checkpoint, keeps its share of
the sequences (data-parallel attention: sequence ``s`` lives on rank ``s % N``) and its
physical expert slots (:func:`~.patch.apply_eplb`), and decodes greedily with a KV cache.
An ``eplb export`` folder is loaded rank by rank instead: each rank reads the shared files
and its own expert files only, and the export's layout is the initial layout
(:mod:`.loading`).
Every forward sends tokens to the ranks holding their slots and back; after every forward
the Balancer steps (records counts, plans, moves weights between ranks in place).

Several runs (e.g. EPLB off, then on) share one launch: each starts from a fresh copy of the
loaded model. Rank 0 gathers tokens, logits (optional), per-step loads and the Balancer's
reports and writes them to a result file that :func:`run_engine` returns as ``RunResult``s.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import queue as queue_mod
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from eplb_plugin.config import EplbConfig
from eplb_plugin.layout import ExpertLayout


@dataclass
class RunSpec:
    """One decode run inside a launch.

    Attributes:
        name: label of the run (e.g. ``"eplb-off"``).
        eplb: the EplbConfig of the run.
        record_logits: return the last-position logits of every step ([B, steps, V]).
        fail_rebalance_at: make the last rank fail while packing the first rebalance
            chunk at or after this engine step (tests: every rank must abandon the chunk,
            keep its old layout for it and keep serving correctly).
        layout: initial layout (default: identity); its topology fixes the slots.
    """

    name: str
    eplb: EplbConfig
    record_logits: bool = False
    fail_rebalance_at: int | None = None
    layout: ExpertLayout | None = None


@dataclass
class EngineSpec:
    """A launch of the reference engine.

    Attributes:
        model_path: local checkpoint folder of a supported family, or an ``eplb export``
            folder of one (``ranks`` must then equal its ``ep_size``; every run starts from
            the export's layout and, with EPLB on, needs ``num_redundant_experts``,
            ``num_nodes`` and ``num_groups`` matching it).
        ranks: EP ranks (processes).
        prompts: [B, T0] int64 prompt token ids (equal lengths; B >= ranks).
        steps: forwards per run (the prefill and steps - 1 decode steps): tokens generated.
        runs: runs to execute, in order.
        trace_path: routing trace (.npz) replacing the routers' choices, or None.
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, one GPU per rank).
        threads: torch intra-op threads per rank.
        timeout_s: wall-clock limit of the whole launch.
        comm: token exchange backend (``"auto"``, ``"torch"``, ``"deepep"``).
        kernels: ``EPLB_KERNELS`` for the ranks (``"torch"`` or ``"triton"``; None: inherit).
    """

    model_path: str
    ranks: int
    prompts: torch.Tensor
    steps: int
    runs: list[RunSpec]
    trace_path: str | None = None
    device: str = "cpu"
    threads: int = 1
    timeout_s: float = 600.0
    comm: str = "auto"
    kernels: str | None = None


@dataclass
class RunResult:
    """What one run produced (gathered on rank 0).

    Attributes:
        tokens: [B, steps] int64 greedy tokens, in prompt order.
        logits: [B, steps, V] float32 or None.
        gpu_loads: [steps, L, G] float64 (token, expert) entries each GPU served per layer.
        expert_loads: [steps, L, E] float64 entries per logical expert.
        reports: rank 0's Balancer StepReports as dicts.
        stats: Balancer totals summed over ranks (``longest_pause_s``: max over ranks).
        layouts: phy2log [L, P] in force at each step, [steps, L, P] int64.
        wall_s: seconds of the decode loop on rank 0.
        files_read: per rank, the weight files (base names) it opened, in order; None
            unless the launch loaded an export.
    """

    name: str
    tokens: torch.Tensor
    logits: torch.Tensor | None
    gpu_loads: torch.Tensor
    expert_loads: torch.Tensor
    reports: list[dict]
    stats: dict
    layouts: torch.Tensor
    wall_s: float
    files_read: list[list[str]] | None = None


# ---------------------------------------------------------------------- decode loop
def greedy_decode(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    steps: int,
    seq_ids: torch.Tensor | None = None,
    routing=None,
    after_forward=None,
    record_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy decoding with a KV cache.

    Args:
        prompts: [B, T0] int64 token ids.
        steps: forwards (first one is the prefill): tokens generated per sequence.
        seq_ids: [B] int64 global sequence ids (trace routing follows them).
        routing: a TraceRouting or None.
        after_forward: called with the step index after every forward (Balancer step).
    Returns:
        tokens [B, steps] int64, logits [B, steps, V] float32 or None.
    """
    import transformers

    if seq_ids is None:
        seq_ids = torch.arange(prompts.shape[0])
    cache = transformers.DynamicCache(config=model.config)
    cache_kw = cache_keyword(model)
    ids, position = prompts, 0
    tokens, logits = [], []
    with torch.no_grad():
        for step in range(steps):
            if routing is not None:
                routing.set_batch(seq_ids, position, ids.shape[1])
            out = model(input_ids=ids, use_cache=True, **{cache_kw: cache})
            last = out.logits[:, -1, :].float()
            nxt = last.argmax(-1)
            tokens.append(nxt)
            if record_logits:
                logits.append(last)
            position += ids.shape[1]
            ids = nxt[:, None]
            if after_forward is not None:
                after_forward(step)
    toks = torch.stack(tokens, 1) if tokens else prompts.new_zeros(prompts.shape[0], 0)
    return toks, (torch.stack(logits, 1) if record_logits else None)


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` where transformers has it (5.2x; the old
    ``past_key_values`` warns there and goes away in 5.40), else ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def load_rank_model(path: str, rank: int, device: str = "cpu") -> torch.nn.Module:
    """What EP rank ``rank`` serves from ``path``: an export's rank shard (its own expert
    files only, :func:`~.loading.load_export_model`) or the whole checkpoint."""
    from .loading import is_export, load_export_model

    if is_export(path):
        return load_export_model(path, rank, device)
    return load_model(path, device)


def load_model(path: str, device: str = "cpu") -> torch.nn.Module:
    """A local checkpoint as a float32 causal LM in eval mode."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval()


def attach_routing(trace_path: str | None, model: torch.nn.Module):
    """Make ``model``'s routers follow the trace at ``trace_path``; returns the TraceRouting.

    None (the model routes by itself) when ``trace_path`` is None. Works on a plain model
    and on one patched by ``apply_eplb`` alike (the routers are not replaced).
    """
    if trace_path is None:
        return None
    from .models import family_of, moe_layers
    from .routing import TraceRouting

    family = family_of(model.config)
    routing = TraceRouting.from_file(
        trace_path, family.num_experts(model.config), family.top_k(model.config)
    )
    routers = [getattr(block, family.router) for _, block in moe_layers(model, family)]
    routing.install(routers, family.router_indices)
    return routing


# ---------------------------------------------------------------------- validation
def validate_spec(spec: EngineSpec) -> None:
    """Every check that can fail before a process starts (ValueError naming the input)."""
    from .loading import check_checkpoint
    from .patch import ep_topology

    if isinstance(spec.ranks, bool) or not isinstance(spec.ranks, int) or spec.ranks < 1:
        raise ValueError(f"ranks={spec.ranks!r} must be a positive integer")
    if isinstance(spec.steps, bool) or not isinstance(spec.steps, int) or spec.steps < 1:
        raise ValueError(f"steps={spec.steps!r} must be a positive integer")
    prompts = spec.prompts
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.shape[1] < 1:
        shape = tuple(prompts.shape) if isinstance(prompts, torch.Tensor) else type(prompts)
        raise ValueError(f"prompts must be a [sequences, length] tensor, got {shape}")
    if prompts.shape[0] < spec.ranks:
        raise ValueError(
            f"{prompts.shape[0]} prompts cannot fill ranks={spec.ranks}: every rank needs one"
        )
    if spec.device not in ("cpu", "cuda"):
        raise ValueError(f"device={spec.device!r} must be 'cpu' or 'cuda'")
    if spec.device == "cuda" and torch.cuda.device_count() < spec.ranks:
        raise ValueError(
            f"ranks={spec.ranks} needs {spec.ranks} GPUs, found {torch.cuda.device_count()}"
        )
    if not spec.runs:
        raise ValueError("runs is empty: nothing to do")
    if spec.kernels not in (None, "torch", "triton"):
        raise ValueError(f"kernels={spec.kernels!r} must be None, 'torch' or 'triton'")
    from .loading import check_export, is_export

    export_layout = None
    if is_export(spec.model_path):
        family, config, export = check_export(spec.model_path, spec.ranks)
        export_layout = export.moe_layout()
    else:
        family, config = check_checkpoint(spec.model_path)
    vocab = int(config.vocab_size)
    if int(prompts.min()) < 0 or int(prompts.max()) >= vocab:
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    num_experts = family.num_experts(config)
    for run in spec.runs:
        if not isinstance(run.eplb, EplbConfig):
            raise ValueError(f"run {run.name!r}: eplb must be an EplbConfig")
        if export_layout is not None:
            check_export_run(run, export_layout, spec.model_path)
            continue
        if run.layout is None:
            ep_topology(run.eplb, num_experts, spec.ranks)
            continue
        if run.layout.topology.num_gpus != spec.ranks or run.layout.num_experts != num_experts:
            raise ValueError(
                f"run {run.name!r}: layout for {run.layout.topology.num_gpus} ranks x "
                f"{run.layout.num_experts} experts does not fit ranks={spec.ranks} x "
                f"{num_experts} experts"
            )
    if spec.trace_path is not None:
        from .routing import TraceRouting

        TraceRouting.from_file(spec.trace_path, num_experts, family.top_k(config))


def check_export_run(run: RunSpec, layout: ExpertLayout, path: str) -> None:
    """A run on an export starts from the export's layout; with EPLB on, the Balancer's
    slot count and topology must be the export's."""
    if run.layout is not None and not run.layout.equals(layout):
        raise ValueError(
            f"run {run.name!r}: a layout other than export {path!r}'s own cannot be served "
            "from it (each rank holds only the export's slots); leave RunSpec.layout None"
        )
    if not run.eplb.enable:
        return
    topology = layout.topology
    redundant = layout.num_slots - layout.num_experts
    given = (run.eplb.num_redundant_experts, run.eplb.num_nodes, run.eplb.num_groups)
    if given != (redundant, topology.num_nodes, topology.num_groups):
        raise ValueError(
            f"run {run.name!r}: num_redundant_experts={given[0]}, num_nodes={given[1]}, "
            f"num_groups={given[2]} disagree with export {path!r} ({layout.num_slots} slots "
            f"for {layout.num_experts} experts: {redundant} redundant, "
            f"{topology.num_nodes} node(s), {topology.num_groups} group(s))"
        )


# ---------------------------------------------------------------------- worker
def _worker(rank: int, spec: EngineSpec, work: str, events) -> None:
    import torch.distributed as dist

    # Ctrl-C reaches every process of the terminal's group; the parent alone handles it and
    # stops the ranks (each rank would otherwise print its own KeyboardInterrupt traceback)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if spec.kernels is not None:
            os.environ["EPLB_KERNELS"] = spec.kernels  # read by the kernel ops at call time
        torch.set_num_threads(spec.threads)
        backend = "nccl" if spec.device == "cuda" else "gloo"
        device = f"cuda:{rank}" if spec.device == "cuda" else "cpu"
        if spec.device == "cuda":
            torch.cuda.set_device(rank)
        import datetime

        dist.init_process_group(
            backend, init_method=f"file://{os.path.join(work, 'store')}", rank=rank,
            world_size=spec.ranks, timeout=datetime.timedelta(seconds=spec.timeout_s),
        )  # fmt: skip
        base = load_rank_model(spec.model_path, rank, device)
        results = []
        for index, run in enumerate(spec.runs):
            results.append(_run_one(rank, spec, run, index, copy.deepcopy(base), events))
        if rank == 0:
            path = os.path.join(work, "result.pt")
            torch.save(results, path + ".tmp")
            os.replace(path + ".tmp", path)
        dist.barrier()
        dist.destroy_process_group()
        events.put(("done", rank, None))
    except BaseException:  # report, then exit non-zero: the parent stops the others
        events.put(("error", rank, traceback.format_exc()))
        raise


def _run_one(rank, spec: EngineSpec, run: RunSpec, index: int, model, events) -> RunResult | None:
    import torch.distributed as dist

    from .patch import apply_eplb

    world = spec.ranks
    clock = [0]  # engine step being finished, read by the fault hook
    fault = _injected_fault(run.fail_rebalance_at, rank == world - 1, clock)
    options = {"fault": fault} if fault is not None else None
    handle = apply_eplb(
        model, run.eplb, layout=run.layout, comm=spec.comm, balancer_options=options
    )
    routing = attach_routing(spec.trace_path, model)
    seq_ids = torch.arange(rank, spec.prompts.shape[0], world)
    prompts = spec.prompts[seq_ids].to(handle.counts.device)
    gpu_loads, expert_loads, layouts, reports = [], [], [], []

    def after_forward(step: int) -> None:
        counts = handle.counts.to(torch.float64).clone()
        dist.all_reduce(counts)
        phy2log = handle.maps.phy2log.clone()
        layouts.append(phy2log.cpu())
        num_layers, num_slots = counts.shape
        gpu_loads.append(counts.view(num_layers, world, -1).sum(-1).cpu())
        logical = torch.zeros(num_layers, handle.layout.num_experts, dtype=torch.float64)
        expert_loads.append(logical.scatter_add_(1, phy2log.cpu(), counts.cpu()))
        clock[0] = step
        report = handle.step()
        if report is not None:
            reports.append(_as_dict(report))
        if rank == 0:
            events.put(("step", index, step + 1))

    start = time.perf_counter()
    tokens, logits = greedy_decode(
        model, prompts, spec.steps, seq_ids, routing, after_forward, run.record_logits
    )
    wall = time.perf_counter() - start
    stats = _as_dict(handle.balancer.stats) if handle.balancer is not None else {}
    handle.close()
    gathered = [None] * world
    shard = getattr(model, "eplb_export", None)
    files = None if shard is None else shard.files_read
    dist.all_gather_object(gathered, (seq_ids, tokens.cpu(), _cpu(logits), stats, files))
    if rank != 0:
        return None
    num_seqs = spec.prompts.shape[0]
    all_tokens = torch.empty(num_seqs, spec.steps, dtype=torch.int64)
    all_logits = None
    if run.record_logits:
        all_logits = torch.empty(num_seqs, spec.steps, gathered[0][2].shape[-1])
    for ids, toks, lgts, *_ in gathered:
        all_tokens[ids] = toks
        if all_logits is not None:
            all_logits[ids] = lgts
    return RunResult(
        name=run.name, tokens=all_tokens, logits=all_logits,
        gpu_loads=torch.stack(gpu_loads), expert_loads=torch.stack(expert_loads),
        reports=reports, stats=_merge_stats([g[3] for g in gathered]),
        layouts=torch.stack(layouts), wall_s=wall,
        files_read=None if gathered[0][4] is None else [g[4] for g in gathered],
    )  # fmt: skip


def _injected_fault(at_step: int | None, on_this_rank: bool, clock: list[int]):
    """Balancer fault hook raising once, at the first ``pack`` at or after ``at_step``."""
    if at_step is None or not on_this_rank:
        return None
    fired = []

    def fault(point: str, index: int) -> None:
        if point == "pack" and not fired and clock[0] >= at_step:
            fired.append(index)
            raise RuntimeError(f"injected rebalance failure (layer {index})")

    return fault


def _cpu(t):
    return None if t is None else t.cpu()


def _as_dict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)


def _merge_stats(per_rank: list[dict]) -> dict:
    if not per_rank or not per_rank[0]:
        return {}
    merged = dict(per_rank[0])
    for key in ("slots_moved", "bytes_moved"):
        if key in merged:
            merged[key] = sum(int(s.get(key, 0)) for s in per_rank)
    if "longest_pause_s" in merged:
        merged["longest_pause_s"] = max(float(s.get("longest_pause_s", 0.0)) for s in per_rank)
    return merged


# ---------------------------------------------------------------------- launcher
def run_engine(spec: EngineSpec, progress: bool = True) -> list[RunResult]:
    """Validate ``spec``, launch ``spec.ranks`` processes, return one RunResult per run.

    Raises ValueError on bad input (before any process starts) and RuntimeError when a rank
    fails or the launch exceeds ``spec.timeout_s`` (all ranks are then stopped).
    """
    import multiprocessing as mp

    from tqdm import tqdm

    validate_spec(spec)
    ctx = _context(mp)
    with tempfile.TemporaryDirectory(prefix="eplb-engine-") as work:
        events = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(r, spec, work, events), daemon=True)
            for r in range(spec.ranks)
        ]
        total = spec.steps * len(spec.runs)
        # disable=None: a bar only on a terminal, never redraws into a pipe or log file
        bar = tqdm(
            total=total, disable=None if progress else True, desc="decode", unit="step", leave=False
        )
        bar.set_postfix_str(f"starting {spec.ranks} ranks")
        deadline = time.monotonic() + spec.timeout_s
        done: set[int] = set()
        try:
            with _ctrl_c_deferred(), _no_cwd_on_child_path():
                for p in procs:
                    p.start()
            while len(done) < spec.ranks:
                try:
                    kind, who, payload = events.get(timeout=0.5)
                except queue_mod.Empty:
                    _check_alive(procs, done, deadline, spec.timeout_s)
                    continue
                if kind == "error":
                    raise RuntimeError(f"engine rank {who} failed:\n{payload}")
                if kind == "done":
                    done.add(who)
                elif kind == "step":
                    run_index, step = who, payload
                    bar.n = run_index * spec.steps + step
                    bar.set_postfix_str(spec.runs[run_index].name)
                    bar.refresh()
        finally:
            bar.close()
            started = [p for p in procs if p.pid is not None]
            for p in started:
                if p.is_alive():
                    p.terminate()
            for p in started:
                p.join(timeout=10)
            events.close()
        return torch.load(os.path.join(work, "result.pt"), weights_only=False)


@contextlib.contextmanager
def _no_cwd_on_child_path():
    """Start processes with ``PYTHONSAFEPATH=1`` (Python 3.11+) in their environment.

    The fork server starts as ``python -c ...``, which puts the working directory first on
    its sys.path (3.11 does not apply the parent's sys.path there), and imports the
    ``_PRELOAD`` modules with it. Run from a source checkout of this project, our
    ``kernels/`` folder would then answer to ``import kernels``, the Hugging Face package
    transformers (>= 5.25) imports when it is installed. The safe path leaves the working
    directory out; the ranks get their sys.path from the parent as usual.
    """
    previous = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONSAFEPATH", None)
        else:
            os.environ["PYTHONSAFEPATH"] = previous


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Hold a Ctrl-C until the block ends, then raise KeyboardInterrupt.

    Around the rank starts: a start interrupted after the fork but before the pid came back
    leaves a rank the parent has no handle on, which then runs on alone.
    """
    if threading.current_thread() is not threading.main_thread() or not callable(
        signal.getsignal(signal.SIGINT)
    ):  # a handler that is not Python's (or SIGINT ignored): leave it alone
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


# Imported once by the fork server instead of once per rank: transformers' modeling code
# takes seconds to import, which N ranks on 2 cores would otherwise pay N times over.
_PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.deepseek_v3.modeling_deepseek_v3",
    "transformers.models.mixtral.modeling_mixtral",
    "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "transformers.models.qwen3_moe.modeling_qwen3_moe",
    "eplb_plugin.integrations.transformers.engine",
    "eplb_plugin.integrations.transformers.loading",
]


def _context(mp):
    """Fork server with the heavy imports preloaded where available, else spawn.

    Plain fork is avoided: the parent may already run OpenMP threads (it built the model).
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _check_alive(procs, done: set[int], deadline: float, timeout_s: float) -> None:
    for rank, p in enumerate(procs):
        if rank not in done and p.exitcode not in (None, 0):
            raise RuntimeError(f"engine rank {rank} exited with code {p.exitcode}")
    if time.monotonic() > deadline:
        raise RuntimeError(f"engine launch exceeded timeout_s={timeout_s}")
