"""`losses.statistics`: an objective on chunks of a batch, given the whole batch's statistics, is the objective on the batch.

Independent expectation: each objective evaluated once on the whole batch (its own
batch-mean distance scale and per-bandwidth RMS). The chunked evaluation sums
`BatchSums` over chunks in the passes the module describes, then evaluates every
chunk with the statistics; the concatenated losses and gradients must equal the
whole batch's to float32 rounding (the sums add the same terms in another order).
Without the statistics they do not (checked too, so the test can fail).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from drifting_jax import losses
from drifting_jax.losses import statistics

B, CG, CP, CN, S = 6, 5, 7, 3, 4


def _objective(name, normalization="batch_mean", normalize_gradients=False, **extra):
  config = default.get_config().loss
  config.objective, config.kernel, config.bandwidths = name, "laplace", (0.1, 0.5)
  config.feature_normalization, config.normalize_gradients = normalization, normalize_gradients
  config.bandwidth_anneal_rate = 0.0
  for k, v in extra.items():
    config[k] = v
  return losses.objective_from_config(config)


def _inputs(seed=0, tokens=None):
  rng = np.random.default_rng(seed)
  tail = (S,) if tokens is None else (tokens, S)
  gen = rng.normal(size=(B, CG, *tail)).astype(np.float32)
  pos = (rng.normal(size=(B, CP, *tail)) + 0.7).astype(np.float32)
  neg = rng.normal(size=(B, CN, *tail)).astype(np.float32) * 1.5
  weight_neg = rng.uniform(0.0, 2.0, (B, CN)).astype(np.float32)
  return gen, pos, neg, weight_neg


def _whole(objective, gen, pos, neg, w_neg, distance_scale=None):
  def total(g):
    loss, _ = objective(g, pos, neg, weight_neg=w_neg, distance_scale=distance_scale)
    return jnp.sum(loss), loss
  (_, loss), grad = jax.value_and_grad(total, has_aux=True)(gen)
  return loss, grad


def _chunked(objective, gen, pos, neg, w_neg, chunks, distance_scale=None, use_statistics=True):
  """The three passes of `losses.statistics` over `chunks` chunks of rows."""
  parts = [np.array_split(a, chunks) for a in (gen, pos, neg, w_neg)]
  scales = [None] * chunks if distance_scale is None else np.array_split(distance_scale, chunks)
  needs = objective.batch_statistics
  stats = losses.BatchStatistics()
  if use_statistics and needs:
    def summed(stats):
      out = None
      for (g, p, n, w), sc in zip(zip(*parts), scales):
        s = objective.batch_sums(g, p, n, weight_neg=w, distance_scale=sc, statistics=stats)
        out = s if out is None else losses.add_sums(out, s)
      return out
    stats = losses.statistics_from_sums(summed(stats), field=False)
    if statistics.FIELD in needs:
      distance_only = stats if statistics.DISTANCE_SCALE in needs else losses.BatchStatistics()
      field_sums = summed(distance_only)
      stats = losses.statistics_from_sums(field_sums)._replace(distance_scale=distance_only.distance_scale)
    if statistics.DISTANCE_SCALE not in needs:
      stats = stats._replace(distance_scale=None)
  out_loss, out_grad = [], []
  for (g, p, n, w), sc in zip(zip(*parts), scales):
    def total(x):
      loss, _ = objective(x, p, n, weight_neg=w, distance_scale=sc, statistics=stats)
      return jnp.sum(loss), loss
    (_, loss), grad = jax.value_and_grad(total, has_aux=True)(g)
    out_loss.append(loss)
    out_grad.append(grad)
  return np.concatenate(out_loss), np.concatenate(out_grad)


CASES = [
    ("log_kde", dict(normalize_gradients=True)),
    ("log_kde", dict()),
    ("mmd", dict(normalize_gradients=True)),
    ("corrected", dict(normalize_gradients=True)),
    ("corrected", dict()),
    ("joint", dict(normalize_gradients=True)),
    ("release", dict()),
]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(o) or 'plain'}" for n, o in CASES])
@pytest.mark.parametrize("chunks", [2, 3])
def test_chunks_with_the_batch_statistics_equal_the_whole_batch(name, options, chunks):
  objective = _objective(name, **options)
  gen, pos, neg, w_neg = _inputs()
  want_loss, want_grad = _whole(objective, gen, pos, neg, w_neg)
  loss, grad = _chunked(objective, gen, pos, neg, w_neg, chunks)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=2e-6 * np.abs(want_grad).max())
  # Without them each chunk normalizes by its own statistics: a different objective.
  own_loss, own_grad = _chunked(objective, gen, pos, neg, w_neg, chunks, use_statistics=False)
  assert not np.allclose(own_grad, want_grad, rtol=1e-3, atol=0)


def test_tokens_and_an_explicit_per_class_scale():
  """Rank-4 groups [B, C, T, S] and the top-k EMA's per-class scale with gradient RMS."""
  objective = _objective("log_kde", normalization="topk_ema", normalize_gradients=True)
  assert objective.batch_statistics == (statistics.FIELD,)
  gen, pos, neg, w_neg = _inputs(1, tokens=3)
  scale = np.random.default_rng(2).uniform(1.0, 3.0, B).astype(np.float32)
  want_loss, want_grad = _whole(objective, gen, pos, neg, w_neg, scale)
  loss, grad = _chunked(objective, gen, pos, neg, w_neg, 3, distance_scale=scale)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=2e-6 * np.abs(want_grad).max())


