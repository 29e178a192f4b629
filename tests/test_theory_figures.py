"""The numeric part of scripts/theory_figures.py on small inputs: FHM's claims hold."""

import json

import numpy as np
import pytest

from scripts import theory_figures as tf

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-fast skips this module: it computes the paper's figures


@pytest.fixture(scope="module")
def curl():
  return tf.curl_maps(grid_size=13)


@pytest.fixture(scope="module")
def profiles():
  return tf.field_profiles(num_points=41)


def test_sharp_fields_and_gaussian_drift_field_are_curl_free(curl):
  numbers = curl["numbers"]
  for name in tf.KERNELS:
    assert numbers[name]["sharp"]["curl_over_jacobian"] < 1e-10, name
    assert numbers[name]["naive"]["curl_vs_jacobian_antisymmetric_part"] < 1e-12
  assert numbers["gaussian"]["naive"]["curl_over_jacobian"] < 1e-10
  # FHM Prop. 8: the Gaussian drift field is s^2 times the sharp one.
  assert numbers["gaussian"]["naive_minus_s2_sharp_rel"] < 1e-10
  assert curl["maps"]["laplace"]["naive"].shape == (13, 13)


@pytest.mark.parametrize("name", ["laplace", "rational_quadratic"])
def test_non_gaussian_drift_fields_have_curl(curl, name):
  assert curl["numbers"][name]["naive"]["curl_over_jacobian"] > 0.05


def test_table1_closed_forms_match_numerical_sharp_and_identity():
  table = tf.table1_check(bandwidths=(0.7,), num_pairs=8)["kernels"]
  for name, row in table.items():
    assert row["sharp_rel_err"] < 1e-4 and row["flat_rel_err"] < 1e-4, name
    assert row["identity_sharp_closed_f64"] < 1e-10 and row["identity_flat_closed_f64"] < 1e-10, name
    assert row["identity_sharp_numeric_f32"] < 1e-4 and row["identity_flat_numeric_f32"] < 1e-4, name


def test_gradient_identity_in_float64():
  result = tf.gradient_identity(b=1, cg=6, cp=5, cn=3, s=4)
  for name, row in result["kernels"].items():
    for setting, errors in row.items():
      assert errors["max_rel_err"] < 1e-10, (name, setting)


def test_field_profiles_far_field_decay(profiles):
  numbers = profiles["numbers"]
  # The drift (naive) field keeps a constant magnitude far away; the sharp field of
  # the Laplace and RQ kernels decays like 1 / x^2; MMD's decays faster.
  for name in ("laplace", "rational_quadratic"):
    assert abs(numbers[name]["naive"]["log_log_slope_50_to_100"]) < 0.05
    assert abs(numbers[name]["sharp"]["log_log_slope_50_to_100"] + 2.0) < 0.1
  for name in tf.KERNELS:
    for normalization in ("none", "naive", "sharp"):
      assert numbers[name][normalization]["max_abs"] > 0, (name, normalization)


def test_appendix_d_fields(curl, profiles):
  app = tf.appendix_d(groups=tf.release_shaped_groups(b=2, cg=16, cp=16, cn=4, s=8),
                      toy=tf.toy_2d(num_gen=16), temperatures=(0.2,))
  # Gradient-to-field recovery is exact up to float32 round-off.
  for value in app["recovery_check"].values():
    assert value < 1e-4
  rows = app["release_groups"]["R=0.2"]
  # The release computes Algorithm 2 (up to its 1e-6 floor), which is not Eq. 3.
  assert rows["release_vs_joint"]["angle_deg"]["max"] < 5.0
  assert rows["joint_vs_corrected"]["angle_deg"]["mean"] > 1.0
  numbers = tf.numbers_only({"curl": curl, "profiles": profiles, "table1": {}, "gradient_identity": {},
                             "appendix_d": app, "seconds": {}})
  json.dumps(numbers)  # everything the script writes is JSON-serializable
  assert "toy_fields" not in numbers["appendix_d"]
  assert np.isfinite(rows["release_vs_corrected"]["magnitude_ratio"]["mean"])
