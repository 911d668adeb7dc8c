"""The engines' own EPLB settings, mapped onto :class:`~eplb_plugin.config.EplbConfig` fields.

One table per engine, read by the launchers (``eplb vllm``, ``eplb sglang``) and by anything
else that turns an engine's settings into an EplbConfig (e.g. an environment/JSON parser):

- :data:`VLLM_FIELDS`: the keys of vLLM 0.32's ``EPLBConfig`` (``--eplb-config '{...}'`` and
  ``--eplb-config.KEY VALUE``), accepted in the same JSON as EplbConfig's own field names;
- :data:`SGLANG_OPTIONS`: SGLang 0.5.23's server options of its EPLB and its
  expert-distribution recorder.

Each entry names the EplbConfig field it sets (None: accepted, nothing of ours to set) and
how the value converts; :func:`fields_from_json` applies the vLLM table to a JSON object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# vLLM's EPLBConfig.communicator values; the plugin moves weights with torch.distributed on
# the engine's EP group whatever backend that group has, which is EplbConfig's "torch".
VLLM_COMMUNICATORS = ("torch_nccl", "torch_gloo", "torch_xccl", "nixl", "pynccl")


@dataclass(frozen=True)
class EngineField:
    """One engine setting.

    Attributes:
        field: the EplbConfig field it sets, or None when it sets none of ours.
        convert: engine value -> our value (raises ValueError for a bad value).
        note: how the meaning maps (the docs' table says the same).
        passed_on: the launcher also hands it to the engine unchanged (SGLang options).
        refused: why it is refused (an empty string: accepted).
    """

    field: str | None
    convert: Callable[[object], object]
    note: str
    passed_on: bool = False
    refused: str = ""


def _int(name: str, minimum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return value

    return convert


def _bool(name: str) -> Callable[[object], bool]:
    def convert(value: object) -> bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value

    return convert


def _same(value: object) -> object:
    return value


def _communicator(value: object) -> str:
    if value in VLLM_COMMUNICATORS:
        return "torch"
    return value  # EplbConfig validates its own values ("torch", "deepep")


def _use_async(value: object) -> int:
    return 1 if _bool("use_async")(value) else 0


VLLM_FIELDS: dict[str, EngineField] = {
    "window_size": EngineField(
        "window", _int("window_size", 1), "same meaning: steps of load kept"
    ),
    "step_interval": EngineField(
        "interval", _int("step_interval", 1), "same meaning: steps between two re-plans"
    ),
    "num_redundant_experts": EngineField(
        "num_redundant_experts", _int("num_redundant_experts", 0), "same meaning"
    ),
    "log_balancedness": EngineField(
        "log_balancedness", _bool("log_balancedness"), "same meaning: log the balancedness"
    ),
    "log_balancedness_interval": EngineField(
        "log_balancedness_interval",
        _int("log_balancedness_interval", 1),
        "same meaning: steps between two balancedness lines",
    ),
    "use_async": EngineField(
        "layers_per_step",
        _use_async,
        "true (vLLM's default): one layer moved per engine step (layers_per_step 1); "
        "false: every layer in one step (layers_per_step 0)",
    ),
    "policy": EngineField(
        "policy",
        _same,
        "vLLM's only value 'default' is the plugin's default policy; any registered policy "
        "name is accepted",
    ),
    "communicator": EngineField(
        "communicator",
        _communicator,
        "vLLM's backends (torch_nccl, torch_gloo, torch_xccl, nixl, pynccl) all mean 'torch': "
        "torch.distributed on the engine's EP group, whatever its backend; or 'deepep'",
    ),
    "enable_migration_batching": EngineField(
        None,
        _bool("enable_migration_batching"),
        "ignored: the plugin's transfer plan already bounds each chunk by staging_bytes and "
        "layers_per_step",
    ),
}

# SGLang's balancer settings; "--enable-eplb" is the launcher's own option (same name).
SGLANG_OPTIONS: dict[str, EngineField] = {
    "--ep-num-redundant-experts": EngineField(
        "num_redundant_experts",
        _int("--ep-num-redundant-experts", 0),
        "same meaning; also passed to SGLang, which allocates the slots",
        passed_on=True,
    ),
    "--eplb-rebalance-num-iterations": EngineField(
        "interval",
        _int("--eplb-rebalance-num-iterations", 1),
        "same meaning; also the window when no window is given (SGLang's recorder buffer "
        "defaults to it)",
    ),
    "--eplb-rebalance-layers-per-chunk": EngineField(
        "layers_per_step",
        _int("--eplb-rebalance-layers-per-chunk", 1),
        "same meaning (SGLang's default, all layers at once, is layers_per_step 0)",
    ),
    "--expert-distribution-recorder-buffer-size": EngineField(
        "window",
        _int("--expert-distribution-recorder-buffer-size (a finite window)", 1),
        "the window; also passed to SGLang, whose recorder keeps working for its own dumps",
        passed_on=True,
    ),
    "--expert-distribution-recorder-mode": EngineField(
        None,
        _same,
        "passed to SGLang: it picks the counting source of SGLang's recorder, which the "
        "balancer counts from as well",
        passed_on=True,
    ),
    "--eplb-algorithm": EngineField(
        "policy",
        _same,
        "'auto' (SGLang's default) keeps the plugin's policy; other values are refused",
        refused="SGLang's placement algorithms do not run under the plugin balancer; choose "
        "the plugin's policy with --eplb-policy ('deepseek' reproduces DeepSeek's algorithm)",
    ),
    "--eplb-min-rebalancing-utilization-threshold": EngineField(
        None,
        _same,
        "1.0 (SGLang's default, no check) accepted; other values refused",
        refused="the plugin has no utilization threshold; it re-plans when the predicted "
        "balancedness gain reaches min_gain (--eplb-config '{\"min_gain\": ...}')",
    ),
    "--ep-dispatch-algorithm": EngineField(
        "dispatch",
        _same,
        "refused: the replica choice is --eplb-dispatch static|local|node|global",
        refused="the plugin balancer chooses replicas itself: use --eplb-dispatch "
        "static|local|node|global (docs/dispatch.md)",
    ),
}

# Values of refused SGLang options that mean "SGLang's default", which the plugin matches.
SGLANG_HARMLESS = {
    "--eplb-algorithm": ("auto",),
    "--eplb-min-rebalancing-utilization-threshold": ("1", "1.0"),
}


def fields_from_json(
    values: dict, our_fields: list[str]
) -> tuple[list[tuple[str, str, object]], list[str]]:
    """EplbConfig field values from an ``--eplb-config`` object.

    Args:
        values: JSON object; keys are EplbConfig field names or vLLM ``EPLBConfig`` keys.
        our_fields: ``EplbConfig.field_names()``.
    Returns:
        ([(key as given, field, value)], [notes on keys accepted but ignored]).
    Raises:
        ValueError: an unknown key or a bad value, named.
    """
    if not isinstance(values, dict):
        raise ValueError(f"--eplb-config must be a JSON object, got {values!r}")
    out: list[tuple[str, str, object]] = []
    notes: list[str] = []
    for key, value in values.items():
        entry = VLLM_FIELDS.get(key)
        if entry is None:
            if key not in our_fields:
                known = sorted(set(our_fields) | set(VLLM_FIELDS))
                raise ValueError(f"--eplb-config: unknown key {key!r}; known: {', '.join(known)}")
            out.append((key, key, value))
            continue
        converted = entry.convert(value)
        if entry.field is None or entry.field not in our_fields:
            why = entry.note if entry.field is None else "not supported by this version"
            notes.append(f"--eplb-config {key}: {why}; ignored")
            continue
        out.append((key, entry.field, converted))
    return out, notes


__all__ = ["VLLM_FIELDS", "SGLANG_OPTIONS", "SGLANG_HARMLESS", "EngineField", "fields_from_json"]
