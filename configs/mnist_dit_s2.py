"""FHM's pixel-space MNIST setting, their Table 3 (Appendix F) to the letter.

    --config=configs/mnist_dit_s2.py                      # log-KDE Gauss#, sigma 0.20
    --config=configs/mnist_dit_s2.py:drifting_laplace     # any of TABLE2_MNIST below

Architecture: DiT-S/2 on 28x28x1 (patch 2, width 384, MLP 1536, depth 12, 8
register tokens, 32 style-embedding tokens), N(0, 1) noise input. Optimizer: AdamW
(beta1 0.95, beta2 0.999), lr 2e-4, weight decay 1e-4, cosine annealing, 300 no-op
steps, 300 ramp-up steps, gradient clip 2.0, 12,000 steps, no EMA. Loss: pixel
space, a single kernel width, per-class top-k EMA feature normalization (k = 5,
beta = 0.99), no field normalization, no CFG. Batch: Nc = 5 classes a step,
Npos = Ngen = 96 per class (B = 480), no memory bank but FHM's sampler
(`train.positive_sampler = "fresh"`: every step draws 96 distinct training digits of
each of its 5 classes).

The five objectives of FHM Table 2 are the variants, each at the paper's best MNIST
width (the width is a fraction of the top-k EMA distance scale):

  log_kde_gauss     log-KDE with the Gaussian sharp kernel (FHM Alg. 1)   0.20
  drifting_gauss    Deng et al.'s field as their code computes it          0.25
                    (FHM Eq. 21, the `joint` objective), Gaussian kernel
  log_kde_laplace   log-KDE with the Laplace sharp kernel                 0.10
  naive_laplace     the corrected field, FHM Eq. 3 / Alg. 2 (`corrected`)  0.05
  drifting_laplace  Deng et al.'s field, Laplace kernel                   0.05

Departures: none in the settings. Data come from tfds `mnist` (its train split;
set `--config.data.data_dir`); FHM do not say which precision they trained in, and
the model computes in bfloat16 as the release's DiTs do (`model.overrides` takes
`use_bf16=False`).
"""

from configs import default

# objective name -> (loss.objective, loss.kernel)
OBJECTIVES = {
    "log_kde_gauss": ("log_kde", "gaussian"),
    "drifting_gauss": ("joint", "gaussian"),
    "log_kde_laplace": ("log_kde", "laplace"),
    "naive_laplace": ("corrected", "laplace"),
    "drifting_laplace": ("joint", "laplace"),
}
# FHM Table 2: best kernel width per objective on MNIST.
TABLE2_MNIST = {"log_kde_gauss": 0.20, "drifting_gauss": 0.25, "log_kde_laplace": 0.10,
                "naive_laplace": 0.05, "drifting_laplace": 0.05}
DEFAULT_VARIANT = "log_kde_gauss"


def apply_objective(c, name: str, width: float) -> None:
  """Sets loss.objective/kernel/bandwidths for one of FHM's five objectives."""
  if name not in OBJECTIVES:
    raise ValueError(f"unknown objective variant {name!r}; known: {sorted(OBJECTIVES)}")
  c.loss.objective, c.loss.kernel = OBJECTIVES[name]
  c.loss.bandwidths = (float(width),)


def get_config(variant: str = ""):
  c = default.get_config()
  c.model.name = "mnist-DiT-S/2"
  c.data.name = "mnist"
  c.data.num_classes = 10
  c.data.image_size = 28
  c.data.channels = 1
  c.feature.kind = "pixels"
  c.feature.patch_stats_sizes = ()
  c.loss.feature_normalization = "topk_ema"
  c.loss.topk_k = 5
  c.loss.topk_beta = 0.99
  c.loss.normalize_gradients = False   # no field normalization
  c.loss.bandwidth_anneal_rate = 0.0
  variant = variant or DEFAULT_VARIANT
  if variant not in TABLE2_MNIST:
    raise ValueError(f"unknown mnist_dit_s2 variant {variant!r}; known: {sorted(TABLE2_MNIST)}")
  apply_objective(c, variant, TABLE2_MNIST[variant])
  c.train.total_steps = 12_000
  c.train.classes_per_step = 5         # Nc
  c.train.gen_per_class = 96           # Ngen
  c.train.pos_per_class = 96           # Npos
  c.train.neg_per_class = 0
  c.train.positive_sampler = "fresh"   # no memory bank
  c.train.cfg_min = 1.0                # no CFG
  c.train.cfg_max = 1.0
  c.train.ema_decay = 0.0              # no EMA: the "EMA" parameters are the parameters
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
  c.eval.evaluators = ("classifier",)  # the project's digit classifier (--mode=train_classifier)
  return c
