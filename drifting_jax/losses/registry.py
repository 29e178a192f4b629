"""The table of training objectives: a name, its function, and how its options are read from a loss config.

A trainer needs two things of an objective: the grouped function (the release's
signature, `objectives`) and its static keyword options, which come from the loss
section of a config. Both live here, so a trainer calls

    objective = losses.objective_from_config(config.loss)
    loss, info = objective(gen, pos, neg, weight_neg=..., distance_scale=...)

and never branches on an objective's name. An objective evaluated on chunks of a
batch gets the whole batch's statistics (`losses.statistics`): the configured
objective says which it needs (`batch_statistics`) and sums them (`batch_sums`). Adding an objective is a function
(with the release's signature), an options reader `reader(loss_config) -> dict`,
and one row of `OBJECTIVE_TABLE`; `sinkhorn` is the worked example
(`sinkhorn.sinkhorn_loss` and `sinkhorn.options_from_config`).

A loss config is anything with the attributes the readers use (an
ml_collections.ConfigDict in the trainer); this module does not import the
config library. Readers raise `ValueError` on a value they cannot take; the
trainer reports those as the user's mistake.

Fields read (see configs/default.py): objective, kernel, bandwidths,
feature_normalization ("batch_mean" | "topk_ema" | "none"), normalize_gradients,
bandwidth_anneal_rate, mmd_sharp, kde_impl, sinkhorn_*.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from drifting_jax.losses import sinkhorn, statistics as statistics_lib
from drifting_jax.losses.drift_objectives import corrected_drift_loss, joint_drift_loss, release_drift_loss
from drifting_jax.losses.kde_objectives import IMPLEMENTATIONS as KDE_IMPLEMENTATIONS, log_kde_loss, mmd_loss
from drifting_jax.losses.kernels import get_kernel
from drifting_jax.losses.normalization import topk_mean_distance, topk_scale_apply, topk_scale_init

FEATURE_NORMALIZATIONS = ("batch_mean", "topk_ema", "none")

OptionsReader = Callable[[Any], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """One row of the table.

  fn: the grouped objective, `fn(gen, pos, neg, weight_gen, weight_pos, weight_neg, **options)`.
  read_options: loss config -> fn's static keyword options (ValueError on a bad value).
  takes_distance_scale: whether fn takes the trainer's `distance_scale` (top-k EMA or
    annealing); the release's field computes its own batch-mean scale.
  equation: where it comes from, for error messages and docs.
  batch_statistics: fn's options -> the whole-batch statistics they normalize by
    (`statistics.DISTANCE_SCALE`, `statistics.FIELD`, in the order they are computed).
  takes_implementation: whether fn has XLA and Pallas implementations (`loss.kde_impl`).
  """
  fn: Callable[..., Any]
  read_options: OptionsReader
  takes_distance_scale: bool = True
  equation: str = ""
  batch_statistics: Callable[[dict[str, Any]], tuple[str, ...]] | None = None
  takes_implementation: bool = False

  def statistics_of(self, options: dict[str, Any]) -> tuple[str, ...]:
    if self.batch_statistics is not None:
      return self.batch_statistics(options)
    return _normalizations_in(options)


def _normalizations_in(options: dict[str, Any]) -> tuple[str, ...]:
  """The statistics a kernel objective's `normalize_distances` / `normalize_gradients` ask for."""
  return ((statistics_lib.DISTANCE_SCALE,) if options.get("normalize_distances") else ()) + (
      (statistics_lib.FIELD,) if options.get("normalize_gradients") else ())


def check_common(loss_config) -> str:
  """Checks shared by every objective; returns the feature normalization."""
  norm = loss_config.feature_normalization
  if norm not in FEATURE_NORMALIZATIONS:
    raise ValueError(f"loss.feature_normalization must be one of {FEATURE_NORMALIZATIONS}, got {norm!r}")
  if float(loss_config.bandwidth_anneal_rate) and norm == "batch_mean":
    raise ValueError("bandwidth annealing (loss.bandwidth_anneal_rate) needs loss.feature_normalization "
                     "topk_ema or none")
  return norm


