r"""The objective alone, per feature group, compiled for one TPU chip: libtpu's bytes and time by implementation.

    python -m scripts.loss_traffic --config=configs/imagenet_latent_ablation.py [--target=v6e-8]
        [--impls=xla,pallas] [--classes=1]

Takes the config's feature groups (their [T, S] shapes from the feature network's
architecture; no artifact needed), and for each distinct shape compiles the configured
objective's forward and backward at `--classes` classes of the config's (Cg, Cp, Cn) for
one chip of the target, once per `loss.kde_impl`; prints libtpu's bytes and estimated
time per shape and their totals over the groups. At one class this is a v6e-64
ablation chip's share of the loss (64 classes over 64 chips). Compiler's estimates,
nothing measured; a few minutes on a 2-core machine.
"""

from __future__ import annotations

import collections
import os

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The training configuration whose objective and features to use.")
flags.DEFINE_string("target", "v6e-8", "A TPU slice; one of its chips is compiled for.")
flags.DEFINE_list("impls", ["xla", "pallas"], "loss.kde_impl values to compare.")
flags.DEFINE_integer("classes", 1, "Classes per chip.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  import jax
  import jax.numpy as jnp

  from drifting_jax import losses
  from drifting_jax.models import features as features_lib
  from drifting_jax.scale import targets, xla_internals

  config = FLAGS.config
  t = config.train
  targets.compile_environment()
  sharding = jax.sharding.SingleDeviceSharding(targets.parse(FLAGS.target).devices()[0])
  network = features_lib.build_feature_network(config, abstract=True)
  sample = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, config.data.channels), jnp.float32)
  shapes = jax.eval_shape(network.apply, network.params, sample)
  counts = collections.Counter((s.shape[1], s.shape[2]) for s in shapes.values())
  print(f"{len(shapes)} feature groups, {len(counts)} shapes; {FLAGS.classes} class(es) x "
        f"({t.gen_per_class}, {t.pos_per_class}, {t.neg_per_class}); one {FLAGS.target} chip")
  b = FLAGS.classes
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
  totals = {}
  for impl in FLAGS.impls:
    config.loss.kde_impl = impl
    objective = losses.objective_from_config(config.loss, "tpu")
    total_bytes = total_seconds = 0.0
    for (tokens, dim), count in sorted(counts.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
      def step(gen, pos, neg, w_neg):
        loss = lambda g: jnp.mean(objective(g, pos, neg, weight_neg=w_neg)[0])
        return jax.value_and_grad(loss)(gen)
      compiled = jax.jit(step).lower(spec(b, t.gen_per_class, tokens, dim), spec(b, t.pos_per_class, tokens, dim),
                                     spec(b, t.neg_per_class, tokens, dim), spec(b, t.neg_per_class)).compile()
      numbers = xla_internals.cost_numbers(compiled)
      seconds = numbers.get("optimal_seconds", 0.0)
      if seconds < 0:  # libtpu counts each ConcatBitcast/ZeroCrop call as -1 s (docs/scaling.md)
        text = compiled.as_text()
        seconds += sum(text.count(f'custom_call_target="{name}"') for name in ("ConcatBitcast", "ZeroCrop"))
      total_bytes += count * numbers["bytes accessed"]
      total_seconds += count * seconds
      print(f"  {impl:>8}  {count:3d} x [T={tokens:5d}, S={dim:5d}]  {numbers['bytes accessed'] / 1e6:10.1f} MB"
            f"  {seconds * 1e6:9.1f} us each")
    totals[impl] = (total_bytes, total_seconds)
    print(f"  {impl:>8}  total over the groups: {total_bytes / 1e9:.2f} GB, {total_seconds * 1e3:.2f} ms")
  if len(totals) > 1:
    (base, (b0, s0)), *rest = totals.items()
    for impl, (b1, s1) in rest:
      print(f"{impl} / {base}: bytes {b1 / b0:.3f}, time {s1 / s0:.3f} (libtpu's estimates)")


if __name__ == "__main__":
  app.run(main)
