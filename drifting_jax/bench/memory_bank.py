"""Memory-bank push + sample: vectorised bank vs a per-sample Python loop vs the copy floor.

    python -m drifting_jax.bench.memory_bank [--out .bench/memory_bank.json] [--repeats 5]

One "step" pushes `push` data samples into a per-class bank and draws `pos` samples
for each of `classes` classes (the trainer's use). Three ways are timed in the same
run, interleaved so that machine noise hits them alike (median over repeats):

* `vectorised`: `drifting_jax.train.memory_bank.MemoryBank`;
* `loop`: the release's algorithm, one Python iteration per pushed sample and per
  sampled class (an independent re-statement, as in tests/test_memory_bank.py);
* `copy floor`: one `np.copyto` of as many bytes as the step must move (pushed
  samples written once, sampled samples read once and written once), timed in
  the same round-robin loop so that it sees the same machine load.

Targets (issue "trainer"): >= 20x faster than the loop for MNIST-sized samples at
4096 samples per step; within 2x of the copy floor for 32x32x4 latents.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import numpy as np

from drifting_jax.train.memory_bank import MemoryBank

CASES = [
    # MNIST pixels: 10 classes, 4096 samples pushed and 4096 drawn per step.
    dict(name="mnist_28x28x1", shape=(28, 28, 1), num_classes=10, slots=1024, push=4096, classes=8, pos=512),
    # The release's latent ablation: 1000 classes x 128 slots, 64 classes x 64 positives.
    dict(name="latent_32x32x4", shape=(32, 32, 4), num_classes=1000, slots=128, push=4096, classes=64, pos=64),
]
MIN_SPEEDUP_OVER_LOOP = 20.0
MAX_OVER_COPY_FLOOR = 2.0


class LoopBank:
  """The per-sample loop the release runs (push and sample)."""

  def __init__(self, num_classes, slots, shape):
    self.buffer = np.zeros((num_classes, slots, *shape), np.float32)
    self.ptr = np.zeros(num_classes, np.int64)
    self.count = np.zeros(num_classes, np.int64)
    self.slots = slots

  def push(self, samples, labels):
    for i in range(len(labels)):
      c = int(labels[i])
      self.buffer[c, self.ptr[c]] = samples[i]
      self.ptr[c] = (self.ptr[c] + 1) % self.slots
      if self.count[c] < self.slots:
        self.count[c] += 1

  def sample(self, classes, k, rng):
    index = np.empty((len(classes), k), np.int64)
    for i, c in enumerate(classes):
      valid = int(self.count[c])
      index[i] = rng.choice(valid, k, replace=valid < k)
    return self.buffer[np.asarray(classes)[:, None], index]


def run_case(case: dict, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  shape, n = case["shape"], case["push"]
  samples = rng.normal(size=(n, *shape)).astype(np.float32)
  labels = rng.integers(0, case["num_classes"], size=n)
  classes = np.sort(rng.choice(np.unique(labels), size=case["classes"], replace=False))  # populated ones
  fast = MemoryBank(case["num_classes"], case["slots"], shape)
  loop = LoopBank(case["num_classes"], case["slots"], shape)
  for bank in (fast, loop):  # warm: every class populated, pages touched
    bank.push(samples, labels)
    bank.push(samples, labels)

  def step_fast():
    fast.push(samples, labels)
    return fast.sample(classes, case["pos"])

  def step_loop():
    loop.push(samples, labels)
    return loop.sample(classes, case["pos"], rng)

  sample_bytes = samples[0].nbytes
  moved = n * sample_bytes + 2 * case["classes"] * case["pos"] * sample_bytes
  copy_src = np.ones(moved // 8, np.float32)  # copyto reads and writes: moved bytes in all
  copy_dst = np.empty_like(copy_src)
  np.copyto(copy_dst, copy_src)

  def step_copy():
    np.copyto(copy_dst, copy_src)

  timings = {"vectorised": [], "loop": [], "copy": []}
  for _ in range(repeats):
    for name, fn in (("vectorised", step_fast), ("loop", step_loop), ("copy", step_copy)):
      start = time.perf_counter()
      fn()
      timings[name].append(time.perf_counter() - start)
  vec, lp, floor = (statistics.median(timings[k]) for k in ("vectorised", "loop", "copy"))
  return {**{k: v for k, v in case.items() if k != "shape"}, "sample_shape": list(shape),
          "bank_bytes": fast.nbytes, "bytes_moved": moved, "vectorised_s": vec, "loop_s": lp,
          "copy_floor_s": floor, "copy_GBps": moved / floor / 1e9, "speedup_over_loop": lp / vec,
          "over_copy_floor": vec / floor}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=".bench/memory_bank.json")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  results = [run_case(case, args.repeats) for case in CASES]
  mnist, latent = results
  targets = {
      "speedup_over_loop_mnist": {"measured": mnist["speedup_over_loop"], "target": f">= {MIN_SPEEDUP_OVER_LOOP}",
                                  "met": mnist["speedup_over_loop"] >= MIN_SPEEDUP_OVER_LOOP},
      "over_copy_floor_latent": {"measured": latent["over_copy_floor"], "target": f"<= {MAX_OVER_COPY_FLOOR}",
                                 "met": latent["over_copy_floor"] <= MAX_OVER_COPY_FLOOR},
  }
  report = {"machine": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
            "cases": results, "targets": targets}
  print(f"{'case':16s} {'vectorised ms':>14s} {'loop ms':>10s} {'floor ms':>10s} {'x loop':>8s} {'x floor':>8s}")
  for r in results:
    print(f"{r['name']:16s} {1e3 * r['vectorised_s']:14.2f} {1e3 * r['loop_s']:10.2f} "
          f"{1e3 * r['copy_floor_s']:10.2f} {r['speedup_over_loop']:8.1f} {r['over_copy_floor']:8.2f}")
  for name, t in targets.items():
    print(f"target {name}: {t['measured']:.2f} ({t['target']}) {'met' if t['met'] else 'MISSED'}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
