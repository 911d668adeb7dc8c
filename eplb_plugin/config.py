"""``EplbConfig``: the one configuration object of the runtime balancer.

Every front end builds it the same way: ``eplb demo``, the vLLM and SGLang launchers call
:func:`add_cli_options` on their parser (``--enable-eplb`` plus one ``--eplb-<field>`` option
per field, dashes for underscores) and :meth:`EplbConfig.from_cli` on the parsed arguments,
so an option has the same name and meaning everywhere. Environment variables are read only at
those edges, never here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .names import (
    DISPATCH_MODES,
    MAX_MEMORY_WINDOWS,
    MEMORY_WINDOWS,
    PREDICTORS,
    SHIFT_THRESHOLD,
    WATERFILL_ITERS,
)

COMMUNICATORS = ("torch", "deepep")
PLAN_ON = ("rank0", "all")
RECORD_FORMATS = ("eplb", "sglang")
# Each sweep is a step of the device op on the critical path of every MoE layer.
MAX_WATERFILL_ITERS = 128

# Help text per field; also the documentation of each option (docs/runtime.md lists them).
_HELP = {
    "enable": "turn the balancer on",
    "num_redundant_experts": "extra physical slots beyond the logical experts (P = E + R)",
    "window": "engine steps of load kept in the ring window",
    "interval": "engine steps between two re-plans",
    "predictor": "load used to plan: 'window' (sum over the window) or 'ema'",
    "ema_decay": "per-step decay of the EMA predictor, in (0, 1)",
    "policy": "placement policy name (see `eplb plan --help`)",
    "policy_options": "JSON object of keyword options for the policy, e.g. '{\"max_moved\": 0.25}'",
    "dispatch": "replica choice per token: static, local, node or global (docs/dispatch.md)",
    "waterfill_iters": "water-fill sweeps of local/global dispatch per layer and step (1-128; "
    "more even out the split further at ~2.5 us each on the fused kernel: "
    "`eplb simulate --recommend --waterfill-iters N` models it)",
    "min_gain": "smallest predicted balancedness gain (0..1) worth moving weights for",
    "shift_threshold": "re-plan at once when a run of steps (an eighth of the window) departs "
    "from the planned load this many times as far as a run of that load would (0 = only "
    "every interval; window predictor only)",
    "memory_windows": "windows of load a plan sees: its own and earlier plans' back to the last "
    f"detected shift (1 = its own only; at most {MAX_MEMORY_WINDOWS}; window predictor only)",
    "layers_per_step": "layers moved per engine step (0 = all layers in one step)",
    "staging_bytes": "bytes of extra memory a rebalance may use per rank (staging + send)",
    "communicator": "weight transfer backend: torch (torch.distributed) or deepep",
    "plan_on": "'rank0': plan in a background thread on rank 0, then broadcast; "
    "'all': every rank plans deterministically",
    "plan_delay": "engine steps a background plan may take before it is collected "
    "(0 = plan synchronously in the step it is due)",
    "timeout_s": "seconds any rebalance collective may take before it is abandoned",
    "plan_wait_s": "seconds the step that collects a plan waits for a policy still running "
    "(0 = take the plan only if it is ready; else it is abandoned until the next interval)",
    "log_balancedness": "log the realized balancedness every log_balancedness_interval steps "
    "(one small all-reduce each time)",
    "log_balancedness_interval": "engine steps between two balancedness log lines",
    "num_groups": "expert groups (DeepSeek's group-limited routing; hierarchical placement)",
    "num_nodes": "nodes the EP ranks span (same-node transfers are preferred)",
    "seed": "seed of the dispatch dither and of policies that use randomness",
    "record_dir": "folder where rank 0 writes the load window periodically ('' = off)",
    "record_interval": "engine steps between two writes of the load window (0 = every window)",
    "record_format": "'eplb': load.safetensors (latest window, overwritten); 'sglang': one "
    "expert_distribution_recorder_<step>.pt dump per write",
    "initial_layout": "layout file (eplb .safetensors, SGLang .pt/.json) or `eplb export` "
    "folder the engine starts from ('' = the engine's own start-up layout)",
}


def _fail(name: str, value: object, why: str) -> None:
    raise ValueError(f"EplbConfig.{name}={value!r}: {why}")


def _int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "must be an integer")
    if value < minimum:
        _fail(name, value, f"must be >= {minimum}")


def _float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "must be a finite number")
    return float(value)


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, f"must be one of {', '.join(choices)}")


@dataclass
class EplbConfig:
    """Runtime balancer settings; validated on construction (ValueError naming field + value).

    Attributes:
        enable: turn the balancer on.
        num_redundant_experts: R extra physical slots; P = E + R must divide over the ranks.
        window: W engine steps of per-slot counts kept in the ring window.
        interval: engine steps between re-plans.
        predictor: ``"window"`` plans on the window's sum, ``"ema"`` on an exponential
            moving average (decay ``ema_decay`` per step).
        ema_decay: EMA decay in (0, 1).
        policy: a registered placement policy (``eplb_plugin.available_policies()``).
        policy_options: keyword options passed to the policy (e.g. the default policy's
            ``migration_cost`` or ``max_moved``), checked here against the options the
            policy accepts (a ValueError names the option and lists the valid ones); the
            policy's ``dispatch`` comes from the ``dispatch`` field.
        dispatch: ``"static"``, ``"local"``, ``"node"`` or ``"global"`` replica choice
            (docs/dispatch.md; ``node`` splits within each of ``num_nodes`` nodes).
        waterfill_iters: water-fill sweeps of ``local``/``node``/``global`` dispatch, 1 to 128 (the
            device op, the Balancer's predictions and the simulator use the same number).
        min_gain: act only when the predicted balancedness gain (new - current, both in
            [0, 1]) is at least this.
        shift_threshold: re-plan at once, between regular plans, when a run of steps (the
            unit the window is cut into for the policy) departs from the plan's load this
            many times as far as a run of that load would, judged by the window's own
            run-to-run scatter; that plan and a follow-up see only the steps since the
            shift (:mod:`eplb_plugin.shift`). 0 turns it off; the ``ema`` predictor has no
            runs and ignores it.
        memory_windows: windows of load a plan sees: its own window and the windows up to
            ``memory_windows - 1`` earlier plans saw, none from before the last detected
            shift (:mod:`eplb_plugin.plan_memory`; kept on the host, about 1 MB each at
            DeepSeek-V3's shape). More steps average a noisy load's forecast; the shift
            detector keeps a drifting load's old steps out. 1 plans on the window alone (as
            vLLM and SGLang do); the ``ema`` predictor ignores it.
        layers_per_step: layers moved per engine step; 0 moves every layer in one step.
        staging_bytes: per-rank budget of extra memory for one rebalance chunk (received
            weights staged before commit, plus packed weights being sent).
        communicator: ``"torch"`` (torch.distributed: gloo / NCCL) or ``"deepep"``.
        plan_on: ``"rank0"`` computes the plan in a background thread on rank 0 and
            broadcasts it; ``"all"`` computes it deterministically on every rank.
        plan_delay: engine steps between taking the load snapshot and collecting the plan;
            the policy runs in a background thread meanwhile. 0 plans synchronously.
        timeout_s: seconds a rebalance collective may take before it is abandoned (every
            rank then keeps its old layout and weights).
        plan_wait_s: seconds the step that collects a background plan (``plan_delay`` > 0)
            waits for a policy that has not finished; 0 takes the plan only if it is ready.
            A plan not ready is abandoned on every rank and planning resumes at the next
            interval, so a slow or hung policy never holds up a serving step.
        log_balancedness: log (rank 0, INFO) the realized balancedness of the steps since
            the previous line, every ``log_balancedness_interval`` steps, as vLLM's option
            of that name does. Costs one ``[layers, ranks]`` all-reduce per line.
        log_balancedness_interval: engine steps between two balancedness lines.
        num_groups: expert groups for hierarchical placement.
        num_nodes: nodes the EP ranks span.
        seed: seed for dispatch dithering and randomized policies.
        record_dir: folder where rank 0 writes the load window (after the cross-rank sum)
            every ``record_interval`` steps, atomically (:mod:`eplb_plugin.record`); ``""``
            records nothing.
        record_interval: steps between two writes; 0 writes every ``window`` steps, so that
            consecutive writes cover consecutive windows.
        record_format: ``"eplb"`` (``load.safetensors``, a load trace [steps, L, E] that
            ``eplb export --load`` reads, overwritten each time) or ``"sglang"`` (one SGLang
            stat dump per write, ``expert_distribution_recorder_<step>.pt``).
        initial_layout: a layout file or an ``eplb export`` folder the engine integration
            starts from instead of its own start-up layout; ``""`` for none.
    """

    enable: bool = True
    num_redundant_experts: int = 0
    window: int = 1000
    interval: int = 3000
    predictor: str = "window"
    ema_decay: float = 0.99
    policy: str = "default"
    policy_options: dict = field(default_factory=dict)
    dispatch: str = "static"
    waterfill_iters: int = WATERFILL_ITERS
    min_gain: float = 0.01
    shift_threshold: float = SHIFT_THRESHOLD
    memory_windows: int = MEMORY_WINDOWS
    layers_per_step: int = 1
    staging_bytes: int = 256 << 20
    communicator: str = "torch"
    plan_on: str = "rank0"
    plan_delay: int = 8
    timeout_s: float = 60.0
    plan_wait_s: float = 0.0
    log_balancedness: bool = False
    log_balancedness_interval: int = 1
    num_groups: int = 1
    num_nodes: int = 1
    seed: int = 0
    record_dir: str = ""
    record_interval: int = 0
    record_format: str = "eplb"
    initial_layout: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.enable, bool):
            _fail("enable", self.enable, "must be a bool")
        _int("num_redundant_experts", self.num_redundant_experts, 0)
        _int("window", self.window, 1)
        _int("interval", self.interval, 1)
        _choice("predictor", self.predictor, PREDICTORS)
        self.ema_decay = _float("ema_decay", self.ema_decay)
        if not 0.0 < self.ema_decay < 1.0:
            _fail("ema_decay", self.ema_decay, "must lie strictly between 0 and 1")
        if not isinstance(self.policy, str):
            _fail("policy", self.policy, "must be a policy name")
        from .policies import available_policies

        if self.policy not in available_policies():
            _fail("policy", self.policy, f"unknown; available: {', '.join(available_policies())}")
        if not isinstance(self.policy_options, dict) or not all(
            isinstance(k, str) for k in self.policy_options
        ):
            _fail("policy_options", self.policy_options, "must be a dict with string keys")
        if "dispatch" in self.policy_options:
            _fail(
                "policy_options", self.policy_options,
                "holds 'dispatch': set EplbConfig.dispatch instead (the policy gets it from there)",
            )  # fmt: skip
        from .policies import check_policy_options

        try:
            check_policy_options(self.policy, self.policy_options)
        except (TypeError, ValueError) as exc:
            _fail("policy_options", self.policy_options, str(exc))
        _choice("dispatch", self.dispatch, DISPATCH_MODES)
        _int("waterfill_iters", self.waterfill_iters, 1)
        if self.waterfill_iters > MAX_WATERFILL_ITERS:
            _fail("waterfill_iters", self.waterfill_iters, f"must be <= {MAX_WATERFILL_ITERS}")
        self.min_gain = _float("min_gain", self.min_gain)
        if not 0.0 <= self.min_gain <= 1.0:
            _fail("min_gain", self.min_gain, "must lie in [0, 1] (a balancedness difference)")
        self.shift_threshold = _float("shift_threshold", self.shift_threshold)
        if not self.shift_threshold >= 0:
            _fail("shift_threshold", self.shift_threshold, "must be >= 0 (0 turns it off)")
        _int("memory_windows", self.memory_windows, 1)
        if self.memory_windows > MAX_MEMORY_WINDOWS:
            _fail("memory_windows", self.memory_windows, f"must be <= {MAX_MEMORY_WINDOWS}")
        _int("layers_per_step", self.layers_per_step, 0)
        _int("staging_bytes", self.staging_bytes, 1)
        _choice("communicator", self.communicator, COMMUNICATORS)
        _choice("plan_on", self.plan_on, PLAN_ON)
        _int("plan_delay", self.plan_delay, 0)
        self.timeout_s = _float("timeout_s", self.timeout_s)
        if self.timeout_s <= 0:
            _fail("timeout_s", self.timeout_s, "must be positive")
        self.plan_wait_s = _float("plan_wait_s", self.plan_wait_s)
        if self.plan_wait_s < 0:
            _fail("plan_wait_s", self.plan_wait_s, "must be >= 0")
        if not isinstance(self.log_balancedness, bool):
            _fail("log_balancedness", self.log_balancedness, "must be a bool")
        _int("log_balancedness_interval", self.log_balancedness_interval, 1)
        _int("num_groups", self.num_groups, 1)
        _int("num_nodes", self.num_nodes, 1)
        _int("seed", self.seed, 0)
        for name in ("record_dir", "initial_layout"):
            if not isinstance(getattr(self, name), str):
                _fail(name, getattr(self, name), "must be a path string ('' for none)")
        _int("record_interval", self.record_interval, 0)
        _choice("record_format", self.record_format, RECORD_FORMATS)

    # ------------------------------------------------------------------ dict / CLI
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EplbConfig:
        """Build from a dict (e.g. a JSON ``--eplb-config``); unknown keys are a ValueError."""
        if not isinstance(values, dict):
            raise ValueError(f"EplbConfig: expected a dict of fields, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"EplbConfig: unknown field(s) {unknown}; known: {', '.join(cls.field_names())}"
            )
        return cls(**values)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> EplbConfig:
        """Build from arguments parsed by a parser that :func:`add_cli_options` extended.

        ``enable`` follows ``--enable-eplb`` (off unless given, as in vLLM and SGLang); every
        ``--eplb-<field>`` left out keeps the dataclass default.
        """
        values: dict[str, Any] = {"enable": bool(getattr(args, "enable_eplb", False))}
        for name in cls.field_names():
            if name == "enable":
                continue
            value = getattr(args, cli_dest(name), None)
            if value is not None:
                values[name] = value
        return cls(**values)

    def to_cli(self) -> list[str]:
        """The command-line options that rebuild this config (for launching subprocesses)."""
        argv = ["--enable-eplb"] if self.enable else []
        default = EplbConfig()
        for name in self.field_names():
            value = getattr(self, name)
            if name != "enable" and value != getattr(default, name):
                argv += [
                    cli_flag(name),
                    json.dumps(value) if isinstance(value, dict) else str(value),
                ]
        return argv


def json_object(text: str) -> dict:
    """argparse type: a JSON object (``--eplb-config``, dict-valued fields)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    except RecursionError as exc:
        raise argparse.ArgumentTypeError("not JSON: nested too deeply") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _cli_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_CLI_TYPES = {dict: json_object, bool: _cli_bool}


def cli_flag(name: str) -> str:
    """``layers_per_step`` -> ``--eplb-layers-per-step``."""
    return "--eplb-" + name.replace("_", "-")


def cli_dest(name: str) -> str:
    return "eplb_" + name


def add_cli_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--enable-eplb`` and one ``--eplb-<field>`` option per EplbConfig field.

    Options default to None (meaning: keep the dataclass default) so that
    :meth:`EplbConfig.from_cli` sees which ones the user gave; validation happens there.
    """
    defaults = EplbConfig()
    choices = {
        "predictor": PREDICTORS,
        "dispatch": DISPATCH_MODES,
        "communicator": COMMUNICATORS,
        "plan_on": PLAN_ON,
        "record_format": RECORD_FORMATS,
    }
    parser.add_argument("--enable-eplb", action="store_true", help=_HELP["enable"])
    for f in dataclasses.fields(EplbConfig):
        if not f.init or f.name == "enable":
            continue
        default = getattr(defaults, f.name)
        parser.add_argument(
            cli_flag(f.name),
            dest=cli_dest(f.name),
            type=_CLI_TYPES.get(type(default), type(default)),
            default=None,
            choices=choices.get(f.name),
            metavar=None if f.name in choices else f.name.upper(),
            help=f"{_HELP[f.name]} (default {default})",
        )


__all__ = ["EplbConfig", "add_cli_options", "cli_flag"]
