"""Defaults shared by every training config; each config file starts from these.

Sizes are the official release's latent-ablation settings unless a config says
otherwise. Every field is overridable from the command line, e.g.
`--config.loss.objective=corrected --config.loss.bandwidths="(0.05,)"`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Generator: a named size from drifting_jax.models.generator (DiT-S/2, DiT-B/2,
  # DiT-L/2, mnist-DiT-S/2, tiny) with per-key overrides of its model_config.
  c.model = ml_collections.ConfigDict()
  c.model.name = "DiT-B/2"
  c.model.overrides = ml_collections.ConfigDict()
  # Rematerialisation of the DiT's blocks in the backward pass: "none", "full" (only
  # each block's input kept; the block runs twice) or "dots" (the weight matmuls'
  # outputs kept, norms, activations and attention recomputed); drifting_jax/models/
  # layers.py, REMAT_POLICIES. `remat=True` is the older switch for "full" (kept for
  # old configs and command lines); a remat_policy other than "none" wins over it.
  c.model.remat_policy = "none"
  c.model.remat = False
  # The attention kernel (drifting_jax/models/attention.py): "xla", "cudnn" (NVIDIA
  # GPUs; bf16 inputs, so fp32 q/k/v under attn_fp32 are rounded to bf16), "splash"
  # (TPUs: the Pallas splash kernel), "whole_sequence" (TPUs: a Pallas kernel for short
  # sequences, each example's whole sequence in VMEM, no padding) or "auto", resolved
  # from the platform of the mesh's devices: on TPU splash from 1,024 tokens on,
  # whole_sequence below where it takes the shape (the ablation's 272 tokens: splash
  # pads them to 384 and cost more HBM than xla, docs/scaling.md), else xla; cudnn on GPU
  # only where q/k/v are bf16 already (attn_fp32=False), else xla (the CPU: bit-identical
  # to the step before the option).
  c.model.attention_impl = "auto"
  # Start from an existing generator artifact (hf://NAME or a folder) at step 0.
  c.init_from = ""

  c.data = ml_collections.ConfigDict()
  c.data.name = "latents"        # mnist5k | mnist | fashion_mnist | latents | synthetic_latents
  c.data.data_dir = ""           # tfds data_dir, or the latent cache folder for "latents"
  c.data.num_classes = 1000
  c.data.image_size = 32         # side of the generated sample (pixels or latent cells)
  c.data.channels = 4
  c.data.pad_to = 0              # MNIST-like 28x28 padded to 32 for latent models; 0 = no padding
  c.data.latent_flip = True      # a cache with mirror-image latents: draw either view with p = 1/2 (release)
  c.data.synthetic_per_class = 64  # synthetic_latents: samples made per class (smoke runs, compile checks)

  # Feature space the loss is computed in.
  c.feature = ml_collections.ConfigDict()
  c.feature.kind = "mae"         # mae | pixels
  c.feature.mae_path = "hf://mae_latent_256"
  c.feature.activation_kwargs = ml_collections.ConfigDict(dict(
      patch_mean_size=(2, 4), patch_std_size=(2, 4), use_std=True, use_mean=True, every_k_block=2))
  c.feature.patch_stats_sizes = ()  # extra patch mean/std groups for pixel features
  c.feature.include_input = True    # mae: the raw sample as one more group, "global" (the release's)
  # The frozen network's params on the mesh: "fsdp" (split like the generator's) or
  # "replicated" (a whole bf16 copy per device; no gathers). docs/scaling.md compares them.
  c.feature.param_placement = "fsdp"
  # Rematerialisation of the frozen MAE's residual blocks in the backward pass from the
  # generated samples' features to the samples (its params get no gradient): "none",
  # "full" or "dots" (the convolutions' outputs kept), as model.remat_policy. The
  # forward passes on data (no gradient) are unchanged by it.
  c.feature.remat_policy = "none"

  # The objective: one field picks it (drifting_jax.losses.OBJECTIVES).
  c.loss = ml_collections.ConfigDict()
  c.loss.objective = "log_kde"   # log_kde | corrected | release | joint | mmd | sinkhorn
  c.loss.kernel = "laplace"      # gaussian | laplace | rational_quadratic
  c.loss.bandwidths = (0.02, 0.05, 0.2)
  c.loss.normalize_gradients = False
  c.loss.mmd_sharp = False
  # How log_kde and mmd are computed: "auto" (Pallas kernels on TPU, XLA elsewhere),
  # "xla", "pallas" (TPU), "pallas_interpret" (those kernels interpreted, any platform).
  c.loss.kde_impl = "auto"
  # The sinkhorn objective (losses.sinkhorn_loss) uses no kernel or bandwidths: its
  # entropic epsilon is relative to the feature_normalization scale (cost units of
  # x / scale), the ground cost is "euclidean" |x - y| or "sqeuclidean" |x - y|^2,
  # and Sinkhorn stops at this L1 marginal error or after max_iterations.
  # bandwidth_anneal_rate shrinks its blur length epsilon * scale the same way.
  c.loss.sinkhorn_epsilon = 0.1
  c.loss.sinkhorn_cost = "euclidean"
  c.loss.sinkhorn_threshold = 1e-3
  c.loss.sinkhorn_max_iterations = 1000
  # How distances are made scale-free: the release's batch-mean distance
  # ("batch_mean"), FHM's per-class top-k EMA ("topk_ema"), or raw ("none").
  c.loss.feature_normalization = "batch_mean"
  c.loss.topk_k = 5
  c.loss.topk_beta = 0.99
  # Bandwidth annealing sigma(t) = sigma0 * exp(-rate * t / total_steps); 0 = off.
  c.loss.bandwidth_anneal_rate = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.total_steps = 30_000
  c.train.classes_per_step = 64       # B: groups (classes) per step, global
  c.train.gen_per_class = 64          # Cg
  c.train.pos_per_class = 64          # Cp, drawn from the positive bank
  c.train.neg_per_class = 16          # Cn, unconditional negatives from the negative bank
  # Where positives/negatives come from: "bank" (the release's memory banks, fed
  # push_per_step samples a step) or "fresh" (FHM's sampler: each step draws
  # pos_per_class distinct training samples of each class; no bank).
  c.train.positive_sampler = "bank"
  c.train.positive_bank_size = 128    # slots per class
  c.train.negative_bank_size = 1000   # slots of the unconditional bank
  c.train.push_per_step = 64          # data samples pushed into the banks per step, per host
  # Host RAM of the positive bank = classes x slots x sample bytes: 1000 x 128 x
  # 32x32x4 float32 = 2.1 GB per host; bank_dtype "bfloat16" halves it.
  c.train.bank_dtype = "float32"
  c.train.cfg_min = 1.0
  c.train.cfg_max = 4.0
  c.train.neg_cfg_pw = 3.0            # p(alpha) ~ alpha^-3 on [cfg_min, cfg_max]
  c.train.no_cfg_frac = 0.0
  c.train.ema_decay = 0.999
  c.train.max_grad_norm = 2.0
  # Gradient accumulation inside one compiled step: the classes in this many chunks
  # (lax.scan), one optimizer/EMA step. The objective is given the whole batch's
  # features or statistics, so the update equals the unchunked one to float32 rounding
  # for every objective and normalization. "auto": the smallest count whose step fits the
  # devices, by the compiler's memory analysis (the run's pre-flight, the compile mode).
  c.train.microbatches = ml_collections.FieldReference(1, field_type=object)  # an int, or "auto"
  # With chunks: "keep" the whole batch's features for the objective, or "recompute"
  # them in passes that gather the batch's statistics first (less memory, more forward
  # passes); "auto": keep, unless microbatches="auto" finds that no count can fit so.
  c.train.microbatch_features = "auto"

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.01
  c.optim.schedule = "const"      # const | cosine
  c.optim.noop_steps = 0          # lr = 0 for these first steps (EMA/bank warm-up)
  c.optim.warmup_steps = 5000     # linear ramp after the no-op steps

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 2000
  c.checkpoint.keep_last = 2
  c.checkpoint.keep_every = 10_000
  c.checkpoint.async_save = True

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 10
  c.log.sample_grid_every = 2000

  c.eval = ml_collections.ConfigDict()
  c.eval.step = -1                   # -1: latest checkpoint
  c.eval.source = ""                 # "" = workdir checkpoints; or params_ema folder / hf://NAME
  c.eval.samples_per_class = 50
  # The metrics computed (drifting_jax.eval.evaluators): here ImageNet's, in the FID
  # InceptionV3's features; add "precision_recall" with eval.reference_features.
  c.eval.evaluators = ("inception_score", "fid_inception")
  c.eval.cfg_scales = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5)  # each at sample.temperature
  c.eval.temperatures = ()           # noise temperatures also evaluated, each at sample.cfg_scale
  c.eval.batch_size = 500
  # With several hosts: "per_host" (each host samples its share in a program over its own
  # chips), "global" (one program over every chip, each host's rows on its own chips), or
  # "auto" (per_host; global on multi-host TPU v5e, whose compiler refuses per-host programs).
  c.eval.sampling_layout = "auto"
  c.eval.reference_stats = ""        # .npz with mu/sigma
  c.eval.classifier_path = ""        # MNIST-like offline metrics ("" = <workdir>/classifier)
  c.eval.reference_features = ""     # .npz with real `features` for precision/recall
  c.eval.vae_source = "hf://pcuenq/sd-vae-ft-mse-flax"  # decodes latent samples
  c.eval.inception_path = ""         # FID weights pickle ("" = the default cache path)
  c.eval.decode_chunk = 250          # latents decoded per VAE call
  c.eval.watch_poll_s = 60.0         # watcher: seconds between looks at the workdir
  c.eval.watch_timeout_s = 6 * 3600.0  # watcher: stop after this long without a new checkpoint

  # build_latents: a tfds image data set -> SD-VAE latent shards (data.name=latents reads them).
  c.latents = ml_collections.ConfigDict()
  c.latents.dataset = "imagenet2012"
  c.latents.split = "train"
  c.latents.image_size = 256         # center crop (the release's preprocessing); 32 for padded MNIST
  c.latents.pad_to = 0               # MNIST/Fashion: pad 28 -> 32 before encoding
  c.latents.batch_size = 256         # images per shard
  c.latents.dtype = "float32"
  c.latents.out_dir = ""             # "" = <workdir>/latents
  c.latents.vae_source = "hf://pcuenq/sd-vae-ft-mse-flax"
  c.latents.posterior = "sample"     # "sample" (the release: one posterior draw per image) | "mean"
  c.latents.flip = True              # also store the mirror image's latent (the release's augmentation)
  c.latents.seed = 0                 # posterior draws: a pure function of (seed, shard)
  c.latents.release_cache = ""       # --mode=import_latents: the release's .pt cache root (<root>/<split>/<class>/*.pt)

  # --mode=compile: the run's programs compiled for a TPU slice (no TPU needed; libtpu
  # describes the slice), reported per chip in <workdir>/compile_report.json.
  c.compile = ml_collections.ConfigDict()
  c.compile.target = "v6e-64"        # a slice as the cloud names it (drifting_jax.scale.targets)
  c.compile.programs = ("train", "sample")  # train | sample | mae
  c.compile.loss_share = True        # also compile the step with a trivial objective (a second compile)
  # The MAE's architecture when feature.mae_path is not on this machine (no weights are read).
  c.compile.mae_model = "latent-256"

  c.sample = ml_collections.ConfigDict()
  c.sample.per_class = 100
  c.sample.classes = ()              # () = all classes
  c.sample.cfg_scale = 1.0
  # Scale of the generator's Gaussian noise (not its style labels) when sampling and
  # evaluating: 1 = the trained distribution; < 1 = truncation (cleaner, less varied).
  c.sample.temperature = 1.0
  c.sample.seed = 0
  return c
