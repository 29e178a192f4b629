"""Generator and MAE-feature throughput (forward + backward), and MFU on accelerators.

    python -m drifting_jax.bench.models [--out .bench/models.json] [--size auto|small|paper]

For each model the jitted training-shaped computation is timed after compilation
(median of repeats):

* generator: samples = G(labels, cfg, noise); loss = mean(samples^2); grad w.r.t.
  the generator params (the generator's share of a drifting step);
* MAE features: the release's activation extractor on a batch, with the gradient
  w.r.t. the input (what the drifting step back-propagates through the frozen MAE).

FLOPs come from XLA's cost analysis of the compiled computation, so the model
FLOPs utilisation (MFU) is `flops / time / peak`. Peak is known for the GPUs in
`PEAK_BF16_TFLOPS` (dense bf16); on CPU no MFU is printed, only samples/s and
achieved GFLOP/s. `--size auto` picks the small CPU configs on CPU and the paper's
DiT-B/2 / MAE-256 on an accelerator (target there: MFU >= 40% for DiT-B/2 in bf16).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from drifting_jax.models import generator as generator_lib, mae as mae_lib

# Dense bf16 peak of one device, TFLOP/s (vendor figures, without sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                    "TPU v5p": 459.0}
SIZES = {
    # name: (generator config name + overrides, generator batch, MAE config, MAE batch)
    "small": (("tiny", {}), 64, ("tiny", {}), 32),
    "paper": (("DiT-B/2", {}), 256, ("latent-256", {}), 256),
}


def _peak_tflops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # cost analysis is best effort on some backends
    return None


def _report(name, seconds, batch, flops, peak) -> dict:
  out = {"model": name, "batch": batch, "seconds": seconds, "samples_per_sec": batch / seconds,
         "gflops_per_step": flops / 1e9 if flops else None,
         "achieved_tflops": flops / seconds / 1e12 if flops else None}
  if flops and peak:
    out["mfu"] = flops / seconds / (peak * 1e12)
  return out


def bench_generator(config_name: str, overrides: dict, batch: int, repeats: int, peak) -> dict:
  model_config = generator_lib.model_config_for(config_name, **overrides)
  module = generator_lib.build_module(model_config)
  args, kwargs = generator_lib.example_inputs(model_config, batch_size=1)
  params = jax.jit(lambda r: module.init({"params": r}, *args, **kwargs)["params"])(jax.random.key(0))
  labels = jnp.arange(batch, dtype=jnp.int32) % model_config["num_classes"]
  cfg = jnp.ones((batch,), jnp.float32)

  def loss(p, rng):
    out = module.apply({"params": p}, labels, cfg, rngs={"noise": rng})["samples"]
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss))
  rng = jax.random.key(1)
  flops = _flops(step.lower(params, rng).compile())
  seconds = _time(step, (params, rng), repeats)
  return {**_report(f"generator {config_name}", seconds, batch, flops, peak),
          "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}


def bench_mae(config_name: str, overrides: dict, batch: int, repeats: int, peak) -> dict:
  model_config = mae_lib.model_config_for(config_name, **overrides)
  module = mae_lib.build_module(model_config)
  params = jax.jit(lambda r: mae_lib.init_params(module, r, (32, 32, module.in_channels)))(jax.random.key(0))
  x = jax.random.normal(jax.random.key(2), (batch, 32, 32, module.in_channels), jnp.float32)

  def loss(inputs):
    feats = mae_lib.activations(module, params, inputs, patch_mean_size=(2, 4), patch_std_size=(2, 4),
                                use_std=True, use_mean=True, every_k_block=2)
    return sum(jnp.mean(jnp.square(v)) for v in feats.values())

  step = jax.jit(jax.value_and_grad(loss))
  flops = _flops(step.lower(x).compile())
  seconds = _time(step, (x,), repeats)
  return {**_report(f"MAE features {config_name}", seconds, batch, flops, peak),
          "params": int(sum(np.prod(v.shape) for v in jax.tree.leaves(params)))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=".bench/models.json")
  parser.add_argument("--size", default="auto", choices=("auto", *SIZES))
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  size = args.size if args.size != "auto" else ("small" if device.platform == "cpu" else "paper")
  (gen_name, gen_over), gen_batch, (mae_name, mae_over), mae_batch = SIZES[size]
  peak = _peak_tflops(device)
  results = [bench_generator(gen_name, gen_over, gen_batch, args.repeats, peak),
             bench_mae(mae_name, mae_over, mae_batch, args.repeats, peak)]
  report = {"device": f"{device.platform} {getattr(device, 'device_kind', '')}", "size": size,
            "peak_bf16_tflops": peak, "results": results}
  print(f"device: {report['device']}  size: {size}")
  for r in results:
    mfu = f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
    gflops = f"{r['achieved_tflops'] * 1e3:.1f} GFLOP/s" if r["achieved_tflops"] else "n/a"
    print(f"{r['model']:28s} batch {r['batch']:4d}  {r['samples_per_sec']:9.1f} samples/s  {gflops}{mfu}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