def _bandwidths(loss_config) -> tuple[float, ...]:
  bandwidths = tuple(float(b) for b in loss_config.bandwidths)
  if not bandwidths or min(bandwidths) <= 0:
    raise ValueError(f"loss.bandwidths must be one or more positive widths, got {loss_config.bandwidths}")
  get_kernel(loss_config.kernel, bandwidths[0])  # an unknown kernel name fails here, before any tracing
  return bandwidths


def kernel_options(loss_config) -> dict[str, Any]:
  """Options of the kernel objectives (log-KDE, corrected, joint): kernel, widths, normalizations."""
  norm = check_common(loss_config)
  return dict(kernel=loss_config.kernel, bandwidths=_bandwidths(loss_config),
              normalize_distances=norm == "batch_mean", normalize_gradients=bool(loss_config.normalize_gradients))


def mmd_options(loss_config) -> dict[str, Any]:
  return {**kernel_options(loss_config), "sharp": bool(loss_config.mmd_sharp)}


def release_options(loss_config) -> dict[str, Any]:
  """The release's `drift_loss`: its `R_list` is `loss.bandwidths`, its scale its own batch mean."""
  norm = check_common(loss_config)
  if norm != "batch_mean" or float(loss_config.bandwidth_anneal_rate):
    raise ValueError("the release objective computes its own batch-mean scale: use "
                     "loss.feature_normalization=batch_mean and no bandwidth annealing")
  return {"R_list": _bandwidths(loss_config), "kernel": loss_config.kernel}


def _sinkhorn_options(loss_config) -> dict[str, Any]:
  return sinkhorn.options_from_config(loss_config, check_common(loss_config))


OBJECTIVE_TABLE: dict[str, ObjectiveSpec] = {
    "log_kde": ObjectiveSpec(log_kde_loss, kernel_options, equation="FHM Eq. 19", takes_implementation=True),
    "corrected": ObjectiveSpec(corrected_drift_loss, kernel_options, equation="FHM Eq. 1, 3"),
    "release": ObjectiveSpec(release_drift_loss, release_options, takes_distance_scale=False,
                             equation="the release's drift_loss (FHM Eq. 21)",
                             batch_statistics=lambda _: (statistics_lib.DISTANCE_SCALE, statistics_lib.FIELD)),
    "joint": ObjectiveSpec(joint_drift_loss, kernel_options, equation="Deng et al. Alg. 2 (FHM App. D)"),
    "mmd": ObjectiveSpec(mmd_loss, mmd_options, equation="FHM Prop. 7", takes_implementation=True),
    "sinkhorn": ObjectiveSpec(sinkhorn.sinkhorn_loss, _sinkhorn_options, equation="debiased Sinkhorn divergence"),
}


def get_spec(name: str) -> ObjectiveSpec:
  if name not in OBJECTIVE_TABLE:
    raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVE_TABLE)}")
  return OBJECTIVE_TABLE[name]


@dataclasses.dataclass(frozen=True)
class ConfiguredObjective:
  """An objective of the table with its options read, behind keyword-only calls.

  `objective(gen, pos, neg=None, *, weight_neg=None, distance_scale=None,
  statistics=None) -> (loss [B], info)`, so the caller never spells positional Nones
  or knows which objective takes which option. `distance_scale` is dropped for
  objectives that compute their own (the release's). On a chunk of a batch,
  `statistics` is the whole batch's (`losses.statistics`): `batch_statistics` names
  the ones the options need, `batch_sums` sums them over a chunk.
  """
  spec: ObjectiveSpec
  options: dict[str, Any]

  @property
  def batch_statistics(self) -> tuple[str, ...]:
    return self.spec.statistics_of(self.options)

  def _call(self, gen, pos, neg, weight_neg, distance_scale, statistics, return_batch_sums):
    scale = {"distance_scale": distance_scale} if self.spec.takes_distance_scale else {}
    return self.spec.fn(gen, pos, neg, weight_neg=weight_neg, statistics=statistics,
                        return_batch_sums=return_batch_sums, **scale, **self.options)

  def __call__(self, gen, pos, neg=None, *, weight_neg=None, distance_scale=None, statistics=None):
    return self._call(gen, pos, neg, weight_neg, distance_scale, statistics, False)

  def batch_sums(self, gen, pos, neg=None, *, weight_neg=None, distance_scale=None,
                 statistics=None) -> statistics_lib.BatchSums:
    """These groups' `BatchSums`; the field sums are formed with `statistics`' distance scale."""
    return self._call(gen, pos, neg, weight_neg, distance_scale, statistics, True)[2]


