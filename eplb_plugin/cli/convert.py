"""``eplb convert``: statistics and layouts between eplb, SGLang and vLLM forms."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..names import LOAD_SUFFIXES
from .plan import check_out_folder


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
        help="model layer id of each layout row, comma-separated, ranges allowed (e.g. 3-60 "
        "or 0,2,4-7; one distinct id per row), to write SGLang's one-row-per-hidden-layer form",
    )
    layout.add_argument("--num-layers", type=int, help="hidden layers (rows of the SGLang map)")
    layout.set_defaults(func=run_layout)


# Hidden layers of an SGLang map this command writes: far above any model's (a few hundred),
# low enough that a typo cannot make it build a map of gigabytes.
MAX_LAYERS = 4096


def parse_layer_ids(text: str, option: str = "--layer-ids") -> list[int]:
    """``"0,2,4-7"`` -> [0, 2, 4, 5, 6, 7]; ValueError for a bad item, a reversed range, an
    id of MAX_LAYERS or more or a layer named twice (two rows written to one layer would
    lose one of them)."""
    ids: list[int] = []
    for item in text.split(","):
        item = item.strip()
        first, sep, last = item.partition("-")
        try:
            lo = int(first)
            hi = int(last) if sep else lo
        except ValueError:
            raise ValueError(
                f"{option} {text!r}: {item!r} is not a layer id or a range like 4-7"
            ) from None
        if lo < 0 or hi < lo:
            raise ValueError(f"{option} {text!r}: {item!r} is not a rising range of ids >= 0")
        if hi >= MAX_LAYERS:
            raise ValueError(f"{option} {text!r}: layer id {hi} is not below {MAX_LAYERS}")
        ids.extend(range(lo, hi + 1))
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{option} {text!r} names layer {i} more than once")
        seen.add(i)
    return ids


def run_load(args: argparse.Namespace) -> int:
    from ..formats import read_layout, read_vllm_window_file, write_sglang_dump
    from ..traces import read_load, write_load

    check_out_folder(args.output, "output", (args.input, args.layout))
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
    from ..formats import read_layout, write_sglang_layout

    check_out_folder(args.output, "output", (args.input,))
    layer_ids = parse_layer_ids(args.layer_ids) if args.layer_ids is not None else None
    if args.num_layers is not None and not 1 <= args.num_layers <= MAX_LAYERS:
        raise ValueError(f"--num-layers {args.num_layers} must lie in [1, {MAX_LAYERS}]")
    layout = read_layout(args.input, ep_size=args.ep_size, num_groups=args.groups,
                         num_nodes=args.nodes)  # fmt: skip
    suffix = Path(args.output).suffix.lower()
    rows = layout.num_layers
    if suffix == ".safetensors":
        if layer_ids is not None or args.num_layers is not None:
            raise ValueError("--layer-ids and --num-layers apply to SGLang output (.pt/.json)")
        layout.save(args.output, {"source": str(args.input)})
    elif suffix in (".pt", ".json"):
        if layer_ids is not None and len(layer_ids) != layout.num_layers:
            raise ValueError(
                f"--layer-ids gives {len(layer_ids)} layer ids for a layout of "
                f"{layout.num_layers} rows (one id per row)"
            )
        write_sglang_layout(args.output, layout, layer_ids, args.num_layers)
        if args.num_layers is not None:
            rows = args.num_layers
        elif layer_ids is not None:
            rows = max(layer_ids) + 1
    else:
        raise ValueError(f"output {args.output!r} must end with .safetensors, .pt or .json")
    dense = rows - layout.num_layers
    print(
        f"wrote layout [{rows} rows x {layout.num_slots} slots, {layout.num_experts} experts"
        + (f"; {dense} of the rows are dense layers with SGLang's trivial map" if dense else "")
        + f"] to {args.output}"
    )
    return 0
