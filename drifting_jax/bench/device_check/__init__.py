r"""The accelerator check: what the CPU cannot measure, in one short run.

    python -m drifting_jax.bench.device_check [--out DIR] [--cpu-smoke] [--only a,b]
        [--budget NAME=SECONDS ...] [--mnist-variant NAME] [--ablation-classes N]

Normally started by `launch/device_check.sh`, which prepares the environment. The
checks run one after another, each in its own subprocess with its own wall-clock
budget (killed when it runs over), so a slow, crashing or out-of-memory check
cannot take the others' numbers with it:

* `mnist` — the paper-scale MNIST setting, `configs/mnist_dit_s2.py` (its
  `log_kde_gauss` variant where the config has variants), on the embedded
  MNIST-5k digits (tfds cannot download on an offline machine). The real training
  loop runs with the paper's 12,000-step schedule and is stopped (through its
  SIGTERM path: a final checkpoint, then a clean exit) when its time budget is
  used; then samples, the evaluation classifier and the offline metrics, as
  `make demo` does. Reports the steady step time and the projected length of the
  full 12,000-step run.
* `ablation_step` — one training step of the release's
  ImageNet latent ablation (`configs/imagenet_latent_ablation.py`): DiT-B/2
  making 32x32x4 latents, latent-MAE-256 features of generated, positive and
  negative samples, the log-KDE loss, the clipped AdamW update and the EMA, with
  random weights and synthetic latents, at the release's batch (64 classes x 64
  generated, 64 positives, 16 negatives; fewer classes if it does not fit in
  device memory, said so in the output). Reports step time,
  XLA-counted FLOPs, MFU against the device's dense bf16 peak, peak memory and
  the loss's share of the step (the loss alone at the same shapes, and the step
  with the loss replaced by a trivial one).
* `ablation_levers` — the same step with the config's defaults and, timed one
  after the other in one process at the same classes, with each lever of issue
  #35 that changes how it computes on this device (`ablation.LEVERS`: the old
  defaults, the attention kernel, the DiT's and the MAE's remat policies, the log-KDE's
  Pallas kernels); each
  variant's step time over the defaults', compiled memory and loss.
* `ablation_release_batch` — the release's whole batch on this one device with
  the microbatch count (and features kept or recomputed) `train.microbatches="auto"`
  picks.
* `losses` — the loss library's fwd+bwd time as a multiple of one distance
  matmul at the ablation shapes and one 4096 x 4096 x 256 group, with the
  functions of `drifting_jax.bench.losses`.

Output (in --out): `device_check.json`, rewritten after every check, with each
check's `status` ("ok", "timeout" or "error: ...") and numbers; `device_check.md`,
a short summary; `mnist_samples.png`, the sample grid. Scratch files (checkpoints,
per-check records) go to --work-dir (default: a fresh temporary folder), so the
output folder stays small.

`--cpu-smoke` runs the same code at toy sizes on the CPU in about a minute; the
test suite runs it so the check cannot rot.

The parent process never imports JAX: a JAX runtime there would hold device memory
that the checks need. So this package, `runner`, `report` and `common` import
neither JAX nor the checks' modules; the child resolves its check from
`runner.CHECK_FUNCTIONS` (module and function names) with `importlib`, and the
checks' modules import JAX, numpy and the trainer at their top. Import a check's
function from its module (e.g. `from drifting_jax.bench.device_check.mnist import
check_mnist`); this package does not re-export them.

Modules:

* `runner` — the command line, the budgets, one child process per check
  (`run_all`, `run_child`, `main`), the table of checks (`CHECK_FUNCTIONS`);
* `report` — the summary and targets, `device_check.json` and `device_check.md`;
* `mnist`, `ablation`, `loss_library` — the checks, one module each
  (`loss_library` times the functions of `drifting_jax.bench.losses`); imported
  only in the children;
* `common` — what the parent and the checks share, without JAX: the per-check
  record, JSON helpers, the dense bf16 peaks, the defaults the command line names;
* `child_common` — what the checks share that needs JAX: the machine's description.
"""

from __future__ import annotations

from drifting_jax.bench.device_check.runner import (CHECK_FUNCTIONS, CHECKS, DEVICE_BUDGETS_S, RESULT_FILES,
                                                    SMOKE_BUDGETS_S, main, run_all, run_child)

__all__ = ["CHECK_FUNCTIONS", "CHECKS", "DEVICE_BUDGETS_S", "RESULT_FILES", "SMOKE_BUDGETS_S", "main", "run_all",
           "run_child"]
