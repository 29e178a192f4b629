"""The embedded default: a small DiT on the bundled MNIST-5k, on CPU in minutes.

Pixel-space features (the raw digit), log-KDE with the Laplace sharp kernel, the
paper's top-k EMA feature normalization, no CFG.

`--config=configs/mnist_tiny.py:smoke` is a seconds-long variant (one-block DiT,
a few steps) for tests and for checking launch scripts.
"""

from configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model.name = "tiny"
  c.model.overrides = dict(hidden_size=96, cond_dim=96, depth=3, num_heads=3)
  c.data.name = "mnist5k"
  c.data.num_classes = 10
  c.data.image_size = 28
  c.data.channels = 1
  c.feature.kind = "pixels"
  c.loss.objective = "log_kde"
  c.loss.kernel = "gaussian"
  # sigma(t) = 1.0 exp(-1.609 t / T): from 1.0 down to FHM's MNIST width 0.2 at the end.
  c.loss.bandwidths = (1.0,)
  c.loss.bandwidth_anneal_rate = 1.6094
  c.loss.feature_normalization = "topk_ema"
  c.train.total_steps = 900
  c.train.classes_per_step = 5
  c.train.gen_per_class = 32
  c.train.pos_per_class = 64
  c.train.positive_sampler = "fresh"
  c.train.neg_per_class = 0
  c.train.positive_bank_size = 128
  c.train.negative_bank_size = 64
  c.train.push_per_step = 64
  c.train.cfg_min = 1.0
  c.train.cfg_max = 1.0
  c.train.ema_decay = 0.99
  c.optim.learning_rate = 2e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "cosine"
  c.optim.noop_steps = 0
  c.optim.warmup_steps = 50
  c.checkpoint.every_steps = 450
  c.checkpoint.keep_every = 0
  c.log.every_steps = 50
  c.log.sample_grid_every = 450
  c.eval.cfg_scales = (1.0,)
  c.eval.evaluators = ("classifier",)  # the project's digit classifier (--mode=train_classifier)
  c.eval.samples_per_class = 100
  if variant == "smoke":
    c.model.overrides = dict(depth=1, hidden_size=32, cond_dim=32, num_heads=2)
    c.train.total_steps = 6
    c.train.classes_per_step = 2
    c.train.gen_per_class = 8
    c.train.pos_per_class = 8
    c.train.push_per_step = 32
    c.train.positive_bank_size = 16
    c.loss.topk_k = 3
    c.checkpoint.every_steps = 3
    c.checkpoint.async_save = False
    c.log.every_steps = 1
    c.log.sample_grid_every = 0
    c.eval.samples_per_class = 10
    c.sample.per_class = 10
  elif variant:
    raise ValueError(f"unknown mnist_tiny variant {variant!r}; known: 'smoke'")
  return c
