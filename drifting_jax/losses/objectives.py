"""Grouped training objectives with the official release's `drift_loss` signature.

Every objective takes

    gen        [B, Cg, S]  generated features (differentiable)
    fixed_pos  [B, Cp, S]  data features of the group's class
    fixed_neg  [B, Cn, S]  extra negatives, e.g. unconditional data for CFG (optional)
    weight_gen [B, Cg], weight_pos [B, Cp], weight_neg [B, Cn]  (optional, default 1)

and returns `(loss [B], info)`, so it drops into the release's training loop. A
group b is one class (and one feature location); the objectives never mix groups
except through the batch-wide distance scale, which is a stop-gradient statistic.
Rank-4 inputs [B, C, T, S] treat T as T independent groups per row and average
their losses; a dict of such arrays (feature groups) sums the groups' losses, as
the release's trainer does (`sum_over_feature_groups`).

The negatives of the model distribution q are the *other* generated samples of
the group (stop-gradient, self excluded) plus `fixed_neg`, weighted. With the
release's CFG weights (generated 1, unconditional (alpha - 1)(Cg - 1)/Cn) the
negative KDE is q / alpha + (1 - 1/alpha) p_uncond, so guidance needs no special
case here.

Objectives (FHM = Franz, Hoffmann & Martius 2026; Deng = Deng et al. 2026):
  log_kde_loss          E_x[log q#(x) - log p#(x)], sharp kernel    (FHM Eq. 19)
  corrected_drift_loss  |x - sg(x + V)|^2, V = corrected field       (FHM Eq. 1, 3)
  joint_drift_loss      |x - sg(x + V)|^2, V = Deng's Algorithm 2    (FHM App. D)
  release_drift_loss    the official release's field, bit-compatible
  mmd_loss              E_x[q_hat(x) - p_hat(x)], MMD witness         (FHM Prop. 7)

The objectives live by family in `kde_objectives` (log-KDE, MMD) and
`drift_objectives` (corrected, joint, release); their shared input handling and
`sum_over_feature_groups` in `groups`. This module gathers them under the one
name the rest of the package and the release's users know.
"""

from drifting_jax.losses.drift_objectives import corrected_drift_loss, joint_drift_loss, release_drift_loss
from drifting_jax.losses.groups import sum_over_feature_groups
from drifting_jax.losses.kde_objectives import log_kde_loss, mmd_loss

__all__ = ["corrected_drift_loss", "joint_drift_loss", "log_kde_loss", "mmd_loss", "release_drift_loss",
           "sum_over_feature_groups"]
