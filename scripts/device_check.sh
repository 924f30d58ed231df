#!/usr/bin/env bash
# One prepared accelerator check (issue 13): GPU-only tests, then the MFU of a 2B-shaped model; one table.
#
#   bash scripts/device_check.sh             # on a CUDA GPU (a lent H200), under 9 minutes
#   bash scripts/device_check.sh --dry-run   # here, on the CPU (fp32, sdpa, tiny MFU loop), under 2 minutes
#
# On a lent H200 (its image has torch, transformers; megatron-core travels as a wheel):
#   here, once:  bash scripts/device_check_wheels.sh          (fills the git-ignored .whl/)
#   device tool: run(carry=[".whl"], timeout_s=570, command=
#     "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
#      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; bash scripts/device_check.sh 2>&1
#      | tee $OUT/device_check.log")   (one line; scripts/device_check.py RUN_COMMAND holds it exactly)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
LIMIT="${DEVICE_CHECK_TIMEOUT:-540}"  # seconds: the whole check, inside the 9 minutes
timeout --kill-after=10 "$LIMIT" "$PY" scripts/device_check.py "$@"
rc=$?
[ "$rc" = 124 ] && echo "error: device check stopped after ${LIMIT} s (DEVICE_CHECK_TIMEOUT)" >&2
exit "$rc"
