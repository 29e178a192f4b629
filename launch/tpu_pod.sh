#!/usr/bin/env bash
# A Cloud TPU VM pod slice: copy the repo to every worker, install, and run the same
# command on all workers (`--worker=all`). On TPU, jax.distributed.initialize()
# discovers the pod by itself, so no coordinator flags are passed.
#
# Usage:
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh CONFIG WORKDIR [main.py flags ...]
#
# Variables:
#   TPU_NAME    the TPU VM (required)
#   ZONE        its zone (required)
#   PROJECT     gcloud project (default: gcloud's configured one)
#   REMOTE_DIR  where the repo goes on the workers (default ~/drifting_jax)
#   SETUP=0     skip copy + install (rerun on an already prepared pod)
#   JAX_TPU_PIN jax[tpu] version spec (default: the pinned jax version)
#   DRY_RUN=1   print the gcloud commands instead of running them
# WORKDIR should be a gs:// path so that all workers, a resumed (possibly resized)
# slice and the eval job see the same checkpoints: orbax writes there through
# google-cloud-storage (installed below), clu and our own files through etils.epath.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG WORKDIR [main.py flags ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
config="$1"; workdir="$2"; shift 2
remote_dir="${REMOTE_DIR:-~/drifting_jax}"
root="$(repo_root)"
jax_version="$(grep -E '^jax==' "$root/requirements.txt" | cut -d= -f3)"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")
ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --worker=all)

if [[ "${SETUP:-1}" == "1" ]]; then
  run_cmd tar -C "$root" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/drifting_jax.tgz .
  run_cmd gcloud compute tpus tpu-vm scp /tmp/drifting_jax.tgz "$TPU_NAME:/tmp/drifting_jax.tgz" \
    --zone="$ZONE" "${project_flag[@]}" --worker=all
  run_cmd "${ssh[@]}" --command="mkdir -p $remote_dir && tar -xzf /tmp/drifting_jax.tgz -C $remote_dir && \
    cd $remote_dir && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && \
    .venv/bin/pip install -q 'jax[tpu]==${JAX_TPU_PIN:-$jax_version}' google-cloud-storage"
fi
run_cmd "${ssh[@]}" --command="cd $remote_dir && JAX_PLATFORMS=tpu .venv/bin/python -m drifting_jax.main \
  --config=$config --workdir=$workdir --tpu_pod $*"
