#!/usr/bin/env bash
# Download here the wheels scripts/device_check.sh needs on a lent H200 into the git-ignored .whl/.
# Its image (Python 3.12, x86-64) has torch, transformers, safetensors, numpy, pillow, tqdm, tensorboard;
# it lacks megatron-core (needs only torch, numpy, packaging: all there). flash-attn publishes no binary
# wheel on PyPI (source only, hours to build), so its row is skipped there unless a wheel is put in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/megatron_core-*.whl
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$@"
}
download megatron-core==0.16.1 || { echo "error: could not download megatron-core 0.16.1 (is PyPI reachable?)" >&2; exit 2; }
if download flash-attn 2>/dev/null; then echo "flash-attn: binary wheel found"; else
  echo "flash-attn: no binary wheel on PyPI for cp312 x86-64 (its flash row will be SKIP on the device)"; fi
ls -l .whl
du -sh .whl
