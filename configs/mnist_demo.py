"""`make demo`: the release's generator recipe on raw pixels, sized for a 2-core CPU.

The recipe that met the demo's bars (docs/results.md, "The demo"): the demo's small
DiT on the bundled MNIST-5k, trained as the release (`lambertae/drifting`,
configs/gen/latent_ablation.yaml) trains its generators, with the paper's fix:

* objective: the log-KDE loss (FHM Alg. 1) with the Laplace *sharp* kernel, the
  release's kernel made conservative, at the release's three widths
  R = (0.02, 0.05, 0.2) on its batch-mean distance scale; each width's gradient
  normalised to unit RMS before the sum (`loss.normalize_gradients`, the release's
  per-temperature treatment);
* classifier-free guidance: one alpha per class, p(alpha) ~ alpha^-3 on [1, 4], the
  generator conditioned on alpha; 16 unconditional negatives per class from the
  negative memory bank, each of weight (alpha - 1)(Cg - 1)/Cn, so the negative KDE is
  the mixture q/alpha + (1 - 1/alpha) p_uncond (FHM Sec. 4);
* positives from the positive memory bank (128 per class);
* samples drawn at guidance alpha = 3 and noise temperature 0.5;
* the model and optimizer of `configs/mnist_tiny.py`: DiT 96 wide, 3 blocks, 4x4
  patches; AdamW 2e-3, cosine, warm-up 50, EMA 0.99; 5 classes x 32 generated and
  64 positives a step; 900 steps.

`configs/mnist_tiny.py` stays the single-width pixel recipe that the objective
comparison (`scripts/experiments.py`) trains; `configs/mnist_mae.py` is this recipe
in the features of a small MAE.

`--config=configs/mnist_demo.py:smoke` is a seconds-long variant for tests.
"""

from configs import mnist_tiny

# Guidance scales and noise temperatures the evaluation sweeps; the demo's samples
# use `sample.cfg_scale` and `sample.temperature`.
CFG_SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0)
TEMPERATURE_SWEEP = (0.5, 0.75, 1.0)


def get_config(variant: str = ""):
  if variant not in ("", "smoke"):
    raise ValueError(f"unknown mnist_demo variant {variant!r}; known: 'smoke'")
  smoke = variant == "smoke"
  c = mnist_tiny.get_config(variant)

  c.feature.kind = "pixels"
  c.loss.objective = "log_kde"
  c.loss.kernel = "laplace"
  c.loss.bandwidths = (0.02, 0.05, 0.2)
  c.loss.feature_normalization = "batch_mean"
  c.loss.normalize_gradients = True
  c.loss.bandwidth_anneal_rate = 0.0
  c.train.positive_sampler = "bank"
  c.train.cfg_min = 1.0
  c.train.cfg_max = 4.0
  c.train.neg_cfg_pw = 3.0
  c.train.no_cfg_frac = 0.0
  c.eval.cfg_scales = CFG_SWEEP
  # The demo's samples at guidance 3: over three seeds it met the accuracy bars at
  # every scale >= 1.5 and missed them at 1 on one seed (0.892, worst class 0.74),
  # and at 3 against 1 the Frechet distance fell by a third with recall and spread
  # unchanged (docs/results.md, "Demo").
  c.sample.cfg_scale = 3.0
  # ... and at noise temperature 0.5 (the truncation trick on the Gaussian noise; the
  # style labels are drawn as trained). The speckle around the digits is that noise
  # leaking through: at 0.5 the samples carry about as much stray ink as real digits
  # (1.0-1.7x) against 2.8-4.1x at 1, with accuracy up 2-4.5 points, for FD +16-20%
  # and recall -25-33% (3 seeds); CFG 3 stays the best scale at every temperature
  # (docs/results.md, "Demo").
  c.sample.temperature = 0.5
  c.eval.temperatures = TEMPERATURE_SWEEP
  if smoke:
    c.train.neg_per_class = 4
    c.train.negative_bank_size = 32
  else:
    c.train.neg_per_class = 16
    c.train.negative_bank_size = 1000
  return c
