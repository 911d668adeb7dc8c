"""Options and printing shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parsers are built without torch (`eplb --help`)
    from ..layout import Topology


def add_topology_options(parser: argparse.ArgumentParser, replicas_required: bool = True) -> None:
    parser.add_argument(
        "--replicas", type=int, required=replicas_required, help="physical slots P (>= experts)"
    )
    parser.add_argument("--groups", type=int, default=1, help="expert groups (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus", type=int, required=replicas_required, help="GPUs (EP ranks)")


def topology_from_args(args: argparse.Namespace) -> Topology:
    from ..layout import Topology

    return Topology(args.replicas, args.groups, args.nodes, args.gpus)


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """Plain fixed-width table; floats printed with 4 decimals."""

    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [header] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------- EPLB options
# The options `eplb demo`, `eplb vllm` and `eplb sglang` share. Every other EplbConfig field
# (and vLLM's EPLBConfig keys) goes in the JSON of --eplb-config.
FIRST_CLASS = ("num_redundant_experts", "window", "interval", "policy", "dispatch")
# Fields that had an --eplb-* option of their own until this release: kept one more release as
# hidden aliases that warn and name the --eplb-config key.
LEGACY_OPTIONS = (
    "predictor", "ema_decay", "policy_options", "min_gain", "layers_per_step", "staging_bytes",
    "communicator", "plan_on", "plan_delay", "timeout_s", "num_groups", "num_nodes", "seed",
)  # fmt: skip
_METAVAR = {"num_redundant_experts": "R", "window": "STEPS", "interval": "STEPS", "policy": "NAME"}


def eplb_flag(name: str) -> str:
    """``num_redundant_experts`` -> ``--eplb-num-redundant-experts``."""
    return "--eplb-" + name.replace("_", "-")


def _dest(name: str) -> str:
    return "eplb_" + name


def add_eplb_options(
    parser: argparse.ArgumentParser, defaults: dict | None = None, *, enable_option: bool = True
) -> None:
    """``--enable-eplb``, ``--eplb-config JSON`` and the first-class ``--eplb-*`` options.

    Args:
        parser: the subcommand's parser.
        defaults: the EplbConfig values this command applies where an option is not given
            (help shows them); None: the EplbConfig defaults.
        enable_option: add ``--enable-eplb`` (the demo always runs EPLB).
    Options default to None, so that :func:`eplb_config_from_args` sees which were given.
    """
    from ..config import _HELP, DISPATCH_MODES, EplbConfig, json_object

    applied = {**_field_defaults(EplbConfig), **(defaults or {})}
    group = parser.add_argument_group(
        "EPLB",
        "The balancer's main settings; every other EplbConfig field, and vLLM's EPLBConfig "
        "keys, go in --eplb-config (docs/runtime.md lists them).",
    )
    group.add_argument(
        "--enable-eplb",
        action="store_true",
        # the demo always runs EPLB; the flag stays accepted there (a no-op)
        help=_HELP["enable"] if enable_option else argparse.SUPPRESS,
    )
    group.add_argument(
        "--eplb-config",
        dest="eplb_config",
        action="append",
        type=json_object,
        metavar="JSON",
        help="JSON object of EplbConfig fields and/or vLLM's EPLBConfig keys, e.g. "
        '\'{"window_size": 1000, "step_interval": 3000, "min_gain": 0}\''
        + ("; also --eplb-config.KEY VALUE (vLLM's form)" if enable_option else "")
        + _other_defaults(defaults),
    )
    for name in FIRST_CLASS:
        group.add_argument(
            eplb_flag(name),
            dest=_dest(name),
            type=str if name in ("policy", "dispatch") else int,
            choices=DISPATCH_MODES if name == "dispatch" else None,
            default=None,
            metavar=_METAVAR.get(name),
            help=f"{_HELP[name]} (default {applied[name]!r})",
        )
    for name in LEGACY_OPTIONS:
        parser.add_argument(
            eplb_flag(name), dest=_dest(name), type=_legacy_type(name), default=None,
            help=argparse.SUPPRESS,
        )  # fmt: skip


def _other_defaults(defaults: dict | None) -> str:
    """Help text naming this command's own defaults of the fields without an option."""
    others = {k: v for k, v in (defaults or {}).items() if k not in (*FIRST_CLASS, "enable")}
    if not others:
        return ""
    import json

    return f" (this command's defaults: {json.dumps(others)})"


