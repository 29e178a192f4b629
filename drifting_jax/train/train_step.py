"""One drifting training step, as a pure function of (state, feature params, batch).

    labels, positives, negatives  (from the memory banks)
      -> CFG scale per class, weight of the unconditional negatives
      -> frozen features of positives and negatives
      -> generated samples -> their features
      -> objective per feature group (drifting_jax.losses) -> mean over classes
      -> clipped AdamW update, EMA of the parameters

With `train.microbatches` > 1 the classes go through the networks in chunks, in one
of two ways (`train.microbatch_features`):

* "keep": two `lax.scan`s, the whole batch's features without gradients, then each
  chunk's pullback of the objective's feature gradient; the objective sees the whole
  batch at once, so its features stay resident.
* "recompute": the objective too runs chunk by chunk, given the whole batch's
  statistics (`losses.statistics`: distance scale, per-bandwidth field RMS; the top-k
  scales' per-class statistic), which up to two cheaper scans over the chunks
  (forward only) gather first; then one scan of each chunk's loss and gradient. Only
  one chunk's features are ever alive, at the price of a forward pass per statistic.

Either way the gradient and update are the unchunked step's to float32 rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import einops
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from drifting_jax import losses
from drifting_jax import errors, partitioning
from drifting_jax.models import generator as generator_lib

FeatureApply = Callable[[Any, jax.Array], dict[str, jax.Array]]


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  # {feature group: losses.TopKScaleState} for the top-k EMA normalization, else {}.
  feature_scale: Any


def sample_cfg_scales(rng: jax.Array, num: int, *, cfg_min: float, cfg_max: float, neg_cfg_pw: float,
                      no_cfg_frac: float) -> jax.Array:
  """Guidance scales alpha in [cfg_min, cfg_max] with density ~ alpha^-neg_cfg_pw.

  Inverse-CDF sampling of the release's power law (log-uniform when the exponent is
  1); a fraction `no_cfg_frac` of classes gets alpha = 1 (no guidance).
  """
  rng_u, rng_off = jax.random.split(rng)
  u = jax.random.uniform(rng_u, (num,))
  power = 1.0 - neg_cfg_pw
  if cfg_max <= cfg_min:
    alpha = jnp.full((num,), cfg_min, jnp.float32)
  elif abs(power) < 1e-6:
    alpha = jnp.exp(jnp.log(cfg_min) + u * (jnp.log(cfg_max) - jnp.log(cfg_min)))
  else:
    alpha = (cfg_min**power + u * (cfg_max**power - cfg_min**power)) ** (1.0 / power)
  if no_cfg_frac > 0:
    alpha = jnp.where(jax.random.uniform(rng_off, (num,)) < no_cfg_frac, 1.0, alpha)
  return alpha


def unconditional_weight(cfg: jax.Array, gen_per_class: int, neg_per_class: int) -> jax.Array:
  """(alpha - 1)(Cg - 1)/Cn: makes q#'s negatives the mixture q/alpha + (1 - 1/alpha) p_uncond."""
  return (cfg - 1.0) * (gen_per_class - 1) / max(1, neg_per_class)


# An objective as the step calls it: (gen, pos, neg, *, weight_neg, distance_scale) -> (loss [B], info).
Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def objective_from_config(loss_config: ml_collections.ConfigDict, mesh=None) -> Objective:
  """The configured objective behind one keyword-only call (`losses.objective_from_config`).

  The loss library's table reads and checks each objective's own options; a value
  it refuses is the user's mistake (`errors.UsageError`), reported before training.
  `mesh`: the one the step runs on (its platform resolves `loss.kde_impl`; Pallas
  kernels run per device on its batch axes).
  """
  platform = None if mesh is None else mesh_platform(mesh)
  batch_sharding = None if mesh is None else (mesh, partitioning.logical_to_mesh(("batch",))[0])
  with errors.as_usage_error("bad loss config: "):
    return losses.objective_from_config(loss_config, platform, batch_sharding)


