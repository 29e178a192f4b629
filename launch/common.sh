# Shared helpers for the launch scripts (sourced, not run).
#
# DRY_RUN=1 makes every script print the commands it would run instead of running
# them, so the cluster scripts can be checked on a laptop.

# Runs (or, with DRY_RUN=1, prints) a command.
run_cmd() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

# The repository root (the directory holding drifting_jax/), whatever the caller's cwd.
repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

# The Python to use: $PYTHON, else the repo's .venv, else python3.
pick_python() {
  local root
  root="$(repo_root)"
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON";
  elif [[ -x "$root/.venv/bin/python" ]]; then echo "$root/.venv/bin/python";
  else echo python3; fi
}
