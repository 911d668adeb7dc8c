#!/usr/bin/env bash
# Download (never install) the pinned DeepEP wheel that tests/test_deepep_conformance.py reads
# as text: SGLang's binary distribution `sgl-deep-ep` (imported as `deep_ep`, DeepEP 2.1.0
# inside). The wheel needs CUDA 13 and torch 2.14 at import time, so nothing in it is
# imported or executed; the test reads its Python sources with `ast`.
# Idempotent: does nothing when the wheel is already in the cache.
# Usage: bash .ci/deepep_wheel.sh [python]   (python: a Python with pip; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.1.2.post1
CACHE=.ci/cache/deepep
WHEEL="$CACHE/sgl_deep_ep-$VERSION-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
if [ -f "$WHEEL" ]; then
  exit 0
fi
PY="${1:-python3}"
mkdir -p "$CACHE"
TMP="$(mktemp -d "$CACHE/tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
# the platform flags make the download independent of the host's own Python and platform
"$PY" -m pip download -q --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311 \
  -d "$TMP" "sgl-deep-ep==$VERSION"
mv "$TMP"/sgl_deep_ep-"$VERSION"-*.whl "$WHEEL"
echo "deepep_wheel: $WHEEL"
