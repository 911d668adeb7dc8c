"""``eplb`` entry point: dispatches to one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` which registers its parser and
sets ``func(args) -> int``. A ValueError raised by a subcommand is bad input: it is
printed as ``eplb <cmd>: error: ...`` with exit code 2 and nothing is written; so is an
OSError (a folder that cannot be written, a full disk). Ctrl-C prints ``eplb <cmd>:
interrupted`` and exits 130; a reader that closes stdout early (``eplb plan --json | head``)
ends the command quietly with 141, as SIGPIPE would. Warnings of the package's own
(:class:`eplb_plugin.policies.LoadWarning`) are printed as ``eplb <cmd>: warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

# Subcommand modules, in the order `eplb --help` lists them.
SUBCOMMANDS = ("plan", "simulate", "export", "verify", "convert", "demo", "vllm", "sglang")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eplb", description="Expert-parallel load balancing for MoE serving."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"eplb_plugin.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports every subcommand module: Ctrl-C may land here
        args, extra = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        print("eplb: interrupted", file=sys.stderr)
        return 130
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    command = args.command
    try:
        with _warnings_as_lines(command):
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader is gone; later writes (the interpreter's last flush) go nowhere
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"eplb {command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"eplb {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """The package's LoadWarnings as ``eplb <cmd>: warning: ...``; others as Python shows them."""
    from eplb_plugin.policies import LoadWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LoadWarning):
            print(f"eplb {command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
