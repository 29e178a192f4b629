"""FHM's pixel-space Fashion-MNIST setting (their Table 3): as MNIST, 16,000 steps.

    --config=configs/fashion_mnist_dit_s2.py[:variant]

The variants are the five objectives of `configs/mnist_dit_s2.py`, each at FHM
Table 2's best Fashion-MNIST width.
"""

from configs import mnist_dit_s2

# FHM Table 2: best kernel width per objective on Fashion-MNIST.
TABLE2_FASHION_MNIST = {"log_kde_gauss": 0.25, "drifting_gauss": 0.25, "log_kde_laplace": 0.10,
                        "naive_laplace": 0.10, "drifting_laplace": 0.05}


def get_config(variant: str = ""):
  variant = variant or mnist_dit_s2.DEFAULT_VARIANT
  if variant not in TABLE2_FASHION_MNIST:
    raise ValueError(f"unknown fashion_mnist_dit_s2 variant {variant!r}; known: {sorted(TABLE2_FASHION_MNIST)}")
  c = mnist_dit_s2.get_config(variant)
  mnist_dit_s2.apply_objective(c, variant, TABLE2_FASHION_MNIST[variant])
  c.data.name = "fashion_mnist"
  c.train.total_steps = 16_000
  return c
