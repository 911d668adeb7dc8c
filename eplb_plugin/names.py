"""Names the ``eplb`` parsers show, importable without torch.

``eplb --help`` and every subcommand's ``--help`` build their parsers without importing torch
(which takes seconds), so the choices and defaults they list live here. The modules that
implement them take these same objects; the registries that need torch to exist (policies,
step-time presets) keep their own tables, and tests/test_cli_startup.py checks that the
names here match them.
"""

from __future__ import annotations

import sys

# replica choice per token (eplb_plugin.dispatch, docs/dispatch.md)
DISPATCH_MODES = ("static", "local", "node", "global")
# Water-fill sweeps of the device op's default; the model must use the same number.
WATERFILL_ITERS = 8
# Shift detector threshold of EplbConfig and SimConfig (eplb_plugin.shift; 0 = off), chosen
# on the shared and synthetic replays (docs/benchmarks/policy.md, "Re-planning on a shift").
SHIFT_THRESHOLD = 4.0
# windows a plan sees: its own and the earlier plans' since the last shift (plan_memory.py)
MEMORY_WINDOWS = 2
# host memory per remembered window: 8 runs x L x E float64 (about 1 MB at DeepSeek-V3's shape)
MAX_MEMORY_WINDOWS = 64
# how the simulator counts a step's tokens per slot (eplb_plugin.simulate.SimConfig.rounding)
ROUNDINGS = ("fractional", "tokens")
# load predictors (eplb_plugin.predictor)
PREDICTORS = ("window", "ema")
# how `eplb export` reads tensors (eplb_plugin.export)
COPY_MODES = ("auto", "read", "safe_open")
# the policies registered by eplb_plugin.policies, in available_policies() order
BUILTIN_POLICIES = ("deepseek", "default")
# files a load trace is read from and written to (eplb_plugin.traces)
LOAD_SUFFIXES = (".pt", ".pth", ".npy", ".npz", ".safetensors")
# presets of the step-time model (eplb_plugin.costmodel.HARDWARE / MODELS), in table order
HARDWARE_PRESETS = ("h800-ib400-multinode", "h200-nvlink-node", "h200-ib400-multinode")
MODEL_PRESETS = ("deepseek-v3", "deepseek-v2-lite")
# DeepSeek-V2-Lite routed expert in bf16: gate, up (2048 x 1408) and down (1408 x 2048).
DSV2_LITE_EXPERT_BYTES = 3 * 2048 * 1408 * 2


def policy_names() -> tuple[str, ...]:
    """Policy names for help texts: ``available_policies()`` once the registry is imported
    (a caller may have registered its own), else the built-in ones without importing torch."""
    policies = sys.modules.get("eplb_plugin.policies")
    if policies is None:
        return BUILTIN_POLICIES
    return tuple(policies.available_policies())
