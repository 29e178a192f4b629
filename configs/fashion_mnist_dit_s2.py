"""FHM's pixel-space Fashion-MNIST setting (their Table 3): as MNIST, 16k steps."""

from configs import mnist_dit_s2


def get_config():
  c = mnist_dit_s2.get_config()
  c.data.name = "fashion_mnist"
  c.train.total_steps = 16_000
  return c
