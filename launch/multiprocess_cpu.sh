#!/usr/bin/env bash
# N processes on 127.0.0.1, each with its own CPU devices: the multi-host code path
# (jax.distributed, per-host data, global arrays, joint checkpoints) on one machine.
#
#   launch/multiprocess_cpu.sh CONFIG WORKDIR [main.py flags ...]
#
# Variables:
#   NUM_PROCESSES         processes to start (default 2)
#   DEVICES_PER_PROCESS   CPU devices per process (default 2)
#   PORT                  coordinator port on 127.0.0.1 (default 12355)
#   PYTHON                interpreter (default: .venv/bin/python, else python3)
#   LOG_DIR               per-process logs (default WORKDIR/logs)
#   DRY_RUN=1             print the commands instead of running them
# Exits non-zero if any process fails; the others are then stopped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [main.py flags ...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
num_processes="${NUM_PROCESSES:-2}"
devices="${DEVICES_PER_PROCESS:-2}"
port="${PORT:-12355}"
log_dir="${LOG_DIR:-$workdir/logs}"
python="$(pick_python)"
cd "$(repo_root)"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"

[[ "${DRY_RUN:-0}" == "1" ]] || mkdir -p "$log_dir"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < num_processes; i++)); do
  cmd=("$python" -m drifting_jax.main --config="$config" --workdir="$workdir"
       --coordinator_address="127.0.0.1:${port}" --num_processes="$num_processes" --process_id="$i" "$@")
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    run_cmd "${cmd[@]}"
  else
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
    pids+=("$!")
  fi
done

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; its log: $log_dir/process_$i.log" >&2
    tail -n 30 "$log_dir/process_$i.log" >&2 || true
    status=1
    cleanup
  fi
done
exit "$status"
