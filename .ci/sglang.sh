#!/usr/bin/env bash
# CI for the SGLang integration, in its own virtual environment (.venv-sglang, about 2.4 GB).
# SGLang cannot be installed with its dependencies on CPU machines (CUDA builds), so it is
# installed with --no-deps on CPU torch, plus only the pure-Python packages that its EPLB,
# expert-location, expert-distribution and plugin modules import (the versions checked here).
# Creates the environment when it is missing, then runs tests/sglang (SGLang's own code) and
# tests/test_sglang_fakes.py. About 1 minute on 2 CPU cores once the environment exists.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv-sglang
if ! "$V/bin/python" -c "import sglang.srt.eplb" >/dev/null 2>&1; then
  python3 -m venv "$V"
  "$V/bin/pip" install -q torch==2.13.0
  "$V/bin/pip" install -q --no-deps sglang==0.5.23
  # what sglang.srt.eplb.* / sglang.srt.plugins import on CPU (pinned: the versions tested)
  "$V/bin/pip" install -q --no-deps \
    triton==3.9.0 numpy==2.4.6 einops==0.8.2 orjson==3.13.0 psutil==7.2.2 pybase64==1.5.1 \
    requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.18 pillow==13.0.0 \
    starlette==1.10.0 anyio==4.16.0 msgspec==0.22.0 pydantic==2.14.3 pydantic_core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 pyzmq==27.3.0 ipython==9.18.1 \
    traitlets==5.16.1 Pygments==2.21.0 aiohttp==3.14.5 aiohappyeyeballs==2.7.1 \
    aiosignal==1.4.0 frozenlist==1.8.0 multidict==7.2.1 attrs==26.1.0 yarl==1.25.1 \
    propcache==0.5.4 transformers==5.19.0 tokenizers==0.23.3 regex==2026.11.15 \
    huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 h11==0.16.0 \
    PyYAML==6.0.3 packaging==26.3 dill==0.4.1 sentencepiece==0.2.3 apache-tvm-ffi==0.1.11 \
    compressed-tensors==0.18.0 loguru==0.7.3 gguf==0.19.0 safetensors==0.8.0 tqdm==4.70.1
  # a CUDA torchvision (the only kind on the index for torch 2.13) breaks `import sglang`;
  # tests/sglang/conftest.py puts an import-only placeholder in its place
  "$V/bin/pip" uninstall -y -q torchvision || true
fi
"$V/bin/pip" install -q pytest pytest-timeout
"$V/bin/pip" install -q --no-deps -e .
# the engine loads the plugin through the entry point setup.py declares
"$V/bin/python" .ci/check_entry_point.py sglang.srt.plugins eplb_plugin.integrations.sglang:register eplb_plugin_sglang_entry_point
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/sglang tests/test_sglang_fakes.py "$@"
