"""Pretraining of the release's latent MAE-256 feature encoder on ImageNet SD-VAE latents.

The release's `configs/mae/latent_ablation_256.yaml`: ResNet with 256 base channels
and (3, 4, 6, 3) blocks in bf16 (431M params), mask ratio 0.5 on 2x2 latent
squares, batch 8192, AdamW lr 4e-3 (betas 0.9/0.95, weight decay 0.01) after 4000
warmup steps, constant after, gradient clipping at 2, EMA 0.9995, 30k steps, no
classification fine-tuning. Run with `--mode=train_mae`; the EMA encoder is written
to `<workdir>/mae`, which `feature.mae_path` of a generator config can name.

Needs the latent cache (`--mode=build_latents`) in data.data_dir.
`--config=configs/imagenet_mae_latent_256.py:smoke` is a seconds-long CPU variant
(a 16-channel MAE, a few steps) for tests and launch-script checks.
"""

import ml_collections

from configs import default


def mae_defaults() -> ml_collections.ConfigDict:
  """The `mae` section: the release's MAE-256 recipe."""
  m = ml_collections.ConfigDict()
  # A named size of drifting_jax.models.mae (latent-256, latent-640, pixel-640, tiny)
  # with per-key overrides; in_channels and num_classes come from config.data.
  m.model = "latent-256"
  m.model_overrides = ml_collections.ConfigDict()
  m.init_from = ""                 # start from an MAE artifact (hf://NAME or a folder) at step 0
  m.seed = 42
  m.batch_size = 8192              # global
  m.total_steps = 30_000
  m.mask_ratio_min = 0.5           # per-sample ratio drawn uniformly from [min, max]
  m.mask_ratio_max = 0.5
  m.lambda_cls = 0.0               # weight of the class-head loss
  m.finetune_last_steps = 0        # the last steps ramp lambda_cls to finetune_cls (640 runs: 3000)
  m.warmup_finetune = 1000
  m.finetune_cls = 0.1
  # The release's cached latents hold the latent of the flipped image as well and use
  # either with probability 1/2; a horizontally flipped latent stands in for it here.
  m.hflip = True
  m.learning_rate = 4e-3
  m.warmup_steps = 4000
  m.warmup_init = 1e-6             # the warmup starts here, not at 0
  m.schedule = "const"             # const | cosine
  m.schedule_steps = 100_000       # cosine length (the release's lr_schedule.total_steps)
  m.weight_decay = 0.01
  m.b1 = 0.9
  m.b2 = 0.95
  m.max_grad_norm = 2.0
  m.ema_decay = 0.9995
  m.save_every = 5000
  m.keep_last = 2
  m.keep_every = 0
  m.async_save = True
  m.log_every = 40
  m.out_dir = ""                   # "" = <workdir>/mae
  return m


def get_config(variant: str = ""):
  c = default.get_config()
  c.data.name = "latents"
  c.data.num_classes = 1000
  c.data.image_size = 32
  c.data.channels = 4
  c.mae = mae_defaults()
  # `--mode=compile` compiles the pretraining step (launch/compile_check.sh).
  c.compile.programs = ("mae",)
  c.compile.target = "v6e-64"
  c.mesh.fsdp = 8
  if variant == "smoke":
    c.data.name = "synthetic_latents"
    c.data.num_classes = 10
    c.data.image_size = 16
    c.mae.model = "tiny"
    c.mae.batch_size = 8
    c.mae.total_steps = 4
    c.mae.learning_rate = 1e-3
    c.mae.warmup_steps = 1
    c.mae.ema_decay = 0.5
    c.mae.hflip = False
    c.mae.save_every = 2
    c.mae.async_save = False
    c.mae.log_every = 1
    c.mesh.fsdp = 1
  elif variant:
    raise ValueError(f"unknown imagenet_mae_latent_256 variant {variant!r}; known: 'smoke'")
  return c
