#!/usr/bin/env bash
# The GPU suite from the checkout on a machine where jax (CUDA), flax, optax, orbax,
# tensorstore, numpy and torch are preinstalled and nothing can be downloaded: pure-Python
# dependencies missing there come from .gpu_wheels/ (`make gpu-wheels` fetches them here).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/bench_gpu.sh OUT_DIR [gpu_suite options]}
shift
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if ! python3 -c "import tyro" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$site" .gpu_wheels/*.whl
fi
PYTHONPATH=".:$site${PYTHONPATH:+:$PYTHONPATH}" python3 -m at1_jax.bench.gpu_suite "$out" "$@"
