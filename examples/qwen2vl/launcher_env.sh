# The environment every launcher here needs (sourced, not run): stop on errors, the Ascend
# toolkit when present, and the repository on PYTHONPATH.  Sets ROOT to the repository root.
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# Ascend toolkit when present (NPU machines); nothing to do elsewhere.
if [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then
    source /usr/local/Ascend/ascend-toolkit/set_env.sh
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
