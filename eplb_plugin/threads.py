"""Running the balancer's off-critical-path work (the policy, the move's preparation) as a
Future: in a daemon thread, or right here when there is no step to hide it behind."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future


def background(name: str, fn: Callable, *args) -> Future:
    """Run ``fn(*args)`` in a new daemon thread; its Future.

    Daemon threads, not a ThreadPoolExecutor: the pool's workers are joined when the
    interpreter exits, so a policy that never returns would hang the engine's shutdown.
    """
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever collects it
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def run_now(fn: Callable, *args) -> Future:
    """``fn(*args)`` run here, its result or exception in a done Future."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 - collected (and counted) like a background one
        future.set_exception(exc)
    return future
