"""Run a function on N gloo ranks in spawned processes, with timeouts (reusable by any test).

    from dist_utils import run_ranks

    def body(rank: int, world_size: int, scale: int) -> int:   # module-level: picklable
        t = torch.tensor([rank * scale])
        torch.distributed.all_reduce(t)
        return int(t)

    assert run_ranks(body, 4, 10) == [60, 60, 60, 60]

Each rank runs in its own spawned process with a gloo process group already initialized
(``tcp://127.0.0.1:<free port>``, the given collective timeout) and one torch thread. The
parent collects each rank's return value (pickled) or its exception (re-raised as
:class:`RankError` with every failing rank's traceback); ranks that have not answered within
``timeout`` are killed and a :class:`RankTimeout` names them. A test can therefore never hang.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


class RankError(RuntimeError):
    """One or more ranks raised; ``errors`` maps rank -> formatted traceback."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        super().__init__(f"{len(errors)} rank(s) failed:\n{text}")


class RankTimeout(RuntimeError):
    """Ranks that did not finish in time; ``missing`` lists them, ``results`` the others."""

    def __init__(self, missing: list[int], results: dict[int, Any], timeout: float):
        self.missing = missing
        self.results = results
        super().__init__(f"ranks {missing} did not finish within {timeout:.0f} s (killed)")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    pg_timeout: float,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    results: mp.Queue,
    release: object,
) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        value = fn(rank, world_size, *args, **kwargs)
        payload = ("ok", rank, pickle.dumps(value))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        payload = ("err", rank, traceback.format_exc())
    results.put(payload)
    results.close()
    results.join_thread()
    # Stay until the parent has every answer: rank 0 hosts the TCP store, and leaving early
    # would cut off ranks still setting up. A test may leave the group broken on purpose (a
    # timed-out rank), so skip the collective teardown, which could block, and atexit too.
    release.wait(pg_timeout + 120)
    os._exit(0)


_CTX = None


def _context():
    """A forkserver that imported torch once: later groups start in well under a second.

    Forking the test process itself is unsafe (threads of OpenMP, gloo, pytest plugins), and
    spawning pays the torch import (seconds on a loaded machine) in every rank.
    """
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # the package and its kernels (Triton) too: imported once, not once per rank
        _CTX.set_forkserver_preload(
            ["torch", "torch.distributed", "eplb_plugin", "eplb_plugin.kernels", __name__]
        )
    return _CTX


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 60.0,
    env: dict[str, str] | None = None,
    allow_missing: bool = False,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of ranks (processes).
        timeout: seconds to wait for all ranks; stragglers are killed.
        pg_timeout: gloo collective timeout of the process group.
        env: extra environment variables for the ranks (``TRITON_INTERPRET`` and
            ``OMP_NUM_THREADS`` are inherited from the parent).
        allow_missing: return None for ranks that did not finish instead of raising.
    Returns:
        per-rank return values, rank order.
    Raises:
        RankError if any rank raised; RankTimeout if any rank did not finish (unless
        ``allow_missing``).
    """
    ctx = _context()
    results: mp.Queue = ctx.Queue()
    release = ctx.Event()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                rank,
                world_size,
                port,
                pg_timeout,
                dict(env or {}),
                fn,
                args,
                kwargs,
                results,
                release,
            ),
            daemon=True,
        )  # fmt: skip
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    vanished: set[int] = set()  # exited with code 0 and no result (a test killed it)
    deadline = time.monotonic() + timeout
    try:
        while len(done) + len(errors) + len(vanished) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                status, rank, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                # a rank waits for `release` after answering, so one that exited has died
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in done]
                for r in dead:
                    if procs[r].exitcode == 0:
                        vanished.add(r)
                    elif r not in errors:
                        errors[r] = f"process exited with code {procs[r].exitcode} (no result)"
                continue
            if status == "ok":
                done[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
    finally:
        release.set()
        for p in procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    if errors:
        raise RankError(errors)
    missing = [r for r in range(world_size) if r not in done]
    if missing and not allow_missing:
        raise RankTimeout(missing, done, timeout)
    return [done.get(r) for r in range(world_size)]


__all__ = ["RankError", "RankTimeout", "free_port", "run_ranks"]