KDE_IMPLEMENTATION_CHOICES = ("auto",) + KDE_IMPLEMENTATIONS


def kde_implementation(choice: str, platform: str | None) -> str:
  """`loss.kde_impl` on devices of `platform` ("tpu", "gpu", "cpu"; None: not known).

  "auto": the Pallas kernels (`fused_kde`) on TPU, XLA elsewhere; "pallas" needs TPUs
  where the platform is known; "pallas_interpret" runs those kernels in the Pallas
  interpreter anywhere (tests, numerics checks on a CPU).
  """
  if choice not in KDE_IMPLEMENTATION_CHOICES:
    raise ValueError(f"loss.kde_impl must be one of {KDE_IMPLEMENTATION_CHOICES}, got {choice!r}")
  if choice == "auto":
    return "pallas" if platform == "tpu" else "xla"
  if choice == "pallas" and platform not in (None, "tpu"):
    raise ValueError(f"loss.kde_impl=pallas needs TPUs; these devices are {platform} (use 'auto', 'xla' or "
                     "'pallas_interpret')")
  return choice


def objective_from_config(loss_config, platform: str | None = None,
                          batch_sharding: tuple | None = None) -> ConfiguredObjective:
  """The objective `loss_config.objective` with its options read (and checked) once.

  `platform`: that of the devices the objective will run on, where known (it resolves
  `loss.kde_impl`; unknown: "auto" is XLA's). `batch_sharding`: (mesh, its axes of the
  class axis) where the inputs are split over devices (Pallas kernels run per device).
  """
  spec = get_spec(loss_config.objective)
  options = spec.read_options(loss_config)
  # Checked for every objective (a typo is never ignored); the platform only where it matters.
  implementation = kde_implementation(loss_config.kde_impl, platform if spec.takes_implementation else None)
  if spec.takes_implementation:
    options["implementation"] = implementation
    options["batch_sharding"] = batch_sharding
  return ConfiguredObjective(spec, options)


# --------------------------------------------------------------------------- distance scaling


@dataclasses.dataclass(frozen=True)
class DistanceScaling:
  """How a trainer makes feature distances scale-free (`loss.feature_normalization`).

  stateful: whether the trainer carries a per-feature-group state across steps
    (FHM's per-class top-k EMA); then `init(num_classes)` makes one group's state and
    `update(state, positives [B, P, F], class_ids [B])` returns (new state, scale [B]),
    the scale the objective divides distances by (its `distance_scale`).
  `update` is `apply(state, statistic(positives), class_ids)`: a trainer that sees the
  classes in chunks gathers `statistic` [C] per chunk and applies them once.
  Stateless ones pass no scale: the objective uses its own batch mean ("batch_mean")
  or raw distances ("none").
  min_positives: the fewest positives per class the scaling works with (top-k needs k + 1).
  """
  stateful: bool = False
  init: Callable[[int], Any] | None = None
  statistic: Callable[[Any], Any] | None = None
  apply: Callable[..., tuple[Any, Any]] | None = None
  min_positives: int = 1

  def update(self, state, positives, class_ids):
    return self.apply(state, self.statistic(positives), class_ids)


def distance_scaling_from_config(loss_config) -> DistanceScaling:
  """The `DistanceScaling` of `loss_config.feature_normalization` (ValueError on a bad name or value)."""
  norm = check_common(loss_config)
  if norm != "topk_ema":
    return DistanceScaling()
  k, beta = int(loss_config.topk_k), float(loss_config.topk_beta)
  if k < 1 or not 0.0 <= beta < 1.0:
    raise ValueError(f"top-k feature normalization needs loss.topk_k >= 1 and 0 <= loss.topk_beta < 1, "
                     f"got {k} and {beta}")

  return DistanceScaling(stateful=True, init=topk_scale_init,
                         statistic=functools.partial(topk_mean_distance, k=k),
                         apply=functools.partial(topk_scale_apply, beta=beta), min_positives=k + 1)
