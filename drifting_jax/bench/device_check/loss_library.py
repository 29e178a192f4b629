"""The `losses` check: the loss library's fwd+bwd time as a multiple of one distance matmul.

At the ablation shapes and one 4096 x 4096 x 256 group, with the functions of
`drifting_jax.bench.losses` (named loss_library here so the two do not read alike).
That module imports JAX, and so does this one: only the check's child process
imports it (`runner.run_child`, from `runner.CHECK_FUNCTIONS`), never the parent.
"""

from __future__ import annotations

import time

from drifting_jax.bench import losses as loss_bench
from drifting_jax.bench.device_check.child_common import _machine
from drifting_jax.bench.device_check.common import _Record


def check_losses(rec: _Record, args) -> None:
  rec.result["machine"] = _machine()
  if args.cpu_smoke:
    shapes = [dict(B=4, Cg=16, Cp=16, Cn=4, S=32), dict(B=1, Cg=128, Cp=128, Cn=0, S=32)]
    repeats = 3
  else:
    ablation = {s["S"]: s for s in loss_bench.ABLATION_SHAPES}
    # Most informative first, so a short budget still gets the large group.
    shapes = [ablation[256], *loss_bench.LARGE_SHAPES, ablation[64], ablation[768]]
    repeats = 20
  wanted = ("matmul", "log_kde", "corrected", "release")
  rows = []
  rec.phase("started", shapes=rows, candidates=list(wanted), repeats=repeats,
            bandwidths=list(loss_bench.BANDWIDTHS), dtype="float32",
            kernel="laplace (log_kde, corrected); the release's kernel for release")
  for shape in shapes:
    if rows and rec.remaining() < 1.5 * rows[-1]["wall_s"] + 3:
      rec.phase(f"skipped {shape}: {rec.remaining():.0f} s left")
      continue
    start = time.perf_counter()
    gen, pos, neg, w_neg = loss_bench._inputs(shape)
    candidates = loss_bench._candidates(pos, neg, w_neg)
    fns = {name: candidates[name] for name in wanted if name in candidates}
    seconds = loss_bench._time_round_robin(fns, gen, repeats)
    del gen, pos, neg, candidates, fns
    label = " ".join(f"{k}={v}" for k, v in shape.items())
    rows.append({"shape": shape, "label": label, "seconds": seconds,
                 "ratio_to_matmul": {k: v / seconds["matmul"] for k, v in seconds.items()},
                 "release_over_log_kde": seconds["release"] / seconds["log_kde"],
                 "wall_s": time.perf_counter() - start})
    rec.phase(f"timed {label}", shapes=rows)