def mesh_platform(mesh) -> str:
  """The platform of the mesh's devices ("tpu", "gpu", "cpu"; "mixed" if they differ). In the
  compile mode they are libtpu's or the CUDA plugin's descriptions, so it is the target's."""
  platforms = {"gpu" if d.platform == "cuda" else d.platform for d in mesh.devices.flat}
  return platforms.pop() if len(platforms) == 1 else "mixed"


def trivial_objective(gen, pos, neg, weight_gen=None, weight_pos=None, weight_neg=None, *, distance_scale=None,
                      statistics=None):
  """A stand-in loss of negligible cost that still reads every input, so XLA keeps the
  feature passes on positives and negatives: a step with it is the step without its loss
  (the device check and the compile report measure the loss's share with it). It
  normalizes by no batch statistics."""
  del weight_gen, weight_pos, weight_neg, distance_scale, statistics
  axes = tuple(range(1, gen.ndim))
  loss = jnp.mean(jnp.square(gen - jnp.mean(pos, axis=1, keepdims=True)), axis=axes)
  if neg is not None:
    loss = loss + 1e-6 * jnp.mean(neg, axis=tuple(range(1, neg.ndim)))
  return loss, {}


def _split_rows(features: dict[str, jax.Array], rows: int) -> dict[str, jax.Array]:
  """{name: [rows * k, T, D]} -> {name: [rows, k, T, D]}."""
  return {k: einops.rearrange(v, "(b k) t d -> b k t d", b=rows) for k, v in features.items()}


# --------------------------------------------------------------------------- microbatches


class _Chunks:
  """How a step's classes are split into `count` chunks of whole classes.

  Chunk m holds classes m, m + count, m + 2 count, ...: the batch is split over the
  devices in blocks of consecutive classes, so a strided chunk keeps a share of every
  device's block and every device works on every chunk.
  """

  def __init__(self, count: int, num_classes: int, per_class: int, mesh):
    if num_classes % count:
      raise ValueError(f"{count} microbatches do not divide {num_classes} classes")
    self.count, self.num_classes, self.per_class, self.mesh = count, num_classes, per_class, mesh

  def split(self, x: jax.Array, per_class: int) -> jax.Array:
    """[B * per_class, ...] (class-major rows) -> [count, B / count * per_class, ...], chunk-major."""
    out = einops.rearrange(x, "(b m k) ... -> m (b k) ...", m=self.count, k=per_class)
    return partitioning.constrain(out, self.mesh, (None, "batch"))

  def merge(self, x: jax.Array, per_class: int) -> jax.Array:
    """The inverse of `split`, to [B, per_class, ...] (class-major)."""
    return einops.rearrange(x, "m (b k) ... -> (b m) k ...", m=self.count, k=per_class)


def _chunk_gen_features(generator, feature_apply, params, feature_params, labels, cfg, noise, mesh):
  """Features {name: [n, T, D]} of the samples the generator makes for one chunk."""
  with partitioning.activation_rules(mesh):
    samples = generator.apply({"params": params}, labels, cfg, noise=noise)["samples"]
  with jax.named_scope("generated_features"):
    return feature_apply(feature_params, partitioning.constrain(samples, mesh, ("batch",)))


