#!/usr/bin/env bash
# The GPU check on a machine that may have no network: installs what it lacks from the wheels
# that benchmarks/gpu_wheels.sh downloaded into .whl/ (hydra-core, omegaconf, antlr4; torch,
# timm and the rest are expected there), then runs benchmarks/gpu_check.py on the first GPU.
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: $OUT, else gpu_check_out)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
python=${PYTHON:-python3}
if ! "$python" -c "import hydra, omegaconf" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" benchmarks/gpu_check.py --device cuda --out "$out"
