"""glibc's default malloc against `host_memory.keep_freed_memory`, side by side on the demo's training.

    python -m drifting_jax.bench.host_memory [--steps 150] [--rounds 2] [--out bench_host_memory.json]

Each round trains `configs/mnist_demo.py` for `--steps` steps twice, in fresh
processes of `drifting_jax.main`, once with glibc's defaults
(`DRIFTING_JAX_MALLOC=default`) and once with the setting `main` applies, in
alternating order so a change of the machine's load hits both. Per run: wall,
user and system CPU seconds and minor page faults of the process (getrusage), and
whether the two runs' final EMA parameters are bit-for-bit the same (they must be:
the allocator does not touch the arithmetic). Prints the per-run table and the
ratios of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time


from drifting_jax import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[2]
SETTINGS = ("default", "keep_freed_memory")


def _train(workdir: pathlib.Path, steps: int, setting: str) -> dict:
  env = dict(os.environ)
  env.pop(host_memory.OPT_OUT, None)
  if setting == "default":
    env[host_memory.OPT_OUT] = "default"
  cmd = [sys.executable, "-m", "drifting_jax.main", "--config=configs/mnist_demo.py", f"--workdir={workdir}",
         f"--config.train.total_steps={steps}", f"--config.checkpoint.every_steps={steps}",
         "--config.log.sample_grid_every=0", "--config.checkpoint.async_save=False"]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return {"setting": setting, "wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
          "sys_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt,
          "load": os.getloadavg()[0]}


def _params(workdir: pathlib.Path) -> bytes:
  return (workdir / "params_ema" / "ema_params.msgpack").read_bytes()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default="bench_host_memory.json")
  args = parser.parse_args(argv)
  runs, identical = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
      params = {}
      for setting in order:
        workdir = pathlib.Path(tmp) / f"r{r}_{setting}"
        runs.append({"round": r, **_train(workdir, args.steps, setting)})
        params[setting] = _params(workdir)
        print(json.dumps(runs[-1]), flush=True)
      identical.append(params["default"] == params["keep_freed_memory"])
  median = {s: {k: statistics.median(x[k] for x in runs if x["setting"] == s)
                for k in ("wall_s", "user_s", "sys_s", "minor_faults")} for s in SETTINGS}
  ratios = {k: median["keep_freed_memory"][k] / median["default"][k] for k in median["default"]}
  report = {"steps": args.steps, "runs": runs, "median": median, "ratio_keep_over_default": ratios,
            "final_params_identical": identical}
  print(f"\n{'':>18} {'wall s':>8} {'user s':>8} {'sys s':>8} {'minor faults':>13}")
  for s in SETTINGS:
    m = median[s]
    print(f"{s:>18} {m['wall_s']:8.1f} {m['user_s']:8.1f} {m['sys_s']:8.1f} {m['minor_faults']:13,.0f}")
  print(f"{'ratio':>18} {ratios['wall_s']:8.2f} {ratios['user_s']:8.2f} {ratios['sys_s']:8.2f} "
        f"{ratios['minor_faults']:13.3f}")
  print(f"final EMA parameters bit-identical in every round: {all(identical)}")
  pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
