r"""How much narrower is a kernel width at FHM's batch? The top-k distance scale by positives per class.

    python -m scripts.topk_scale_by_batch [--draws 40] [--out docs/topk_scale_by_batch.json]

The learning curves (docs/results.md) found log-KDE Gauss# at width 0.2 slower to
spread a class at FHM's Table 3 batch (96 positives per class) than at the
comparison batch (64). One candidate mechanism: the top-k EMA normalization divides
feature distances by each class's mean distance to its k nearest positives
(`losses.topk_mean_distance`, k = 5), and among more positives the nearest ones are
nearer, so the same width is narrower relative to the data. This measures that
effect directly, without training: on the digits the runs train on (MNIST-5k,
train split, pixel features as in `configs/mnist_tiny.py`), the scale each class
gets from P random positives, averaged over `--draws` draws, for P = 32, 64, 96,
128. The ratio at 96 against 64 is how much narrower width 0.2 is at FHM's batch.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

POSITIVES_PER_CLASS = (32, 64, 96, 128)


def measure(draws: int, seed: int = 0) -> dict:
  import jax
  import jax.numpy as jnp

  from configs import mnist_tiny
  from drifting_jax import losses
  from drifting_jax.data import images, mnist5k
  from drifting_jax.models import features

  config = mnist_tiny.get_config()
  network = features.build_feature_network(config)
  apply, params = network.apply, network.params
  digits, labels = mnist5k.load_mnist5k("train")
  feats = np.asarray(apply(params, jnp.asarray(images.uint8_to_model(digits)))["pixels"][:, 0])
  k = int(config.loss.topk_k)
  scale = jax.jit(lambda s: losses.topk_mean_distance(s, k))
  classes = np.unique(labels)
  rng = np.random.default_rng(seed)
  per_class = {}
  for p in POSITIVES_PER_CLASS:
    values = [np.asarray(scale(jnp.asarray(np.stack(
        [feats[rng.choice(np.flatnonzero(labels == c), p, replace=False)] for c in classes]))))
              for _ in range(draws)]
    per_class[p] = np.mean(values, axis=0)
  ratio = per_class[96] / per_class[64]
  return {
      "topk_k": k, "draws": draws, "features": "pixels (configs/mnist_tiny.py), MNIST-5k train split",
      "scale_per_class": {str(p): [round(float(v), 4) for v in s] for p, s in per_class.items()},
      "scale_mean": {str(p): round(float(np.mean(s)), 4) for p, s in per_class.items()},
      "ratio_96_over_64": {"mean": round(float(np.mean(ratio)), 4), "min": round(float(np.min(ratio)), 4),
                           "max": round(float(np.max(ratio)), 4)},
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--draws", type=int, default=40, help="random positive draws per class and size")
  parser.add_argument("--out", default="docs/topk_scale_by_batch.json")
  args = parser.parse_args(argv)
  result = measure(args.draws)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  print("mean top-k scale by positives per class:", result["scale_mean"])
  r = result["ratio_96_over_64"]
  print(f"96 against 64 positives: x{r['mean']:.3f} (classes {r['min']:.3f}-{r['max']:.3f}); "
        f"width 0.2 at FHM's batch acts as {0.2 * r['mean']:.3f} at the comparison batch")


if __name__ == "__main__":
  main()