def _microbatched_features(chunks: _Chunks, generator, feature_apply, params, feature_params, gen_labels, gen_cfg,
                           noise, data):
  """The whole batch's generated features {name: [B, Cg, T, D]} and data features {name: [B, Cp + Cn, T, D]},
  computed chunk by chunk in one `lax.scan` (no gradient: only the features are kept)."""
  per_data = data.shape[1]
  gen_xs = jax.tree.map(lambda x: chunks.split(x, chunks.per_class), (gen_labels, gen_cfg, noise))
  data_xs = chunks.split(einops.rearrange(data, "b k h w c -> (b k) h w c"), per_data)

  def body(carry, xs):
    (labels, cfg, chunk_noise), chunk_data = xs
    generated = _chunk_gen_features(generator, feature_apply, params, feature_params, labels, cfg, chunk_noise,
                                    chunks.mesh)
    with jax.named_scope("data_features"):
      data_features = feature_apply(feature_params, chunk_data)
    return carry, (generated, data_features)

  _, (generated, data_features) = jax.lax.scan(body, None, (gen_xs, data_xs))
  generated = {k: chunks.merge(v, chunks.per_class) for k, v in generated.items()}
  data_features = {k: chunks.merge(v, per_data) for k, v in data_features.items()}
  return jax.lax.stop_gradient(generated), jax.lax.stop_gradient(data_features)


def _chunk_features(chunks: _Chunks, generator, feature_apply, params, feature_params, xs, pos_per_class: int,
                    with_negatives: bool):
  """One chunk's features, class-major: generated {name: [b, Cg, T, D]} (differentiable in
  `params`), positives and negatives {name: [b, C, T, D]} (constants)."""
  (labels, cfg, chunk_noise), chunk_data = xs
  rows = chunks.num_classes // chunks.count
  generated = _split_rows(_chunk_gen_features(generator, feature_apply, params, feature_params, labels, cfg,
                                              chunk_noise, chunks.mesh), rows)
  with jax.named_scope("data_features"):
    data_features = _split_rows(jax.lax.stop_gradient(feature_apply(feature_params, chunk_data)), rows)
  pos = {k: v[:, :pos_per_class] for k, v in data_features.items()}
  neg = {k: v[:, pos_per_class:] for k, v in data_features.items()} if with_negatives else None
  return generated, pos, neg


# Metrics of a recomputed chunked step are the chunks' means (the chunks are equal-sized,
# so a batch mean is the mean of the chunks' means), except these, which are maxima.
_CHUNK_MAX_METRICS = ("sinkhorn_iterations",)


def _merge_chunk_metrics(info: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: (jnp.max(v, axis=0) if k.startswith(_CHUNK_MAX_METRICS) else jnp.mean(v, axis=0))
          for k, v in info.items()}


def _microbatched_gradients(chunks: _Chunks, generator, feature_apply, params, feature_params, gen_labels, gen_cfg,
                            noise, feature_grads):
  """sum over chunks of J_chunk^T (d loss / d features of the chunk): the parameters' gradient,
  one chunk's activations alive at a time (`lax.scan`)."""
  xs = jax.tree.map(lambda x: chunks.split(x, chunks.per_class), (gen_labels, gen_cfg, noise))
  cotangents = {k: chunks.split(einops.rearrange(v, "b k t d -> (b k) t d"), chunks.per_class)
                for k, v in feature_grads.items()}

  def body(total, chunk):
    (labels, cfg, chunk_noise), cotangent = chunk
    _, pullback = jax.vjp(lambda p: _chunk_gen_features(generator, feature_apply, p, feature_params, labels, cfg,
                                                        chunk_noise, chunks.mesh), params)
    (grads,) = pullback(cotangent)
    return jax.tree.map(jnp.add, total, grads), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(body, zeros, (xs, cotangents))
  return grads


# train.microbatch_features: how a chunked step treats the objective's features (module docstring).
MICROBATCH_FEATURES = ("auto", "keep", "recompute")


def microbatch_features_mode(train_config: ml_collections.ConfigDict) -> str:
  """`train.microbatch_features` for a built step: "keep" or "recompute".

  "auto" builds "keep", the cheaper where both fit (one forward pass fewer per
  statistic); `train.microbatches="auto"` turns to "recompute" when no count with
  "keep" can fit (`program.compile_fitting`).
  """
  mode = train_config.microbatch_features
  if mode not in MICROBATCH_FEATURES:
    raise errors.UsageError(f"train.microbatch_features must be one of {MICROBATCH_FEATURES}, got {mode!r}")
  return "keep" if mode == "auto" else mode


