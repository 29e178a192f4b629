#!/usr/bin/env bash
# Before renting a TPU slice or GPU hosts: compile the run's programs for them here, on a CPU machine.
#
#   launch/compile_check.sh CONFIG TARGET [WORKDIR] [--config.a.b=value ...]
#   launch/compile_check.sh configs/imagenet_latent_ablation.py v6e-64
#   launch/compile_check.sh configs/imagenet_latent_sota_b.py v6e-128 runs/compile/sota_b
#   launch/compile_check.sh configs/imagenet_latent_ablation.py h100x8 --config.mesh.data=4 --config.mesh.fsdp=2
#
# TARGET is a slice as the cloud names it (v4-32, v5e-256, v5p-128, v6e-64, ...) or
# H100 SXM hosts of 8 GPUs (h100x8 one host, h100x16 two, ...). GPU targets need the
# CUDA plugin, not in requirements.txt: pip install jax-cuda12-plugin==<jax version>
# (no GPU, no CUDA libraries). What the GPU compiler needs without a GPU (Triton GEMMs
# off) is passed with each compile by the compile mode (drifting_jax/scale/targets.py).
# Writes WORKDIR/compile_report.json (default runs/compile/<config>_<target>) and
# prints per-chip memory with a fits / does-not-fit verdict, FLOPs (compiler and
# analytical), the compiler's estimated step time and run length, the loss's share
# and the collectives. Needs libtpu (requirements.txt pins 0.0.52; 0.0.42 crashes on v6e at small per-chip batches, docs/scaling.md), no TPU.
# A DiT-B/2 step with the 431M-parameter MAE takes 10-25 minutes and ~13 GB of RAM
# on a 2-core machine; --config.compile.loss_share=false halves that.
#
# Variables: PYTHON, DRY_RUN=1 (print the command) as in launch/local.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG TARGET [WORKDIR] [main.py flags ...]" >&2
  exit 2
fi
config="$1"; target="$2"; shift 2
name="$(basename "${config%%:*}" .py)"
workdir="runs/compile/${name}_${target}"
if [[ $# -gt 0 && "$1" != --* ]]; then
  workdir="$1"; shift
fi
# The compiler needs no TPU backend: JAX itself runs on the CPU; libtpu only describes
# the slice and compiles for it (TPU_SKIP_MDS_QUERY: never ask a cloud metadata server).
# The CUDA plugin likewise describes GPUs only while JAX runs on the CPU (with a CUDA
# backend asked for it would try to start the driver and refuse the description).
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export TPU_SKIP_MDS_QUERY=1
cd "$(repo_root)"
run_cmd "$(pick_python)" -m drifting_jax.main --mode=compile --config="$config" --workdir="$workdir" \
  --config.compile.target="$target" "$@"
