"""Ctrl-C in ``eplb demo``: exit 130 with one line, every rank stopped, temp folders removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _session(sid: int) -> list[int]:
    """Processes of session ``sid`` (the demo, its fork server, resource tracker, ranks)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ignores_sigint(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            ignored = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(ignored, 16) & 1 << (signal.SIGINT - 1))


def _ranks(demo: int) -> list[int]:
    """The demo's rank processes: children of its fork server."""
    ranks = []
    for pid in _session(demo):
        if pid != demo and "forkserver" in _cmdline(pid):
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    ranks += [int(c) for c in f.read().split()]
            except OSError:
                pass
    return ranks


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
def test_ctrl_c_in_demo_exits_130_in_one_line_and_stops_every_rank(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, EPLB_KERNELS="torch", TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "eplb_plugin.cli.main", "demo", "--ranks", "2", "--steps",
           "400", "--prompts", "6", "--prompt-len", "4", "--no-report"]  # fmt: skip
    # a session of its own, so that the SIGINT goes to every process as a terminal's Ctrl-C
    # does; SIGINT restored in case the test runner was started with it ignored
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        # every rank started and past its first line (which hands Ctrl-C to the parent)
        while not (len(ranks := _ranks(proc.pid)) == 2 and all(map(_ignores_sigint, ranks))):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert err.decode() == "eplb demo: interrupted\n"
    # the fork server and the resource tracker notice the demo's exit within moments
    deadline = time.monotonic() + 30
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session(proc.pid) == [], [_cmdline(p) for p in _session(proc.pid)]
    assert [n for n in os.listdir(tmp) if n.startswith("eplb-")] == []


def test_ctrl_c_during_the_rank_starts_is_raised_once_they_are_all_started():
    from eplb_plugin.integrations.transformers.engine import _ctrl_c_deferred

    # Python's own handler, as in `eplb demo` (a runner may have started with SIGINT ignored)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with _ctrl_c_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs here; without the deferral it would raise
                finished.append(True)
        assert finished == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with _ctrl_c_deferred():  # nothing caught: nothing raised
            pass
    finally:
        signal.signal(signal.SIGINT, outer)
