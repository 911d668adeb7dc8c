"""``eplb verify``: check an export against its source checkpoint."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check an exported checkpoint against its source",
        description="Hash every exported tensor against its source, check the layout's "
        "consistency and that every logical expert is present. Exit 1 on any problem.",
    )
    p.add_argument("--checkpoint", required=True, help="source checkpoint folder")
    p.add_argument("--export", required=True, help="folder written by `eplb export`")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import verify_export

    report = verify_export(
        args.checkpoint, args.export, progress=False if args.no_progress else None
    )
    if args.json:
        out = {
            "ok": report.ok,
            "tensors_checked": report.tensors_checked,
            "bytes_hashed": report.bytes_hashed,
            "errors": report.errors,
        }
        print(json.dumps(out, indent=2))
    else:
        for error in report.errors:
            print(f"error: {error}")
        state = "OK" if report.ok else f"FAILED ({len(report.errors)} problems)"
        print(
            f"{state}: {report.tensors_checked} tensors checked, "
            f"{report.bytes_hashed / 2**20:.1f} MiB hashed"
        )
    return 0 if report.ok else 1
