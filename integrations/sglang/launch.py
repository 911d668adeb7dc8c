"""``python -m eplb_plugin.integrations.sglang.launch <sglang launch_server args>``.

SGLang's ``python -m sglang.launch_server`` with the integration switched on first. The
module level calls :func:`register`, and SGLang starts its scheduler and detokenizer
processes with ``multiprocessing`` in spawn mode, which re-imports this main module in each
child (as ``__mp_main__``): every SGLang process therefore applies the settings of
``EPLB_SGLANG_CONFIG`` / ``EPLB_SGLANG_POLICY`` before SGLang's own code runs there, with or
without the ``sglang.srt.plugins`` entry point installed. ``eplb sglang launch_server``
sets those variables and runs this module.
"""

from __future__ import annotations

import os
import sys

from eplb_plugin.integrations.sglang.plugin import register

register()


def main(argv: list[str] | None = None) -> None:
    """Start SGLang's HTTP server as ``python -m sglang.launch_server`` does."""
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(sys.argv[1:] if argv is None else argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
