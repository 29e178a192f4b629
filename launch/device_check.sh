#!/usr/bin/env bash
# The accelerator check in one command: prepares a JAX environment that sees the GPU,
# then runs `python -m drifting_jax.bench.device_check` (paper-scale MNIST, the ImageNet
# ablation step, the release's batch with train.microbatches=auto, the loss library), each check in
# its own time budget, 10 minutes in all.
#
#   bash launch/device_check.sh [--out DIR] [--cpu-smoke] [--dry-run] [device_check flags]
#   bash launch/device_check.sh --fetch-wheels      # where pip reaches PyPI: wheels to carry
#
# device_check flags: --only a,b  --skip a,b  --budget NAME=SECONDS  --mnist-variant NAME
#   --ablation-classes N  --work-dir DIR  (see python -m drifting_jax.bench.device_check -h).
# Results in DIR (default $OUT, else device_check_out/): device_check.json,
# device_check.md, mnist_samples.png and device_check.log.
#
# The Python environment, the first of these that works:
#   1. $DEVICE_PYTHON as it is (no install);
#   2. $DEVICE_VENV (default .venv-device/) from an earlier run, if its jax sees a GPU;
#   3. where pip reaches a package registry: a new $DEVICE_VENV with requirements.txt and
#      jax[cuda12] at the pinned jax version;
#   4. offline (this workplace's lent GPU machines reach no registry): python3 of the
#      machine, if its jax sees a GPU, with the pure-Python packages that image lacks
#      installed from the wheels in $WHEELS into $DEVICE_VENV/site. Make the wheels with
#      --fetch-wheels first and carry the folder with the call.
# --cpu-smoke runs the same checks at toy sizes on the CPU with .venv (no install).
#
# Variables:
#   OUT              default output folder (the device runner sets it)
#   DEVICE_PYTHON    interpreter to use as it is
#   DEVICE_VENV      environment folder (default .venv-device)
#   WHEELS           wheel folder for the offline install (default .whl)
#   PYTHON           base interpreter (default: .venv/bin/python for --cpu-smoke, else python3)
#   CHECK_TIMEOUT_S  hard limit on the checks' run, setup excluded (default 620; 2400 with --cpu-smoke,
#                    whose budgets are CPU seconds: a crowded host slows it down)
#   DRY_RUN=1        print the commands instead of running them (as --dry-run)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Pure-Python packages of requirements.txt that the lent GPU machines' image lacks, as
# its documented package list shows; ott-jax and jaxopt serve the Sinkhorn loss. The
# image's own jax, flax, optax, orbax, numpy and scipy are used.
OFFLINE_PACKAGES=(ml-collections clu mlxtend ott-jax jaxopt)

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
}

die() { echo "device_check.sh: $*" >&2; exit 2; }

