"""Atomic file writes that honour the umask, and the check of a file to be read.

Every file the package writes for a user (layouts, load traces, reports, plots, exports) goes
through :func:`atomic_write`: the content is written to a hidden temporary file in the target
folder and renamed over the target, so a reader never sees half a file and an interrupted
write leaves the old file in place. ``tempfile.mkstemp`` creates its file 0600 whatever the
umask; the rename would carry that mode to the user's file, so the mode a plain ``open()``
would have given (0666 less the umask) is restored before the rename.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

__all__ = ["atomic_write", "current_umask", "default_file_mode", "require_file"]


def require_file(path: str, what: str) -> None:
    """ValueError naming ``what`` unless ``path`` is a regular file (or a link to one): a
    path that is missing "does not exist", one that is a folder, a device such as
    /dev/null or a pipe "is not a regular file" (reading it would give nothing useful)."""
    if os.path.isfile(path):
        return
    if os.path.exists(path):
        kind = "a folder" if os.path.isdir(path) else "not a regular file"
        raise ValueError(f"{what} {path!r} is {kind}")
    raise ValueError(f"{what} {path!r} does not exist")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # os.umask can only be read by setting it; restore at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, then the
    temporary file gets the umask's mode and replaces ``path``. On any error (KeyboardInterrupt
    included) the temporary file is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".eplb-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _naming(exc, path) from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _naming(exc, path) from exc
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _naming(exc: OSError, path: str) -> OSError:
    """The same error naming the user's ``path``, not the hidden temporary file."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, path)
