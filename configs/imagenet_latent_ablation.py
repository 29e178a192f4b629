"""The release's ImageNet-256 latent ablation (DiT-B/2 on SD-VAE latents, latent-MAE-256
features) with the objective selectable; log-KDE Laplace# by default.

Needs the latent cache (`--mode=build_latents`) in data.data_dir and the MAE artifact
(hf://mae_latent_256, or a local folder) in feature.mae_path. The positive bank is
1000 classes x 128 slots x 32x32x4: 2.1 GB of host RAM per host in float32
(train.bank_dtype="bfloat16" halves it).
"""

import ml_collections

from configs import default


def get_config(variant: str = ""):
  c = default.get_config()
  c.model.name = "DiT-B/2"
  c.data.name = "latents"
  c.data.num_classes = 1000
  c.data.image_size = 32
  c.data.channels = 4
  c.feature.kind = "mae"
  c.feature.mae_path = "hf://mae_latent_256"
  c.loss.objective = "log_kde"
  c.loss.kernel = "laplace"
  c.loss.bandwidths = (0.02, 0.05, 0.2)
  c.loss.normalize_gradients = True
  c.loss.feature_normalization = "batch_mean"
  c.train.total_steps = 30_000
  c.train.classes_per_step = 64
  c.train.gen_per_class = 64
  c.train.pos_per_class = 64
  c.train.neg_per_class = 16
  c.train.positive_bank_size = 128
  c.train.negative_bank_size = 1000
  c.train.push_per_step = 64
  c.train.cfg_min = 1.0
  c.train.cfg_max = 4.0
  c.train.neg_cfg_pw = 3.0
  c.train.ema_decay = 0.999
  c.optim.learning_rate = 2e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.01
  c.optim.schedule = "const"
  c.optim.warmup_steps = 5000
  # The release's mesh on its v6e-64: 8-way fsdp (its hsdp_dim) inside 8-way data
  # parallelism. On fewer devices: --config.mesh.fsdp=1 (or any divisor of the count).
  c.mesh.fsdp = 8
  c.compile.target = "v6e-64"
  c.checkpoint.every_steps = 2000
  c.checkpoint.keep_every = 10_000
  c.eval.cfg_scales = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
  c.eval.samples_per_class = 50
  if variant == "compile_smoke":
    # The same program at toy sizes, for compile tests on a 4-chip slice: a tiny latent
    # DiT, the tiny MAE (no artifact needed), 8 classes x 8 generated.
    c.model.name = "tiny-latent"
    c.model.overrides = ml_collections.ConfigDict(dict(depth=1))
    c.compile.mae_model = "tiny"
    c.compile.target = "v5p-8"
    c.mesh.fsdp = 2
    c.train.classes_per_step = 8
    c.train.gen_per_class = c.train.pos_per_class = 8
    c.train.neg_per_class = 4
    c.eval.batch_size = 64
    # 6 feature groups instead of the extractor's 85: a program that compiles in seconds.
    c.feature.activation_kwargs = ml_collections.ConfigDict(dict(
        patch_mean_size=(), patch_std_size=(), use_std=False, use_mean=False, every_k_block=0))
    c.loss.bandwidths = (0.2,)
    c.compile.programs = ("train",)
    c.compile.loss_share = False
  elif variant:
    raise ValueError(f"unknown imagenet_latent_ablation variant {variant!r}; known: 'compile_smoke'")
  return c
