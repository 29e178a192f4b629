"""The release's pixel-space recipe in miniature on MNIST-5k: MAE features, CFG, negatives.

One config drives both halves of the release's pipeline (`scripts/release_miniature.py`
runs them in order):

1. `--mode=train_mae`: pretrain the release's `MAEResNet` (masked reconstruction,
   square masks, EMA, a class-head fine-tune at the end) on the training digits;
   the EMA encoder is written to `<workdir>/mae`.
2. `--mode=train` with `--config.feature.mae_path=<workdir>/mae`: the generator in
   that MAE's feature space, as the release's `pixel_*` and latent-ablation configs
   train it:

   * features: the raw sample as one group ("global") plus the MAE's multi-scale
     activation groups (stem, stages, every 2nd block; tokens, mean, std, 2x2/4x4
     patch statistics): the release's `activation_kwargs`;
   * CFG: one alpha per class, p(alpha) ~ alpha^-3 on [1, 4] (latent ablation's
     `neg_cfg_pw` 3), the generator conditioned on alpha;
   * negatives: 16 unconditional samples per class from the negative memory bank,
     each of weight (alpha - 1)(Cg - 1) / Cn, so that the negative KDE is the
     mixture q/alpha + (1 - 1/alpha) p_uncond; positives from the positive bank;
   * objective: the log-KDE loss with the Laplace sharp kernel (the release's
     kernel, made conservative) at the release's widths R = (0.02, 0.05, 0.2), on
     the release's batch-mean distance scale, with its per-bandwidth treatment:
     each width's gradient normalised to unit RMS before the sum
     (`loss.normalize_gradients`).

Departures from the release, each for the 2-core CPU: the demo's 96-wide 3-block
DiT with 4x4 patches (not DiT-B/16); 5 classes x 32 generated samples a step (not
64 x 64); a CPU-sized MAE (32 base channels, one block per stage, 4x4 input
patches, single-cell masks) trained for 800 steps of 128; the demo's optimizer (AdamW 2e-3, cosine, EMA 0.99).
MNIST is not mirrored (the release's horizontal flips would change the digits).

`:pixels` is the same generator recipe on raw pixels only (no MAE), for isolating
what the features buy at equal settings.
"""

from configs import imagenet_mae_latent_256, mnist_demo

# The release's evaluation sweep, as issue #14 asks for it.
CFG_SWEEP = mnist_demo.CFG_SWEEP


def get_config(variant: str = ""):
  if variant not in ("", "pixels", "smoke"):
    raise ValueError(f"unknown mnist_mae variant {variant!r}; known: 'pixels', 'smoke'")
  smoke = variant == "smoke"  # seconds: the demo's smoke sizes and a few MAE steps
  # The generator recipe (loss, CFG, negatives, banks, model, optimizer) is the demo's.
  c = mnist_demo.get_config("smoke" if smoke else "")

  # --- 1. The MAE (release: configs/mae/pixel_640.yaml, scaled to the CPU).
  c.mae = imagenet_mae_latent_256.mae_defaults()
  c.mae.model = "tiny"                     # 32 base channels, blocks (1, 1, 1, 1)
  # 28x28 digits as 4x4 patches -> a 7x7 grid (pixel_640: 8x8 patches of 256 -> 32x32);
  # the masks are single cells (4x4 pixels), since 7 is not a multiple of the release's 2.
  c.mae.model_overrides = dict(input_patch_size=4, patch_size=1)
  c.mae.learning_rate = 2e-3
  c.mae.ema_decay = 0.995
  c.mae.mask_ratio_min = 0.5               # the release's ratio
  c.mae.mask_ratio_max = 0.5
  c.mae.finetune_cls = 0.1                 # the release ends with a class-head fine-tune (lambda -> 0.1)
  c.mae.hflip = False
  c.mae.async_save = False
  (c.mae.batch_size, c.mae.total_steps, c.mae.warmup_steps, c.mae.finetune_last_steps, c.mae.warmup_finetune,
   c.mae.save_every, c.mae.log_every) = (16, 4, 1, 2, 1, 2, 1) if smoke else (128, 800, 100, 80, 30, 200, 50)

  # --- 2. The generator in the MAE's feature space (`:pixels`: on raw pixels, which is
  # exactly configs/mnist_demo.py).
  c.feature.kind = "pixels" if variant == "pixels" else "mae"
  c.feature.mae_path = ""                  # set to <workdir>/mae (the runner does)
  c.feature.include_input = True           # the release's "global" group
  c.feature.activation_kwargs = dict(patch_mean_size=(2, 4), patch_std_size=(2, 4), use_std=True,
                                     use_mean=True, every_k_block=2)
  return c
