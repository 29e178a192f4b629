"""drifting_jax.losses: the loss library of drifting models, in pure JAX.

Kernels (`kernels`), point-wise fields and potentials (`fields`), grouped training
objectives with the official release's signature (`objectives`, gathered from `kde_objectives`,
`drift_objectives` and their shared input handling in `groups`), the Sinkhorn-divergence
objective built on ott-jax (`sinkhorn`), feature-space distance normalizations
(`normalization`), whole-batch statistics summed over chunks of a batch (`statistics`)
and the table of objectives with their config options (`registry`). This package imports nothing from the rest of drifting_jax.
"""

from drifting_jax.losses.fields import NORMALIZATIONS, curl, drift_field, log_kde_potential
from drifting_jax.losses.kernels import (KERNEL_NAMES, PROFILES, Kernel, gaussian, get_kernel, laplace,
                                         radial_kernel, rational_quadratic)
from drifting_jax.losses.normalization import (TopKScaleState, batch_distance_scale, topk_mean_distance,
                                               topk_scale_apply, topk_scale_init, topk_scale_update)
from drifting_jax.losses.objectives import (corrected_drift_loss, joint_drift_loss, log_kde_loss, mmd_loss,
                                            release_drift_loss, sum_over_feature_groups)
from drifting_jax.losses.sinkhorn import sinkhorn_loss
from drifting_jax.losses.statistics import BatchStatistics, BatchSums, add_sums, statistics_from_sums

from drifting_jax.losses.registry import (OBJECTIVE_TABLE, ConfiguredObjective, DistanceScaling, ObjectiveSpec,
                                         distance_scaling_from_config, get_spec, objective_from_config)

# name -> grouped objective function: the functions of the table (`registry.OBJECTIVE_TABLE`).
OBJECTIVES = {name: spec.fn for name, spec in OBJECTIVE_TABLE.items()}


def get_objective(name: str):
  """The grouped objective called `name` (one of OBJECTIVES)."""
  return get_spec(name).fn


__all__ = [
    "KERNEL_NAMES", "NORMALIZATIONS", "OBJECTIVES", "OBJECTIVE_TABLE", "PROFILES", "BatchStatistics", "BatchSums",
    "ConfiguredObjective", "Kernel", "ObjectiveSpec", "add_sums", "statistics_from_sums",
    "TopKScaleState", "DistanceScaling", "distance_scaling_from_config", "get_spec", "objective_from_config",
    "batch_distance_scale", "corrected_drift_loss", "curl", "drift_field", "gaussian", "get_kernel",
    "get_objective", "joint_drift_loss", "laplace", "log_kde_loss", "log_kde_potential", "mmd_loss",
    "radial_kernel", "rational_quadratic", "release_drift_loss", "sinkhorn_loss", "sum_over_feature_groups",
    "topk_mean_distance", "topk_scale_apply", "topk_scale_init", "topk_scale_update",
]