def make_train_step(*, generator, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    feature_apply: FeatureApply, config: ml_collections.ConfigDict, mesh,
                    objective: Objective | None = None):
  """Builds `train_step(state, feature_params, batch) -> (state, metrics)` (un-jitted).

  `objective` replaces the configured one (e.g. `trivial_objective`, to measure the loss's share).
  """
  train, loss_config = config.train, config.loss
  gen_per_class, pos_per_class, neg_per_class = train.gen_per_class, train.pos_per_class, train.neg_per_class
  objective = objective or objective_from_config(loss_config, mesh)
  with errors.as_usage_error("bad loss config: "):
    scaling = losses.distance_scaling_from_config(loss_config)
  anneal_rate = float(loss_config.bandwidth_anneal_rate)
  total_steps = max(1, int(train.total_steps))
  microbatches = train.microbatches
  if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
    raise errors.UsageError(f"train.microbatches must be >= 1 when the step is built, got {train.microbatches} "
                            "(resolve 'auto' first: train/program.build_train_program does)")
  microbatch_features = microbatch_features_mode(train)
  recompute = microbatches > 1 and microbatch_features == "recompute"
  # The whole-batch statistics the objective normalizes by (none for a stand-in objective).
  needs = tuple(getattr(objective, "batch_statistics", ()))

  def distance_scales(state, labels, pos_features):
    """(feature_scale, {name: scale or None}): the top-k EMA's update from the positives, the annealing."""
    feature_scale, distance_scale = state.feature_scale, {k: None for k in pos_features}
    if scaling.stateful:
      feature_scale = {}
      for name, feats in pos_features.items():
        flat = einops.rearrange(feats, "b p t d -> b p (t d)")
        feature_scale[name], distance_scale[name] = scaling.update(state.feature_scale[name], flat, labels)
    return feature_scale, annealed(state, distance_scale)

  def annealed(state, distance_scale):
    if not anneal_rate:
      return distance_scale
    # sigma(t) = sigma0 exp(-rate t / T)  <=>  distances / exp(-rate t / T)
    shrink = jnp.exp(-anneal_rate * state.step / total_steps)
    return {k: (1.0 if v is None else v) * shrink for k, v in distance_scale.items()}

  def train_step(state: TrainState, feature_params: Any, batch: dict[str, jax.Array]):
    labels, positives, negatives = batch["labels"], batch["positives"], batch["negatives"]
    num_classes = labels.shape[0]
    rng_cfg, rng_noise = jax.random.split(jax.random.fold_in(state.rng, state.step))

    # Guidance: one scale per class; unconditional data enter q with this weight.
    cfg = sample_cfg_scales(rng_cfg, num_classes, cfg_min=train.cfg_min, cfg_max=train.cfg_max,
                            neg_cfg_pw=train.neg_cfg_pw, no_cfg_frac=train.no_cfg_frac)
    weight_neg = None
    if neg_per_class:
      weight_neg = jnp.broadcast_to(unconditional_weight(cfg, gen_per_class, neg_per_class)[:, None],
                                    (num_classes, neg_per_class))

    # The data's frozen features; the generator's samples and their features. With
    # microbatches, both in chunks of classes (`_microbatched_features`).
    data = jnp.concatenate([positives, negatives], axis=1) if neg_per_class else positives
    gen_labels = jnp.repeat(labels, gen_per_class)
    gen_cfg = jnp.repeat(cfg, gen_per_class)
    if recompute:
      chunked = _Chunks(microbatches, num_classes, gen_per_class, mesh)
      noise = generator_lib.draw_noise(generator, rng_noise, num_classes * gen_per_class)
      loss, info, grads, feature_scale = _recomputed_chunks(
          chunked, state, feature_params, labels, gen_labels, gen_cfg, noise, data, weight_neg)
      return _apply_update(state, grads, feature_scale, loss, info, cfg)
    if microbatches == 1:
      data = partitioning.constrain(einops.rearrange(data, "b k h w c -> (b k) h w c"), mesh, ("batch",))
      with jax.named_scope("data_features"):
        data_features = jax.lax.stop_gradient(feature_apply(feature_params, data))
      with jax.named_scope("feature_assembly"):
        data_features = _split_rows(data_features, num_classes)
      gen_labels = partitioning.constrain(gen_labels, mesh, ("batch",))
      chunked = None
    else:
      chunked = _Chunks(microbatches, num_classes, gen_per_class, mesh)
      noise = generator_lib.draw_noise(generator, rng_noise, num_classes * gen_per_class)
      generated, data_features = _microbatched_features(
          chunked, generator, feature_apply, state.params, feature_params, gen_labels, gen_cfg, noise, data)
    with jax.named_scope("feature_assembly"):
      pos_features = {k: v[:, :pos_per_class] for k, v in data_features.items()}
      neg_features = {k: v[:, pos_per_class:] for k, v in data_features.items()} if neg_per_class else None

    # Scale of feature distances: a scaling with a state (FHM's per-class top-k EMA)
    # updates it from the positives; else the objective scales them itself (or not).
    feature_scale, distance_scale = distance_scales(state, labels, pos_features)

    @jax.named_scope("objective")
    def objective_of_features(gen_features):
      """The objective summed over feature groups, each the mean over its classes."""
      total, info = 0.0, {}
      for name in sorted(gen_features):
        group_loss, group_info = objective(
            gen_features[name], pos_features[name], None if neg_features is None else neg_features[name],
            weight_neg=weight_neg, distance_scale=distance_scale[name])
        total = total + jnp.mean(group_loss)
        info.update({f"{k}/{name}": v for k, v in group_info.items()})
      return total, info

    if chunked is None:
      def loss_fn(params):
        with partitioning.activation_rules(mesh):
          samples = generator.apply({"params": params}, gen_labels, gen_cfg, rngs={"noise": rng_noise})["samples"]
        samples = partitioning.constrain(samples, mesh, ("batch",))
        with jax.named_scope("generated_features"):
          generated = feature_apply(feature_params, samples)
        with jax.named_scope("feature_assembly"):
          generated = _split_rows(generated, num_classes)
        return objective_of_features(generated)

      (loss, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    else:
      # The objective sees the whole batch's features, as without chunks (its batch
      # statistics: distance scale, gradient RMS, are the whole batch's), and its
      # gradient w.r.t. them is pulled back through the networks chunk by chunk.
      (loss, info), feature_grads = jax.value_and_grad(objective_of_features, has_aux=True)(generated)
      grads = _microbatched_gradients(chunked, generator, feature_apply, state.params, feature_params,
                                      gen_labels, gen_cfg, noise, feature_grads)
    return _apply_update(state, grads, feature_scale, loss, info, cfg)

  def _recomputed_chunks(chunks: _Chunks, state, feature_params, labels, gen_labels, gen_cfg, noise, data,
                         weight_neg):
    """The objective chunk by chunk with the whole batch's statistics (train.microbatch_features="recompute").

    Up to two forward scans gather the statistics (the top-k scales' per-class
    statistic and the batch's distance sums; then, with that scale, the fields'
    sums), then one scan accumulates each chunk's loss and parameter gradient.
    Returns (loss, info, grads, feature_scale).
    """
    num_classes = labels.shape[0]
    per_data = data.shape[1]
    feature_xs = (jax.tree.map(lambda x: chunks.split(x, chunks.per_class), (gen_labels, gen_cfg, noise)),
                  chunks.split(einops.rearrange(data, "b k h w c -> (b k) h w c"), per_data))
    per_class = lambda x: chunks.split(x, 1)  # [B, ...] -> [count, B / count, ...]
    weight_xs = None if weight_neg is None else per_class(weight_neg)

    def features(params, xs):
      return _chunk_features(chunks, generator, feature_apply, params, feature_params, xs, pos_per_class,
                             bool(neg_per_class))

    def merge_classes(x):  # [count, B / count] -> [B], class-major
      return chunks.merge(x, 1)[:, 0]

    def scan_sums(scales, statistics):
      """Each feature group's BatchSums over the chunks (forward only)."""
      def body(_, xs):
        feature_in, w, scale = xs
        generated, pos, neg = features(state.params, feature_in)
        return None, {name: objective.batch_sums(generated[name], pos[name], None if neg is None else neg[name],
                                                 weight_neg=w, distance_scale=scale[name],
                                                 statistics=statistics[name])
                      for name in generated}
      _, sums = jax.lax.scan(body, None, (feature_xs, weight_xs, scales))
      return {name: jax.tree.map(lambda x: jnp.sum(x, axis=0), s) for name, s in sums.items()}

    names = sorted(jax.eval_shape(feature_apply, feature_params, data[:1, 0]))  # the feature groups
    # 1. The top-k scales' statistic per class (data features only: XLA drops the generator).
    feature_scale, distance_scale = state.feature_scale, {name: None for name in names}
    if scaling.stateful:
      def topk_body(_, xs):
        _, pos, _ = features(state.params, xs)
        return None, {name: scaling.statistic(einops.rearrange(pos[name], "b p t d -> b p (t d)"))
                      for name in names}
      with jax.named_scope("batch_statistics"):
        _, per_chunk = jax.lax.scan(topk_body, None, feature_xs)
      feature_scale = {}
      for name in names:
        feature_scale[name], distance_scale[name] = scaling.apply(state.feature_scale[name],
                                                                  merge_classes(per_chunk[name]), labels)
    distance_scale = annealed(state, distance_scale)
    scale_xs = {name: None if v is None else per_class(jnp.broadcast_to(v, (num_classes,)))
                for name, v in distance_scale.items()}
    # 2. The batch's distance scale, then (with it) its fields' mean squares.
    statistics = {name: losses.BatchStatistics() for name in names}
    with jax.named_scope("batch_statistics"):
      if losses.statistics.DISTANCE_SCALE in needs:
        sums = scan_sums(scale_xs, statistics)
        statistics = {name: losses.statistics_from_sums(sums[name], field=False) for name in names}
      if losses.statistics.FIELD in needs:
        sums = scan_sums(scale_xs, statistics)
        statistics = {name: statistics[name]._replace(
            field_mean_square=losses.statistics_from_sums(sums[name]).field_mean_square) for name in names}

    # 3. Each chunk's share of the loss (its classes' sum over the batch's count) and gradient.
    def grad_body(total, xs):
      feature_in, w, scale = xs

      def chunk_loss(params):
        generated, pos, neg = features(params, feature_in)
        loss, info = 0.0, {}
        with jax.named_scope("objective"):
          for name in names:
            group_loss, group_info = objective(generated[name], pos[name], None if neg is None else neg[name],
                                               weight_neg=w, distance_scale=scale[name],
                                               statistics=statistics[name])
            loss = loss + jnp.sum(group_loss) / num_classes
            info.update({f"{k}/{name}": v for k, v in group_info.items()})
        return loss, info

      (loss, info), grads = jax.value_and_grad(chunk_loss, has_aux=True)(state.params)
      return jax.tree.map(jnp.add, total, grads), (loss, info)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (loss, info) = jax.lax.scan(grad_body, zeros, (feature_xs, weight_xs, scale_xs))
    return jnp.sum(loss), _merge_chunk_metrics(info), grads, feature_scale

  def _apply_update(state, grads, feature_scale, loss, info, cfg):
    with jax.named_scope("optimizer"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    decay = train.ema_decay
    with jax.named_scope("ema"):
      ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                              feature_scale=feature_scale)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step),
               "cfg_mean": jnp.mean(cfg), **info}
    return new_state, metrics

  return train_step