def test_sinkhorn_with_the_batch_scale():
  objective = _objective("sinkhorn", sinkhorn_epsilon=0.5, sinkhorn_threshold=1e-6)
  assert objective.batch_statistics == (statistics.DISTANCE_SCALE,)
  gen, pos, neg, w_neg = _inputs(3)
  want_loss, want_grad = _whole(objective, gen, pos, neg, w_neg)
  loss, grad = _chunked(objective, gen, pos, neg, w_neg, 2)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5 * np.abs(want_grad).max())


def test_sums_are_the_closed_form_of_the_batch_scale():
  """statistics_from_sums(distance sums) is normalization.batch_distance_scale of the same distances."""
  rng = np.random.default_rng(4)
  dist = rng.uniform(0, 3, (4, 5, 6)).astype(np.float32)
  w = rng.uniform(0, 2, (4, 6)).astype(np.float32)
  sums = statistics.batch_sums([(dist[:2], w[:2])], None, 2)
  sums = losses.add_sums(sums, statistics.batch_sums([(dist[2:], w[2:])], None, 2))
  want = float(np.mean(dist * w[:, None, :]) / np.mean(w))
  np.testing.assert_allclose(losses.statistics_from_sums(sums).distance_scale, want, rtol=1e-6)
  fields = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)]
  field_sums = statistics.batch_sums([(dist, w)], fields, 2)
  np.testing.assert_allclose(losses.statistics_from_sums(field_sums).field_mean_square,
                             [np.mean(f ** 2) for f in fields], rtol=1e-6)


def test_bad_statistics_are_refused():
  objective = _objective("log_kde", normalize_gradients=True)
  gen, pos, neg, w_neg = _inputs()
  with pytest.raises(ValueError, match="one entry per bandwidth"):
    objective(gen, pos, neg, weight_neg=w_neg, statistics=losses.BatchStatistics(None, jnp.ones(3)))
  with pytest.raises(ValueError, match="must be a scalar"):
    objective(gen, pos, neg, weight_neg=w_neg, statistics=losses.BatchStatistics(jnp.ones(2)))
  with pytest.raises(TypeError, match="BatchStatistics"):
    objective(gen, pos, neg, weight_neg=w_neg, statistics=(1.0, None))
  with pytest.raises(ValueError, match="one feature group"):
    losses.log_kde_loss({"a": gen}, {"a": pos}, return_batch_sums=True)
