"""GPU validation kit: check and measure the device path of eplb-plugin on one GPU.

    python3 benchmarks/gpu_check.py --out DIR            # on a CUDA machine (about 4-8 min)
    python3 benchmarks/gpu_check.py --out DIR --cpu-smoke  # CPU, TRITON_INTERPRET=1, seconds

Writes ``DIR/results.json`` (every check, its status, error and figures; schema in
docs/benchmarks/gpu.md), ``DIR/summary.md`` (the same as tables), ``DIR/records.jsonl`` (raw
records as they came) and ``DIR/worker.log`` (the worker's output). Sections, in order:

1. ``env``: versions, the GPU, which kernel path runs (must be the compiled Triton one).
2. ``map_and_count``: every dispatch mode of the package through ``Balancer.route``, int32 and
   int64 ids, -1 entries, ``num_valid`` below the batch, decode and prefill batch sizes:
   compiled kernel == torch path, both against oracles written here (the contract of
   docs/dispatch.md in numpy for static dispatch; structure and ``slot_loads`` for every mode);
   the op called directly in place, on strided ids, with out-of-range ids.
3. ``weights``: ``shuffle_experts`` and ``pack_slots``/``unpack_slots`` bit exact for bf16,
   fp8 e4m3fn with block scales, odd shapes and addresses, slot-strided views; cycles,
   swaps, replication, holes, fan-out; three staging budgets; no byte outside the tensors
   written.
4. ``graphs``: a CUDA graph of a step routing every layer through ``Balancer.route``, a real
   commit by ``Balancer.step()`` (maps rewritten in place, weights shuffled), replay without
   re-capture: routing and counts follow the new maps, weights the new layout.
5. ``e2e``: ``eplb demo`` with one rank on the device, per dispatch mode: tokens identical
   with EPLB off and on.
6. ``speed_*`` (skipped with a note when the time budget runs short): ``map_and_count``
   latency per layer vs a ``log2phy`` gather + ``bincount`` (eager, and in CUDA graphs vs a
   gather + ``scatter_add_``); ``shuffle_experts`` / pack / unpack vs ``copy_`` of the same
   bytes and vs this run's copy bandwidth; the ``global`` all-reduce on a one-rank NCCL group;
   the water-fill of one layer, fused Triton kernel vs torch ops (DeepSeek-V3 shapes).

The checks run in a worker process (``gpu_check_worker.py``) that records each result as it
ends; if the worker dies, hangs or leaves the CUDA context broken, the section it was in is
recorded as failed and a fresh worker goes on with the next. This process never imports
torch. Exit code: 0 all checks passed, 1 a correctness/graph/end-to-end check failed, 3 only
a speed section failed, 2 bad usage (e.g. no GPU without ``--cpu-smoke``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "gpu_check_worker.py")
SCHEMA = "eplb-gpu-check/1"
SECTIONS = (
    "env",
    "map_and_count",
    "weights",
    "graphs",
    "e2e",
    "speed_bandwidth",
    "speed_map_and_count",
    "speed_global",
    "speed_waterfill",
)
SPEED_SECTIONS = ("speed_bandwidth", "speed_map_and_count", "speed_global", "speed_waterfill")
EXIT_UNHEALTHY = 3  # the worker's "CUDA context broken, start a fresh one"
EXIT_NO_DEVICE = 2  # the worker found no CUDA device
WRITE_EVERY_S = 15.0  # results.json and summary.md are rewritten this often during a run
STARTUP_GRACE_S = 180.0  # a worker's time to its first record (imports) before it is killed


class Interrupted(Exception):
    """SIGTERM (e.g. from ``timeout``): write what is there and stop."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="Check and measure eplb-plugin's device path on one GPU; writes "
        "results.json and summary.md to --out.",
    )
    p.add_argument("--out", required=True, help="folder for results.json, summary.md, logs")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run on CPU tensors under TRITON_INTERPRET=1 at tiny sizes (set here for the "
        "worker), with eager stand-ins for CUDA graphs and gloo for NCCL",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run; speed sections are skipped when it runs short "
        "(default 420 on a GPU, 240 for --cpu-smoke)",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of: {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=None,
        help="seconds without a new record before the worker is killed (default 300 on a "
        "GPU, 150 for --cpu-smoke)",
    )
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        p.error(f"--sections: unknown {unknown or '(empty)'}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in sections]  # always in the kit's order
    if args.budget is None:
        args.budget = 240.0 if args.cpu_smoke else 420.0
    if args.stall_timeout is None:
        args.stall_timeout = 150.0 if args.cpu_smoke else 300.0
    if args.budget <= 0 or args.stall_timeout <= 0:
        p.error("--budget and --stall-timeout must be positive")
    return args


def worker_env(smoke: bool) -> tuple[dict[str, str], list[str]]:
    """The worker's environment and notes on what was changed."""
    env = dict(os.environ)
    notes = []
    for name in ("EPLB_KERNELS",) + (() if smoke else ("TRITON_INTERPRET",)):
        if env.pop(name, None) is not None:
            notes.append(f"{name} was set in the environment and removed for the checks")
    if smoke:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env, notes


def read_records(path: str, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines of ``path`` from byte ``offset``; (records, new offset)."""
    if not os.path.exists(path):
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"event": "garbled", "line": line[:200].decode(errors="replace")})
    return records, offset + end


def log_tail(path: str, chars: int = 1500) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


class Run:
    """Runs the worker over the sections, respawning it after a crash, hang or broken
    CUDA context; collects the records."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = os.path.abspath(args.out)
        self.records_path = os.path.join(self.out, "records.jsonl")
        self.log_path = os.path.join(self.out, "worker.log")
        self.start = time.time()
        self.deadline = self.start + args.budget
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.environment: dict = {}
        self.fatal: str | None = None
        self.complete = False
        self.proc: subprocess.Popen | None = None
        self.offset = 0  # bytes of records.jsonl already taken

    def add(self, section: str, name: str, kind: str, status: str, error: str) -> None:
        print(f"{status.upper()} {name}: {_one_line(error, 200)}", flush=True)
        self.checks.append(
            {
                "section": section,
                "name": name,
                "kind": kind,
                "status": status,
                "error": error,
                "seconds": 0.0,
            }
        )

    def take(self, records: list[dict], started: list[str], ended: list[str]) -> None:
        for r in records:
            event = r.get("event")
            if event == "start":
                started.append(r["section"])
            elif event == "end":
                ended.append(r["section"])
                mine = [c["status"] for c in self.checks if c["section"] == r["section"]]
                tally = ", ".join(f"{mine.count(s)} {s}" for s in sorted(set(mine)))
                print(f"[{time.time() - self.start:5.0f} s] {r['section']}: {tally}", flush=True)
            elif event == "check":
                r = {k: v for k, v in r.items() if k != "event"}
                self.checks.append(r)
                if r["status"] == "failed":
                    print(f"FAILED {r['name']}: {_one_line(r.get('error'), 200)}", flush=True)
                if r["name"] == "environment":
                    self.environment = r.get("details") or {}
            elif event == "unhealthy":
                self.notes.append(
                    f"section {r.get('section')}: the CUDA context was broken after a failed "
                    f"check ({r.get('error', '')[:300]}); a fresh worker went on"
                )
            elif event == "fatal":
                self.fatal = r.get("error", "worker refused to start")

    def run(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        for path in (self.records_path, self.log_path):
            if os.path.exists(path):
                os.remove(path)
        env, self.notes = worker_env(self.args.cpu_smoke)
        remaining = list(self.args.sections)
        while remaining:
            hard = self.deadline + (30.0 if self.args.cpu_smoke else 90.0)
            cmd = [
                sys.executable,
                WORKER,
                "--records",
                self.records_path,
                "--sections",
                ",".join(remaining),
                "--deadline",
                str(self.deadline),
            ]
            if self.args.cpu_smoke:
                cmd.append("--cpu-smoke")
            with open(self.log_path, "a", encoding="utf-8") as log:
                # own session: a kill takes the worker's children (eplb demo's ranks) along
                self.proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,
                )
                started, ended = [], []
                killed = self.watch(hard, started, ended)
                rc = self.proc.wait()
                self.proc = None
            self.drain(started, ended)
            if self.fatal is not None:
                return
            if rc == 0 and not killed and set(remaining) <= set(ended):
                self.complete = True
                return
            current = [s for s in started if s not in ended]
            why = killed or f"exited with code {rc}"
            if rc == EXIT_UNHEALTHY:
                why = "exited after a CUDA error left the context unusable"
            if current:
                section = current[0]
                self.add(
                    section,
                    f"{section} (worker)",
                    "correctness",
                    "failed",
                    f"worker {why} during this section; its remaining checks did not run; "
                    f"log tail:\n{log_tail(self.log_path)}",
                )
                remaining = remaining[remaining.index(section) + 1 :]
            elif not started:
                for section in remaining:
                    self.add(
                        section,
                        f"{section} (worker)",
                        "correctness",
                        "failed",
                        f"worker {why} before starting; log tail:\n{log_tail(self.log_path)}",
                    )
                return
            else:
                remaining = [s for s in remaining if s not in ended]
            if killed and time.time() >= hard:
                for section in remaining:
                    self.add(
                        section,
                        section,
                        "speed" if section in SPEED_SECTIONS else "correctness",
                        "skipped",
                        "time budget spent",
                    )
                return
            self.write()  # partial results survive an outer timeout

    def drain(self, started: list[str], ended: list[str]) -> None:
        """Take the records the worker wrote since the last call."""
        records, self.offset = read_records(self.records_path, self.offset)
        self.take(records, started, ended)

    def watch(self, hard: float, started: list[str], ended: list[str]) -> str | None:
        """Wait for the worker, taking its records as they come and rewriting the results
        every ``WRITE_EVERY_S``; kill it when it stalls or runs past ``hard``; the reason."""
        written = time.time()

        def size() -> int:
            return os.path.getsize(self.records_path) if os.path.exists(self.records_path) else 0

        first = last_size = size()
        last_change = time.time()
        while self.proc.poll() is None:
            time.sleep(0.2)
            now = time.time()
            if size() != last_size:
                last_size, last_change = size(), now
                self.drain(started, ended)  # progress lines as checks end
            # until its first record the worker is importing torch: slow on a busy machine
            limit = self.args.stall_timeout if last_size != first else STARTUP_GRACE_S
            limit = max(limit, self.args.stall_timeout)
            if now - written > WRITE_EVERY_S:  # partial results survive a SIGKILL
                self.write()
                written = now
            reason = None
            if now - last_change > limit:
                reason = f"made no progress for {limit:.0f} s and was killed"
            elif now > hard:
                reason = "ran past the time budget and was killed"
            if reason:
                self.kill_worker()
                return reason
        return None

    def kill_worker(self) -> None:
        """SIGKILL the worker's process group (its demo subprocesses too)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (OSError, AttributeError):  # gone already, or no process groups here
            self.proc.kill()

    def stop_worker(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_worker()
            self.proc.wait()

    # ------------------------------------------------------------------ output
    def results(self) -> dict:
        counts: dict[str, int] = {}
        for c in self.checks:
            counts[c["status"]] = counts.get(c["status"], 0) + 1
        failed = [c for c in self.checks if c["status"] == "failed"]
        hard_fail = [c for c in failed if c.get("kind") != "speed"]
        if self.fatal is not None:
            code = 2
        elif hard_fail or not self.complete:
            code = 1
        else:
            code = 3 if failed else 0
        return {
            "schema": SCHEMA,
            "mode": "cpu-smoke" if self.args.cpu_smoke else "gpu",
            "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
            "started_utc": _utc(self.start),
            "finished_utc": _utc(time.time()),
            "wall_s": round(time.time() - self.start, 1),
            "budget_s": self.args.budget,
            "sections": self.args.sections,
            "complete": self.complete,
            "git": git_info(),
            "environment": self.environment,
            "counts": counts,
            "ok": not failed and self.fatal is None and self.complete,
            "exit_code": code,
            "fatal": self.fatal,
            "notes": self.notes,
            "checks": self.checks,
        }

    def write(self) -> dict:
        res = self.results()
        with open(os.path.join(self.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(self.out, "summary.md"), "w", encoding="utf-8") as f:
            f.write(summary_md(res))
        return res


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def git_info() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# ---------------------------------------------------------------------- summary.md
def _us(stat: dict | None) -> str:
    return "-" if not stat else f"{stat['median_s'] * 1e6:.1f}"


def _ms(stat: dict | None) -> str:
    return "-" if not stat else f"{stat['median_s'] * 1e3:.3f}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _one_line(text: str | None, limit: int = 300) -> str:
    text = (text or "").replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_md(res: dict) -> str:
    env = res["environment"]
    checks = res["checks"]
    smoke = res["mode"] == "cpu-smoke"
    failed = any(c["status"] == "failed" for c in checks)
    verdict = "FAILURES" if failed else "all checks passed"
    if not failed and not res["complete"]:
        verdict = "INCOMPLETE (no failure so far)"
    if res.get("fatal"):
        verdict = f"did not run: {res['fatal']}"
    lines = [f"# eplb-plugin GPU check: {verdict}", ""]
    device = env.get("gpu") or env.get("device", "?")
    lines.append(
        f"{res['finished_utc']} UTC, {device}"
        + (
            f" (sm {env['capability']}, {env.get('memory_gib')} GiB)"
            if env.get("capability")
            else ""
        )
        + f"; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}, Python {env.get('python')}; kernel path: "
        f"{env.get('backend')}; commit {(res['git'] or {}).get('commit')}"
        + (" (with local changes)" if (res["git"] or {}).get("dirty") else "")
    )
    lines += [
        "",
        f"Command: `{res['command']}` — {res['wall_s']} s of a {res['budget_s']:.0f} s "
        f"budget; mode {res['mode']}; exit code {res['exit_code']}.",
        "",
    ]
    if smoke:
        lines += [
            "CPU smoke run (Triton interpreter, tiny sizes, eager stand-ins for CUDA graphs, "
            "gloo for NCCL): the timings below only show the code runs; they measure "
            "nothing.",
            "",
        ]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(res["counts"].items()))
    lines += [f"Checks: {counts or 'none'}.", ""]
    for note in res["notes"]:
        lines.append(f"- note: {note}")
    if res["notes"]:
        lines.append("")

    bad = [c for c in checks if c["status"] == "failed"]
    if bad:
        lines += ["## Failures", ""]
        lines += _table(["check", "error"], [[c["name"], _one_line(c.get("error"))] for c in bad])

    lines += ["## Checks by section", ""]
    rows = []
    for section in res["sections"]:
        mine = [c for c in checks if c["section"] == section]
        by = {
            s: sum(1 for c in mine if c["status"] == s)
            for s in ("passed", "measured", "failed", "skipped")
        }
        rows.append([section] + [by[s] for s in by] + [f"{sum(c['seconds'] for c in mine):.1f}"])
    lines += _table(["section", "passed", "measured", "failed", "skipped", "seconds"], rows)

    lines += _speed_tables(checks)
    e2e = [c for c in checks if c["section"] == "e2e" and c["status"] == "passed"]
    if e2e:
        lines += ["## End to end (`eplb demo`, one rank)", ""]
        lines += _table(
            ["command", "dispatch", "tokens compared", "identical", "rebalances", "wall s"],
            [
                [
                    f"`{d['command']}`",
                    d["dispatch"],
                    d["tokens_compared"],
                    "yes",
                    d["rebalances"],
                    d["wall_s"],
                ]
                for d in (c["details"] for c in e2e)
            ],
        )
    skipped = [c for c in checks if c["status"] == "skipped"]
    if skipped:
        lines += ["## Skipped", ""]
        lines += _table(["check", "why"], [[c["name"], _one_line(c.get("error"))] for c in skipped])
    return "\n".join(lines)


def _speed_tables(checks: list[dict]) -> list[str]:
    lines: list[str] = []
    done = {c["name"]: c.get("details") or {} for c in checks if c["status"] == "measured"}
    bw = done.get("memory bandwidth (device-to-device copy)")
    maps = [(n, d) for n, d in done.items() if n.startswith("map_and_count latency/")]
    if maps:
        lines += [
            "## map_and_count latency per layer (µs, medians)",
            "",
            "Baselines: `log2phy[layer, ids, 0]` + `torch.bincount` (eager; bincount syncs "
            "on CUDA) and the same gather + `scatter_add_` into counts (in a CUDA graph).",
            "",
        ]
        rows = []
        for name, d in maps:
            mode = name.split("/")[1]
            rows.append(
                [
                    mode,
                    d["tokens"],
                    _us(d.get("op_eager")),
                    _us(d.get("gather_bincount_eager")),
                    _f(d.get("ratio_eager_vs_bincount")),
                    _us(d.get("op_graph")),
                    _us(d.get("gather_scatter_graph")),
                    _f(d.get("ratio_graph_vs_scatter")),
                ]
            )
        lines += _table(
            [
                "mode",
                "tokens",
                "op eager",
                "gather+bincount eager",
                "ratio",
                "op graph",
                "gather+scatter graph",
                "ratio",
            ],
            rows,
        )
    if bw:
        lines += [
            f"Device-to-device copy bandwidth (read + write): "
            f"{bw['bandwidth_GBps']:.0f} GB/s ({_size(bw['bytes'])} copied, "
            f"median of {bw['reps']}).",
            "",
        ]
    shuf = [(n, d) for n, d in done.items() if n.startswith("shuffle/")]
    if shuf:
        lines += [
            "## Weight moves vs `copy_` of the same bytes (ms, medians; goal: shuffle "
            "within 1.5x of the copy)",
            "",
        ]
        rows = []
        for name, d in shuf:
            case = name.split("/", 1)[1]
            for label in ("shuffle, staging 1 row/tensor", "shuffle, staging 8 rows/tensor"):
                t = d.get(label) or {}
                rows.append(
                    [
                        case,
                        label,
                        _size(d["bytes_written"]),
                        _ms(d.get("copy")),
                        _ms(t),
                        _f(t.get("ratio_to_copy")),
                        "yes" if t.get("goal_met") else "no",
                        _f(t.get("bandwidth_GBps"), "{:.0f}"),
                        _f(t.get("fraction_of_copy_bandwidth")),
                    ]
                )
            for label in ("pack_slots", "unpack_slots"):
                t = d.get(label) or {}
                rows.append(
                    [
                        case,
                        label,
                        _size(d["bytes_packed"]),
                        _ms(d.get("pack/unpack copy")),
                        _ms(t),
                        _f(t.get("ratio_to_copy")),
                        "-",
                        _f(t.get("bandwidth_GBps"), "{:.0f}"),
                        "-",
                    ]
                )
        lines += _table(
            ["case", "op", "bytes", "copy", "op", "ratio", "within 1.5x", "GB/s", "of copy GB/s"],
            rows,
        )
    g = done.get("global dispatch all-reduce")
    if g:
        lines += [
            "## `global` dispatch: the per-layer all-reduce (µs, medians)",
            "",
            f"One-rank {g['backend']} group on this device: a collective's launch and "
            "local copy, no link between GPUs. The communicator's all-reduce is the call "
            f"global routing makes per layer on several ranks ({g.get('communicator')}, "
            f"control group {g.get('communicator_backend')}); on one rank routing may "
            "skip it, so `route global - static` can be counting and water-filling "
            "alone.",
            "",
        ]
        extra = g.get("global_extra_per_layer_s")
        lines += _table(
            [
                f"{g['backend']} all_reduce [E]",
                "communicator all_reduce",
                "route static / layer",
                "route global / layer",
                "global - static",
            ],
            [
                [
                    _us(g.get("all_reduce")),
                    _us(g.get("communicator_all_reduce")),
                    _us(g.get("route_static_per_layer")),
                    _us(g.get("route_global_per_layer")),
                    "-" if extra is None else f"{extra * 1e6:.1f}",
                ]
            ],
        )
    lines += _waterfill_table(done)
    return lines


def _waterfill_table(done: dict[str, dict]) -> list[str]:
    fills = [d for n, d in done.items() if n.startswith("water-fill/")]
    if not fills:
        return []
    lines = [
        "## Water-fill of one layer: fused Triton kernel vs torch ops (µs, medians)",
        "",
        "What `local`/`global` dispatch add per layer; the figures to replace the estimates "
        "of eplb_plugin/costmodel.py's `waterfill_us` (torch ops and fused kernel) with.",
        "",
    ]
    rows = [
        [
            d["experts"], d["slots"], d["gpus"], d["sweeps"], d.get("max_replicas", "-"),
            _us(d.get("torch_eager")), _us(d.get("fused_eager")), _us(d.get("torch_graph")),
            _us(d.get("fused_graph")), _f(d.get("ratio_torch_vs_fused")),
            f"{d.get('max_abs_diff', float('nan')):.1e}",
        ]
        for d in fills
    ]  # fmt: skip
    header = ["E", "P", "G", "sweeps", "max replicas", "torch eager", "fused eager",
              "torch graph", "fused graph", "torch / fused", "max abs diff"]  # fmt: skip
    return lines + _table(header, rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum, frame):  # noqa: ARG001
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    run = Run(args)
    try:
        run.run()
    except (Interrupted, KeyboardInterrupt):
        run.stop_worker()
        run.drain([], [])
        run.notes.append("interrupted (SIGTERM or Ctrl-C) before the end: results are partial")
    res = run.write()
    if res["fatal"]:
        print(f"gpu_check.py: error: {res['fatal']}", file=sys.stderr)
        return 2
    print(summary_md(res).split("## Checks by section")[0].rstrip())
    print(
        f"\nresults: {os.path.join(run.out, 'results.json')}, summary: "
        f"{os.path.join(run.out, 'summary.md')}"
    )
    return res["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
