#!/usr/bin/env bash
# The evaluation job beside a training run: follows WORKDIR and evaluates every new
# checkpoint once (restartable: evaluated steps are recorded in WORKDIR/eval/).
#
#   launch/eval_job.sh CONFIG WORKDIR [--config.eval.cfg_scales=...] [...]
#
# Use the training run's CONFIG. Variables:
#   PYTHON, JAX_PLATFORMS, CPU_DEVICES, DRY_RUN   as in launch/local.sh
#   POLL_S      seconds between looks at the workdir (default: config eval.watch_poll_s)
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [main.py flags ...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
extra=()
[[ -n "${POLL_S:-}" ]] && extra+=(--config.eval.watch_poll_s="$POLL_S")
exec "$here/local.sh" "$config" "$workdir" --mode=watch "${extra[@]}" "$@"
