#!/usr/bin/env bash
# One machine, all of its devices (CPU, one or more GPUs, or a single TPU VM host).
#
#   launch/local.sh CONFIG WORKDIR [--mode=train] [--config.a.b=value ...]
#
# Variables:
#   PYTHON        interpreter (default: .venv/bin/python, else python3)
#   JAX_PLATFORMS cpu | cuda | tpu (default: whatever JAX finds)
#   CPU_DEVICES   on CPU, how many virtual devices to expose (default 1) so the
#                 mesh code runs as it would on N accelerators
#   XLA_FLAGS     passed through; CPU_DEVICES adds the host-platform device count
#   DRY_RUN=1     print the command instead of running it
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [main.py flags ...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2

if [[ -n "${CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi
cd "$(repo_root)"
run_cmd "$(pick_python)" -m drifting_jax.main --config="$config" --workdir="$workdir" "$@"
