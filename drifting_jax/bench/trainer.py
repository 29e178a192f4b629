"""Training-loop throughput on `configs/mnist_tiny.py`: steps/s and the host's share.

    python -m drifting_jax.bench.trainer [--steps 60] [--out bench_trainer.json]

Runs the real loop (data, memory banks, jitted step, logging, one checkpoint) in a
temporary workdir. `host_fraction` is the wall time spent in host work (drawing
data, the banks, building global arrays, logging) over the total, as the loop logs
it; the target is < 5% or fully overlapped with the device.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax

from configs import mnist_tiny
from drifting_jax.train import trainer


def run(steps: int) -> dict:
  config = mnist_tiny.get_config()
  config.train.total_steps = steps
  config.log.every_steps = max(1, steps // 6)
  config.log.sample_grid_every = 0
  config.checkpoint.every_steps = steps
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    trainer.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    lines = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  # The first window includes compilation; steady state is the rest.
  progress = [l for l in lines if "steps_per_sec" in l]
  lines = [l for l in lines if "loss" in l]
  steady = lines[1:] or lines
  window = config.log.every_steps
  host_fraction = sum(l["host_fraction"] for l in steady) / len(steady)
  steps_per_sec = [l["steps_per_sec"] for l in progress[1:] or progress]
  return {"steps": steps, "wall_seconds_incl_compile": wall, "log_window": window,
          "steady_steps_per_sec": sum(steps_per_sec) / len(steps_per_sec) if steps_per_sec else None,
          "steady_host_fraction": host_fraction, "device": str(jax.devices()[0].device_kind)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--out", default=".bench/trainer.json")
  args = parser.parse_args(argv)
  result = run(args.steps)
  print(json.dumps(result, indent=1))
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
