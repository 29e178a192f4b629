"""FHM's pixel-space MNIST setting (their Table 3): DiT-S/2, 12k steps, no CFG."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = "mnist-DiT-S/2"
  c.data.name = "mnist"
  c.data.num_classes = 10
  c.data.image_size = 28
  c.data.channels = 1
  c.feature.kind = "pixels"
  c.loss.objective = "log_kde"
  c.loss.kernel = "gaussian"
  c.loss.bandwidths = (1.0,)          # single bandwidth, relative to the top-k scale
  c.loss.feature_normalization = "topk_ema"
  c.loss.topk_k = 5
  c.loss.topk_beta = 0.99
  c.train.total_steps = 12_000
  c.train.classes_per_step = 5
  c.train.gen_per_class = 96
  c.train.pos_per_class = 96
  c.train.neg_per_class = 0
  c.train.positive_bank_size = 256
  c.train.negative_bank_size = 64
  c.train.push_per_step = 480
  c.train.cfg_min = 1.0
  c.train.cfg_max = 1.0
  c.train.ema_decay = 0.999
  c.train.max_grad_norm = 2.0
  c.optim.learning_rate = 2e-4
  c.optim.b1 = 0.95
  c.optim.b2 = 0.999
  c.optim.weight_decay = 1e-4
  c.optim.schedule = "cosine"
  c.optim.noop_steps = 300
  c.optim.warmup_steps = 300
  c.checkpoint.every_steps = 1000
  c.log.sample_grid_every = 2000
  c.eval.cfg_scales = (1.0,)
  return c