# PATH made absolute against the repository root.
abs_path() { case "$1" in /*) echo "$1" ;; *) echo "$root/$1" ;; esac; }

root="$(repo_root)"
cd "$root"
out="${OUT:-device_check_out}"
cpu_smoke=0
fetch_wheels=0
passthrough=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 && -n "$2" ]] || { usage; die "--out needs a folder"; }; out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; [[ -n "$out" ]] || { usage; die "--out needs a folder"; }; shift ;;
    --cpu-smoke) cpu_smoke=1; shift ;;
    --dry-run) export DRY_RUN=1; shift ;;
    --fetch-wheels) fetch_wheels=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --only|--skip|--budget|--mnist-variant|--ablation-classes|--work-dir)
      [[ $# -ge 2 ]] || { usage; die "$1 needs a value"; }
      passthrough+=("$1" "$2"); shift 2 ;;
    --only=*|--skip=*|--budget=*|--mnist-variant=*|--ablation-classes=*|--work-dir=*)
      passthrough+=("$1"); shift ;;
    *) usage; die "unknown argument: $1" ;;
  esac
done
dry="${DRY_RUN:-0}"
venv="${DEVICE_VENV:-.venv-device}"
wheels="${WHEELS:-.whl}"
jax_pin="$(grep -E '^jax==' requirements.txt | cut -d= -f3)"
[[ -n "$jax_pin" ]] || die "requirements.txt pins no jax version (a line jax==X)"
log="$out/device_check.log"

say() {
  echo "device_check.sh: $*" >&2
  [[ "$dry" == "1" ]] || echo "device_check.sh: $*" >>"$log"
}

# The version requirements.txt pins for a package, else the one installed in .venv.
pinned_version() {
  local v
  v="$(grep -iE "^$1==" requirements.txt | head -n 1 | cut -d= -f3 || true)"
  if [[ -z "$v" && -x .venv/bin/python ]]; then
    v="$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true)"
  fi
  echo "$v"
}

if [[ "$fetch_wheels" == "1" ]]; then
  base="$(pick_python)"
  run_cmd mkdir -p "$wheels"
  specs=()
  for name in "${OFFLINE_PACKAGES[@]}"; do
    version="$(pinned_version "$name")"
    if [[ -z "$version" ]]; then
      echo "device_check.sh: $name is neither pinned in requirements.txt nor installed in .venv: skipped" >&2
      continue
    fi
    specs+=("$name==$version")
  done
  # The lent image runs Python 3.12; these wheels are pure Python (py3-none-any) anyway.
  run_cmd "$base" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$wheels" "${specs[@]}"
  if [[ "$dry" != "1" ]]; then
    echo "wheels in $wheels/ ($(du -sh "$wheels" | cut -f1)). On the device runner: command" \
         "'bash launch/device_check.sh --out \"\$OUT\"' with carry [\"$wheels\"] (.whl/ is git-ignored," \
         "so only carry takes it along)."
  fi
  exit 0
fi

if [[ "$dry" != "1" ]]; then
  mkdir -p "$out"
  : >"$log"
fi

# "gpu <jax version> <device kind>" when the interpreter's jax sees a GPU; fails otherwise.
gpu_probe() {
  local answer
  answer="$(timeout 180 "$@" -c '
import jax
d = jax.devices()[0]
print(d.platform, jax.__version__, str(getattr(d, "device_kind", "")).replace(" ", "_"))' 2>/dev/null | tail -n 1)" \
    || return 1
  [[ "$answer" == gpu* ]] || return 1
  echo "$answer"
}

registry_reachable() {
  local tmp
  tmp="$(mktemp -d)"
  if timeout 90 "$1" -m pip download -q --no-deps --retries 0 --timeout 15 -d "$tmp" "jax==$jax_pin" \
      >/dev/null 2>&1; then
    rm -rf "$tmp"; return 0
  fi
  rm -rf "$tmp"; return 1
}

env_mode=""
env_note=""
python=""
if [[ "$cpu_smoke" == "1" ]]; then
  python="$(pick_python)"
  export JAX_PLATFORMS=cpu
  # Toy sizes: compilation is most of the time. Cheaper LLVM passes halve it, and a
  # persistent cache (under the git-ignored .bench/) serves reruns.
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$root/.bench/jax_cache_cpu_smoke}"
  env_mode="cpu-smoke with $python"
  timeout_s="${CHECK_TIMEOUT_S:-2400}"
  passthrough+=(--cpu-smoke)
elif [[ "$dry" == "1" ]]; then
  # Setting up needs probes that run Python; a dry run shows the pinned-install path.
  python="$venv/bin/python"
  run_cmd "${PYTHON:-python3}" -m venv "$venv"
  run_cmd "$venv/bin/pip" install -r requirements.txt "jax[cuda12]==$jax_pin"
  timeout_s="${CHECK_TIMEOUT_S:-620}"
else
  timeout_s="${CHECK_TIMEOUT_S:-620}"
  if [[ -n "${DEVICE_PYTHON:-}" ]]; then
    python="$DEVICE_PYTHON"
    probe="$(gpu_probe "$python")" || die "DEVICE_PYTHON=$python: its jax sees no GPU"
    env_mode="DEVICE_PYTHON as given ($probe)"
  elif [[ -x "$venv/bin/python" ]] && probe="$(gpu_probe "$venv/bin/python")"; then
    python="$venv/bin/python"
    env_mode="$venv reused ($probe)"
  else
    base="${PYTHON:-python3}"
    command -v "$base" >/dev/null || die "no $base on this machine: set PYTHON or DEVICE_PYTHON"
    if registry_reachable "$base"; then
      say "package registry reachable: installing requirements.txt and jax[cuda12]==$jax_pin into $venv"
      rm -rf "$venv"
      "$base" -m venv "$venv" >>"$log" 2>&1 || die "could not create $venv (see $log)"
      "$venv/bin/pip" install -q --upgrade pip >>"$log" 2>&1 || true
      if ! "$venv/bin/pip" install -q -r requirements.txt "jax[cuda12]==$jax_pin" >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "installing into $venv failed (log: $log)"
      fi
      python="$venv/bin/python"
      probe="$(gpu_probe "$python")" || die "jax[cuda12]==$jax_pin installed into $venv but sees no GPU"
      env_mode="new $venv with the pinned jax[cuda12]==$jax_pin ($probe)"
    else
      say "no package registry reachable: using $base's own jax, if it sees a GPU"
      probe="$(gpu_probe "$base")" || die "no registry to install jax[cuda12]==$jax_pin from, and $base's jax" \
        "sees no GPU; set DEVICE_PYTHON to an interpreter whose jax does"
      python="$base"
      site="$(abs_path "$venv")/site"
      shopt -s nullglob
      found=("$wheels"/*.whl)
      shopt -u nullglob
      if [[ ${#found[@]} -gt 0 ]]; then
        mkdir -p "$site"
        "$base" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${found[@]}" \
          >>"$log" 2>&1 || die "installing the wheels of $wheels into $site failed (log: $log)"
      fi
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
      missing="$("$python" -c '
import importlib.util
names = {"ml_collections": "ml-collections", "clu": "clu", "mlxtend": "mlxtend", "flax": "flax",
         "optax": "optax", "orbax.checkpoint": "orbax-checkpoint", "einops": "einops", "msgpack": "msgpack"}
if "ott-jax" in open("requirements.txt").read():
  names.update(ott="ott-jax", jaxopt="jaxopt")
def absent(module):
  try:
    return importlib.util.find_spec(module) is None
  except ImportError:  # its parent package is missing
    return True
print(" ".join(p for m, p in names.items() if absent(m)))' 2>>"$log")" \
        || die "$python could not check its packages (log: $log)"
      if [[ -n "$missing" ]]; then
        die "offline and missing: $missing. 'bash launch/device_check.sh --fetch-wheels', where pip" \
          "reaches PyPI, makes wheels of ${OFFLINE_PACKAGES[*]} to carry in $wheels; others must come with" \
          "$base (or be carried there as wheels too)"
      fi
      env_mode="offline: the machine's $base ($probe) plus $site"
      version="${probe#* }"; version="${version%% *}"
      if [[ "$version" != "$jax_pin" ]]; then
        env_note="jax $version of the machine's image, not the pinned $jax_pin (no registry to install it from)."
      fi
    fi
  fi
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(abs_path "$venv")/jax_cache}"
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
fi

export DEVICE_CHECK_ENV_MODE="$env_mode" DEVICE_CHECK_ENV_NOTE="$env_note"
[[ -z "$env_mode" ]] || say "environment: $env_mode${env_note:+. $env_note}"
cmd=(timeout --kill-after=20 "$timeout_s" "$python" -m drifting_jax.bench.device_check --out "$out"
     "${passthrough[@]}")
if [[ "$dry" == "1" ]]; then
  run_cmd "${cmd[@]}"
else
  set +e
  "${cmd[@]}" 2>&1 | tee -a "$log"
  status="${PIPESTATUS[0]}"
  set -e
  [[ "$status" != "124" && "$status" != "137" ]] || say "the checks ran past ${timeout_s} s and were stopped;" \
    "$out/device_check.json holds what finished"
  exit "$status"
fi
