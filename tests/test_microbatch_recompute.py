"""`train.microbatch_features="recompute"`: the objective in chunks too, with the whole batch's statistics.

The step gathers the batch's statistics (distance sums, then the fields' squared sums;
the top-k scales' per-class statistic) in forward scans over the chunks, then takes each
chunk's loss and gradient with them (`losses.statistics`), so only one chunk's features
are alive. Checked at toy size against the unchunked step (`microbatch_checks`) for 2
and 4 chunks, every objective, both normalizations, on a 2 x 4 mesh, with pre-emption;
and `train.microbatches=auto`'s turn to recomputed features with a stand-in compiler.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from drifting_jax import partitioning
from drifting_jax.train import program as program_lib
from microbatch_checks import (EVERY_OBJECTIVE, assert_four_chunks_equal_the_whole_step, assert_same_step,
                               assert_two_chunks_on_a_mesh_equal_the_whole_step, config, one_step, single_device_mesh)
from test_microbatches import preempted_and_resumed_equals_straight


@pytest.mark.slow
def test_recomputed_chunks_equal_the_whole_step_in_the_releases_setting():
  """Batch-mean scale and gradient RMS per bandwidth: both statistics passes."""
  mesh = single_device_mesh()
  reference = one_step(config("log_kde", "batch_mean", 1, normalize_gradients=True), mesh)
  assert np.isfinite(reference[0])
  for count in (2, 4):
    assert_same_step(reference, one_step(config("log_kde", "batch_mean", count, "recompute",
                                                normalize_gradients=True), mesh))


@pytest.mark.slow
def test_recomputed_chunks_equal_the_whole_step_with_topk_scales():
  """FHM's top-k EMA: the per-class statistic gathered first, the EMA updated once."""
  mesh = single_device_mesh()
  reference = one_step(config("log_kde", "topk_ema", 1), mesh)
  assert_same_step(reference, one_step(config("log_kde", "topk_ema", 4, "recompute"), mesh))


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("objective", EVERY_OBJECTIVE)
@pytest.mark.parametrize("normalization", ["batch_mean", "topk_ema"])
def test_recomputed_chunks_equal_the_whole_step_every_objective(objective, normalization):
  assert_four_chunks_equal_the_whole_step(objective, normalization, "recompute")


@pytest.mark.slow
@pytest.mark.e2e
def test_recomputed_chunks_on_a_mesh_of_eight_devices():
  assert_two_chunks_on_a_mesh_equal_the_whole_step("recompute")


@pytest.mark.slow
@pytest.mark.e2e
def test_preempted_and_resumed_run_with_recomputed_chunks_is_bit_exact(tmp_path, monkeypatch):
  preempted_and_resumed_equals_straight(tmp_path, monkeypatch, "recompute")


@pytest.mark.slow
@pytest.mark.e2e
def test_memory_falls_with_the_count():
  mesh = single_device_mesh()
  totals = {}
  for count in (2, 4):
    compiled = program_lib.build_train_program(config(microbatches=count, features="recompute"), mesh).compile()
    totals[count] = program_lib.memory_total(program_lib.memory_parts(compiled))
  assert totals[2] > totals[4], totals


class _FakeCompiled:
  def __init__(self, total):
    self.total = total

  def memory_analysis(self):
    return type("M", (), dict(argument_size_in_bytes=self.total, output_size_in_bytes=0, alias_size_in_bytes=0,
                              temp_size_in_bytes=0, generated_code_size_in_bytes=0))()


def test_auto_turns_to_recomputed_features_when_kept_ones_cannot_fit():
  """A stand-in compiler: kept features cost a floor of 100 + 64 / count, recomputed ones
  20 + 64 / count (GiB). With 40 GiB no kept count can fit: after 1 and 2 chunks (164, 132 GiB)
  larger counts can save at most the 32 GiB that 1 -> 2 saved, and 132 is 92 over; so auto
  stops trying them and picks 4 chunks recomputed (36 GiB)."""
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  cfg = config(microbatches="auto")
  cfg.train.classes_per_step = 16
  gib = program_lib.GIB
  compiled_as = []

  def compile_program(built):
    count, mode = int(built.train.microbatches), built.train.microbatch_features
    compiled_as.append((mode, count))
    floor = 100 if mode in ("keep", "auto") else 20
    return _FakeCompiled(int((floor + 64 / count) * gib))

  program, _, line = program_lib.compile_fitting(cfg, mesh, capacity=(40 * gib, "test GPU"),
                                                 build=lambda c: c, compile_program=compile_program)
  assert compiled_as == [("keep", 1), ("keep", 2), ("recompute", 2), ("recompute", 4)], compiled_as
  assert program.train.microbatches == 4 and program.train.microbatch_features == "recompute"
  assert line.startswith("train.microbatches=auto: 4 with train.microbatch_features=recompute (keep: 1: 164.00 GiB, "
                         "2: 132.00 GiB, no larger count can fit with the features kept, recompute: 2: 52.00 GiB did "
                         "not fit; 4: 36.00 GiB fits the 40 GiB of a test GPU"), line
  # Where kept features can fit, auto finds them first (floor 100 < 120 GiB at 4 chunks: 116).
  compiled_as.clear()
  program, _, line = program_lib.compile_fitting(cfg, mesh, capacity=(120 * gib, "test GPU"),
                                                 build=lambda c: c, compile_program=compile_program)
  assert compiled_as == [("keep", 1), ("keep", 2), ("keep", 4)] and program.train.microbatch_features == "keep"
  # An explicit mode is the only one tried.
  cfg.train.microbatch_features = "keep"
  with pytest.raises(program_lib.DoesNotFit, match="no count fits"):
    program_lib.compile_fitting(cfg, mesh, capacity=(40 * gib, "test GPU"), build=lambda c: c,
                                compile_program=compile_program)
