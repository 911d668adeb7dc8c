"""``eplb convert``: statistics and layouts between eplb, SGLang and vLLM forms."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..formats import (
    read_layout,
    read_vllm_window_file,
    write_sglang_dump,
    write_sglang_layout,
)
from ..traces import LOAD_SUFFIXES, read_load, write_load


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert loads and layouts between eplb, SGLang and vLLM forms",
        description="`eplb convert load IN OUT`: SGLang dumps (file or folder), vLLM windows "
        "or eplb traces -> an eplb load trace (or, with --sglang, an SGLang stat dump that "
        "--init-expert-location accepts). `eplb convert layout IN OUT`: eplb .safetensors "
        "<-> SGLang physical_to_logical_map .pt/.json.",
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    load = kinds.add_parser("load", help="convert statistics")
    load.add_argument("input", help="eplb trace, SGLang dump (file or folder) or vLLM window")
    load.add_argument("output", help=f"eplb trace ({', '.join(LOAD_SUFFIXES)}) or SGLang .pt")
    load.add_argument(
        "--layout",
        help="layout the physical counts of a vLLM window ([W, L, P] without its map) were "
        "taken under (eplb .safetensors or SGLang .pt/.json; SGLang needs --ep-size)",
    )
    load.add_argument("--ep-size", type=int, help="EP ranks of an SGLang --layout file")
    load.add_argument("--sglang", action="store_true", help="write an SGLang stat dump (.pt)")
    load.set_defaults(func=run_load)
    layout = kinds.add_parser("layout", help="convert a layout")
    layout.add_argument("input", help="eplb .safetensors or SGLang .pt/.json layout")
    layout.add_argument("output", help="SGLang .pt/.json, or eplb .safetensors")
    layout.add_argument("--ep-size", type=int, help="EP ranks (needed to read an SGLang file)")
    layout.add_argument("--groups", type=int, default=1, help="expert groups (SGLang input)")
    layout.add_argument("--nodes", type=int, default=1, help="nodes (SGLang input)")
    layout.add_argument(
        "--layer-ids",
        help="model layer id of each layout row, comma-separated (e.g. 3,4,...,60), to write "
        "SGLang's one-row-per-hidden-layer form",
    )
    layout.add_argument("--num-layers", type=int, help="hidden layers (rows of the SGLang map)")
    layout.set_defaults(func=run_layout)


def run_load(args: argparse.Namespace) -> int:
    if args.layout:
        layout = read_layout(args.layout, ep_size=args.ep_size)
        load = read_vllm_window_file(args.input, layout)
    else:
        load = read_load(args.input)
    if args.sglang:
        if Path(args.output).suffix.lower() != ".pt":
            raise ValueError(f"an SGLang dump must be a .pt file, got {args.output!r}")
        write_sglang_dump(args.output, load)
    else:
        write_load(args.output, load.float())
    print(f"wrote {'SGLang dump' if args.sglang else 'load'} {tuple(load.shape)} to {args.output}")
    return 0


def run_layout(args: argparse.Namespace) -> int:
    layout = read_layout(args.input, ep_size=args.ep_size, num_groups=args.groups,
                         num_nodes=args.nodes)  # fmt: skip
    suffix = Path(args.output).suffix.lower()
    if suffix == ".safetensors":
        layout.save(args.output, {"source": str(args.input)})
    elif suffix in (".pt", ".json"):
        layer_ids = None
        if args.layer_ids:
            try:
                layer_ids = [int(x) for x in args.layer_ids.split(",")]
            except ValueError:
                raise ValueError(f"--layer-ids {args.layer_ids!r} must be integers") from None
        write_sglang_layout(args.output, layout, layer_ids, args.num_layers)
    else:
        raise ValueError(f"output {args.output!r} must end with .safetensors, .pt or .json")
    print(
        f"wrote layout [{layout.num_layers} layers x {layout.num_slots} slots, "
        f"{layout.num_experts} experts] to {args.output}"
    )
    return 0
