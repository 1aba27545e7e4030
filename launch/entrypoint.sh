#!/usr/bin/env bash
# One training process: common environment, then the trainer, with SIGTERM passed on.
#   launch/entrypoint.sh --config configs/at1.py [--config.section.field=value ...]
# Used by the SLURM and Kubernetes manifests. Secrets come only from the environment.
# Exit codes: the trainer's; but 143 (AT1_PREEMPTED_EXIT) when this process was sent SIGTERM
# and the trainer stopped cleanly after its checkpoint, so schedulers see "not finished"
# (a Kubernetes Job would otherwise count the index as succeeded) and restart the run.
set -euo pipefail

cache="${AT1_CACHE_DIR:-${TMPDIR:-/tmp}/at1-cache}"
# A persistent compilation cache makes restarts after preemption skip most compiling.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$cache/jax}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
mkdir -p "$JAX_COMPILATION_CACHE_DIR"
# Huge pages for malloc's large blocks: XLA:CPU's per-step temporaries otherwise pay a page
# fault per 4 KiB (the at1 CPU step 1.6x slower); harmless for GPU runs.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"

# S3: credentials are read from env only; fail early on half-set credentials.
if [[ -n "${AWS_ACCESS_KEY_ID:-}" && -z "${AWS_SECRET_ACCESS_KEY:-}" ]]; then
  echo "entrypoint: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not" >&2
  exit 2
fi
export AWS_REGION="${AWS_REGION:-us-east-1}"

# Kubernetes auto-detection in jax.distributed imports the `kubernetes` package.
if [[ -n "${KUBERNETES_SERVICE_HOST:-}" && -n "${JOB_COMPLETION_INDEX:-}" ]]; then
  "${PYTHON:-python}" -c "import kubernetes" 2>/dev/null || {
    echo "entrypoint: pip install kubernetes (jax[k8s]) for JAX's Kubernetes auto-detection" >&2
    exit 2
  }
fi

"${PYTHON:-python}" -m at1_jax.train "$@" &
child=$!
stopped=0
# Single quotes: $child is read when the signal arrives. An inline trap rather than a handler
# function, which shellcheck (SC2317/SC2329) cannot see being called.
trap 'stopped=1; kill -TERM "$child" 2>/dev/null || true' TERM INT
rc=0
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break # wait was only interrupted by a signal
done
if [[ $stopped == 1 && $rc == 0 ]]; then
  echo "entrypoint: stopped by SIGTERM after a checkpoint; rerun to resume" >&2
  exit "${AT1_PREEMPTED_EXIT:-143}"
fi
exit "$rc"
