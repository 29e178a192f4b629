"""FID, Inception Score and precision/recall against closed forms and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from drifting_jax.eval import metrics


def _diagonal_frechet(mu1, s1, mu2, s2):
  """Closed form for diagonal covariances (variances s1, s2)."""
  return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_given_statistics_is_the_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
  s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
  expected = _diagonal_frechet(mu1, s1, mu2, s2)
  assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
  assert metrics.frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(expected, rel=1e-10)
  # Equal covariances (here not diagonal): only the means count.
  a = np.random.default_rng(0).normal(size=(4, 4))
  sigma = a @ a.T + np.eye(4)
  assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-8)
  assert metrics.frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0.0, abs=1e-8)
  # Rotating both Gaussians together changes nothing.
  q, _ = np.linalg.qr(a)
  rotated = metrics.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
  assert rotated == pytest.approx(expected, rel=1e-8)
  # Scalars are 1-d Gaussians.
  assert metrics.frechet_distance(0.0, 4.0, 3.0, 1.0) == pytest.approx(9.0 + 4.0 + 1.0 - 2 * 2.0)


def test_fid_from_samples_converges_to_the_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
  s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 0.5])
  n = 200_000
  x1 = mu1 + np.sqrt(s1) * rng.normal(size=(n, 3))
  x2 = mu2 + np.sqrt(s2) * rng.normal(size=(n, 3))
  mu, sigma = metrics.compute_statistics(x1)
  np.testing.assert_allclose(sigma, np.cov(x1, rowvar=False))  # unbiased, float64
  assert mu.dtype == sigma.dtype == np.float64
  assert metrics.fid_from_features(x1, x2) == pytest.approx(_diagonal_frechet(mu1, s1, mu2, s2), rel=2e-2)


def test_frechet_distance_edge_cases():
  rng = np.random.default_rng(2)
  # More dimensions than samples: singular covariances still give a finite distance.
  few = rng.normal(size=(5, 10)), rng.normal(size=(5, 10))
  value = metrics.fid_from_features(*few)
  assert np.isfinite(value) and value >= -1e-6
  with pytest.raises(ValueError, match="imaginary component"):
    metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="same length"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match=r"sigma2 must be a \(2, 2\) covariance"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
  with pytest.raises(ValueError, match="mu1 contains NaN"):
    metrics.frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="at least 2 samples"):
    metrics.compute_statistics(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="NaN or infinite"):
    metrics.compute_statistics(np.array([[0.0, np.inf], [1.0, 1.0]]))


def test_reference_statistics_round_trip(tmp_path):
  rng = np.random.default_rng(3)
  mu, sigma = metrics.compute_statistics(rng.normal(size=(50, 6)))
  path = metrics.save_reference_statistics(tmp_path / "stats" / "ref.npz", mu, sigma)
  loaded_mu, loaded_sigma = metrics.load_reference_statistics(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # written atomically
  np.savez(tmp_path / "adm.npz", ref_mu=mu, ref_sigma=sigma)  # the other naming in use
  np.testing.assert_array_equal(metrics.load_reference_statistics(tmp_path / "adm.npz")[1], sigma)

  with pytest.raises(FileNotFoundError, match="compute_statistics"):
    metrics.load_reference_statistics(tmp_path / "missing.npz")
  np.savez(tmp_path / "wrong.npz", mean=mu)
  with pytest.raises(ValueError, match=r"no 'mu'/'sigma'.*found \['mean'\]"):
    metrics.load_reference_statistics(tmp_path / "wrong.npz")
  np.savez(tmp_path / "shapes.npz", mu=mu, sigma=sigma[:3])
  with pytest.raises(ValueError, match=r"expected mu of shape \(D,\) and sigma of shape \(D, D\)"):
    metrics.load_reference_statistics(tmp_path / "shapes.npz")
  (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(ValueError, match="not a readable .npz"):
    metrics.load_reference_statistics(tmp_path / "corrupt.npz")
  with pytest.raises(ValueError, match=r"\.npz files"):
    metrics.save_reference_statistics(tmp_path / "ref.npy", mu, sigma)


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_extremes():
  # Uniform predictions: p(y|x) = p(y), score 1.
  mean, std = metrics.inception_score(np.zeros((100, 7)), splits=5)
  assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
  # Confident, evenly spread over C classes: score C, in every split.
  classes = 10
  logits = 100.0 * np.eye(classes)[np.tile(np.arange(classes), 4)]
  assert metrics.inception_score(logits, splits=4, shuffle_seed=None) == pytest.approx((classes, 0.0), abs=1e-6)
  assert metrics.inception_score(logits, splits=1)[0] == pytest.approx(classes, rel=1e-9)
  # Confident but all the same class: score 1.
  assert metrics.inception_score(100.0 * np.eye(classes)[np.zeros(40, int)], splits=2)[0] == pytest.approx(1.0)


def test_inception_score_matches_the_original_formula():
  rng = np.random.default_rng(4)
  logits = 3 * rng.normal(size=(120, 6))
  shuffled = logits[np.random.RandomState(2020).permutation(120)]
  scores = []
  for part in np.split(shuffled, 4):
    p = np.exp(part) / np.exp(part).sum(axis=1, keepdims=True)
    kl = (p * (np.log(p) - np.log(p.mean(axis=0, keepdims=True)))).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  mean, std = metrics.inception_score(logits, splits=4)
  assert (mean, std) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)
  # The remainder that does not fill a split is dropped.
  unshuffled = metrics.inception_score(logits, splits=4, shuffle_seed=None)
  extra = np.concatenate([logits, rng.normal(size=(3, 6))])
  assert metrics.inception_score(extra, splits=4, shuffle_seed=None) == unshuffled
  with pytest.raises(ValueError, match="splits"):
    metrics.inception_score(logits[:3], splits=4)
  with pytest.raises(ValueError, match="NaN or infinite"):
    metrics.inception_score(np.full((4, 2), np.nan), splits=1)


# ----------------------------------------------------------------------------- precision / recall


def _brute_force_precision_recall(real, fake, k=3):
  def radii(x):
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]

  cross = ((real[:, None] - fake[None]) ** 2).sum(-1)  # (real, fake)
  precision = np.mean((cross <= radii(real)[:, None]).any(axis=0))
  recall = np.mean((cross <= radii(fake)[None, :]).any(axis=1))
  return precision, recall


def test_precision_recall_extremes():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(60, 8))
  assert metrics.precision_recall(real, real) == (1.0, 1.0)
  assert metrics.precision_recall(real, real + 1000.0) == (0.0, 0.0)
  # Half of the real set: every sample is real (precision 1), but it recalls less.
  precision, recall = metrics.precision_recall(real, real[:30])
  assert precision == 1.0 and recall < 1.0


def test_precision_recall_match_brute_force_in_any_blocks():
  rng = np.random.default_rng(6)
  real = rng.normal(size=(70, 5))
  fake = 0.8 * rng.normal(size=(45, 5)) + 0.5
  expected = _brute_force_precision_recall(real, fake)
  assert 0.1 < expected[0] < 0.99 and 0.1 < expected[1] < 0.99  # a case with something to get wrong
  for batch_size in (5000, 16, 7):  # one block; several blocks with padded rows
    assert metrics.precision_recall(real, fake, batch_size=batch_size) == pytest.approx(expected, abs=1e-12)
  d = ((real[:, None] - real[None]) ** 2).sum(-1)
  np.testing.assert_allclose(metrics.nearest_neighbour_radii(real, k=3, batch_size=16), np.sort(d, axis=1)[:, 3],
                             rtol=1e-5)
  with pytest.raises(ValueError, match=r"k must be an integer in \[1, len\(fake_features\) - 1\]"):
    metrics.precision_recall(real, fake[:3])
  with pytest.raises(ValueError, match="differ in dimension"):
    metrics.precision_recall(real, fake[:, :4])
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    metrics.precision_recall(real, fake, batch_size=0)
