#!/usr/bin/env bash
# One call on a fresh accelerator machine: install what is missing, then run benchmarks/device_suite.py.
#   bash benchmarks/device_suite.sh [--smoke] [--profile DIR] [--out FILE] [--budget-s SECONDS]
# Python: $PYTHON (default: .venv/bin/python if it exists, else python3). With nvidia-smi present and no CUDA jax,
# jax[cuda12] is installed (same jax version range as setup.py); then the package itself (no torch needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if command -v nvidia-smi >/dev/null 2>&1 && ! "$PYTHON" -c "import jax; assert jax.default_backend() == 'gpu'" \
    >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet "jax[cuda12]>=0.10.2,<0.13"
fi
if ! "$PYTHON" -c "import omnimol_jax, grain, jraph" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet -e .
fi
eval "$("$PYTHON" -m omnimol_jax.allocator)"  # mimalloc for XLA:CPU's buffers, as the omnimol program uses
exec "$PYTHON" benchmarks/device_suite.py "$@"