def _field_defaults(cls) -> dict:
    """A dataclass's field defaults, without building one (no validation, no imports)."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _legacy_type(name: str):
    from ..config import EplbConfig, json_object

    default = _field_defaults(EplbConfig)[name]
    return json_object if isinstance(default, dict) else type(default)


def _norm(option: str) -> str:
    """vLLM's spelling rule: underscores and dashes are the same in an option's name (up to
    the first dot)."""
    head, dot, tail = option.partition(".")
    return "--" + head[2:].replace("_", "-") + dot + tail


def take_eplb_args(extra: list[str]) -> tuple[list[str], dict, list[str]]:
    """Take the EPLB options an engine's user may write in the engine's own spellings out of
    the arguments left for the engine.

    Handles ``--enable_eplb``, ``--eplb_config``, ``--eplb_<option>`` (underscores),
    ``--no-enable-eplb`` and vLLM's dotted form ``--eplb-config.KEY VALUE`` /
    ``--eplb-config.KEY=VALUE`` (values parsed as JSON, else kept as strings; nested keys
    build nested objects, as vLLM does).

    Returns:
        (our options in dash spelling, the dotted keys as one object, the rest in order).
    """
    import json

    from ..config import EplbConfig

    flags = {"--enable-eplb", "--no-enable-eplb", "--eplb-config"}
    flags |= {eplb_flag(n) for n in EplbConfig.field_names() if n != "enable"}
    ours: list[str] = []
    dotted: dict = {}
    rest: list[str] = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        i += 1
        if not arg.startswith("--"):
            rest.append(arg)
            continue
        name, eq, value = arg.partition("=")
        name = _norm(name)
        if name.startswith("--eplb-config."):
            if not eq:
                if i >= len(extra):
                    raise ValueError(f"{arg} needs a value")
                value = extra[i]
                i += 1
            keys = name[len("--eplb-config.") :].split(".")
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            node = dotted
            for key in keys[:-1]:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ValueError(f"{arg}: --eplb-config.{key} is not an object")
            node[keys[-1]] = parsed
            continue
        if name not in flags:
            rest.append(arg)
            continue
        if name in ("--enable-eplb", "--no-enable-eplb"):
            if eq:
                raise ValueError(f"{arg}: {name} takes no value")
            ours.append(name)
            continue
        ours.append(name)
        if eq:
            ours.append(value)
        elif i < len(extra):
            ours.append(extra[i])
            i += 1
        else:
            raise ValueError(f"{arg} needs a value")
    return ours, dotted, rest


def eplb_config_from_args(
    prog: str,
    args: argparse.Namespace,
    base: dict | None = None,
    *,
    engine_sources: list[tuple[str, str, object]] | None = None,
    warn=None,
):
    """The EplbConfig of a command: ``base`` (the command's defaults), then every EPLB
    setting given, from whichever spelling.

    Args:
        prog: the command's name, for warnings (``eplb vllm``).
        args: arguments parsed by a parser :func:`add_eplb_options` extended;
            ``args.extra`` (when present) is replaced by what is left for the engine, and
            the dotted ``--eplb-config.KEY`` values are kept in ``args.eplb_dotted``.
        base: field values applied before the options (e.g. the demo's settings).
        engine_sources: ``(label, field, value)`` from an engine's own options (SGLang's).
        warn: ``warn(message)`` for deprecated aliases and ignored keys (default: stderr).
    Returns:
        (EplbConfig, set of fields given explicitly).
    Raises:
        ValueError: a setting given twice with different values, an unknown key, or a
            value EplbConfig refuses; the message names the options involved.
    """
    import sys

    from ..config import EplbConfig
    from ..engine_fields import fields_from_json

    if warn is None:

        def warn(message: str) -> None:
            print(f"{prog}: warning: {message}", file=sys.stderr)

    dotted: dict = {}
    if getattr(args, "extra", None):
        ours, dotted, rest = take_eplb_args(list(args.extra))
        args.extra = rest
        args.eplb_dotted = dotted
        if ours:
            more = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
            add_eplb_options(more)
            more.add_argument("--no-enable-eplb", action="store_true")
            try:
                late = more.parse_args(ours)
            except SystemExit as exc:  # argparse printed the reason
                raise ValueError(f"bad EPLB option in {' '.join(ours)}") from exc
            _merge_late(args, late)
    sources: list[tuple[str, str, object]] = []
    fields = EplbConfig.field_names()
    for obj in getattr(args, "eplb_config", None) or []:
        given, notes = fields_from_json(obj, fields)
        sources += [(f"--eplb-config {key}", field, value) for key, field, value in given]
        for note in notes:
            warn(note)
    if dotted:
        given, notes = fields_from_json(dotted, fields)
        sources += [(f"--eplb-config.{key}", field, value) for key, field, value in given]
        for note in notes:
            warn(note)
    for name in (*FIRST_CLASS, *LEGACY_OPTIONS):
        value = getattr(args, _dest(name), None)
        if value is None:
            continue
        sources.append((eplb_flag(name), name, value))
        if name in LEGACY_OPTIONS:
            import json

            warn(
                f"{eplb_flag(name)} is deprecated and goes away in the next release; use "
                f"--eplb-config '{json.dumps({name: value})}'"
            )
    sources += engine_sources or []
    chosen: dict[str, tuple[str, object]] = {}
    for label, field, value in sources:
        if field in chosen and chosen[field][1] != value:
            first, before = chosen[field]
            raise ValueError(
                f"{label} {value!r} disagrees with {first} {before!r} (both set {field}); "
                "give it once"
            )
        chosen.setdefault(field, (label, value))
    values = dict(base or {})
    values.update({field: value for field, (_, value) in chosen.items()})
    if getattr(args, "enable_eplb", False):
        if getattr(args, "no_enable_eplb", False):
            raise ValueError("--enable-eplb and --no-enable-eplb exclude each other")
        values["enable"] = True
    elif "enable" not in chosen and "enable" not in (base or {}):
        values["enable"] = False
    config = EplbConfig.from_dict(values)
    check_record_dir(config.record_dir)
    return config, set(chosen)


def check_record_dir(path: str) -> None:
    """ValueError when ``record_dir`` ('' for none) can never be created and written: the
    engine would find out only at the balancer's start, after loading the model."""
    import os

    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"record_dir {path!r} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"record_dir {path!r} cannot be created: {existing!r} is a file")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"record_dir {path!r} cannot be written: {existing!r} is read-only")


def _merge_late(args: argparse.Namespace, late: argparse.Namespace) -> None:
    """Fold options found among the engine's arguments into ``args``."""
    for dest, value in vars(late).items():
        if value is None or value is False:
            continue
        current = getattr(args, dest, None)
        if dest == "eplb_config":
            setattr(args, dest, (current or []) + value)
        elif current in (None, False) or current == value:
            setattr(args, dest, value)
        else:
            raise ValueError(f"--{dest.replace('_', '-')} given twice: {current!r} and {value!r}")
