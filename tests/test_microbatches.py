"""`train.microbatches`: gradient accumulation inside one compiled step, equal to the unchunked step.

The objective couples the samples of a class and normalizes by whole-batch statistics
(the release's batch-mean distance scale, gradient RMS per bandwidth), so the
microbatched step with `microbatch_features="keep"` computes the whole batch's
features chunk by chunk, evaluates the objective on all of them at once, and pulls its
gradient back through the networks chunk by chunk. Checked here at toy size against
the unchunked step for 1, 2 and 4 chunks (`microbatch_checks.assert_same_step`), with
the count's checks, `auto` and pre-emption; the recomputed features
(`microbatch_features="recompute"`) in tests/test_microbatch_recompute.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import mnist_tiny
from drifting_jax import checkpointing, errors, partitioning
from drifting_jax.models import artifacts
from drifting_jax.train import program as program_lib, trainer
from microbatch_checks import (EVERY_OBJECTIVE, assert_four_chunks_equal_the_whole_step, assert_same_step,
                               assert_two_chunks_on_a_mesh_equal_the_whole_step,
                               config as _config, one_step as _one_step, single_device_mesh as _mesh)


@pytest.mark.slow  # whole training steps compiled (3 each): out of the edit-run loop (make test-fast)
@pytest.mark.parametrize("normalization,extra", [("batch_mean", {"normalize_gradients": True}),
                                                 ("topk_ema", {})])
def test_chunked_step_equals_the_whole_step_log_kde(normalization, extra):
  """The release's setting (batch-mean scale, gradient RMS per bandwidth) and FHM's top-k EMA."""
  mesh = _mesh()
  reference = _one_step(_config("log_kde", normalization, 1, **extra), mesh)
  assert np.isfinite(reference[0])
  for count in (2, 4):
    assert_same_step(reference, _one_step(_config("log_kde", normalization, count, "keep", **extra), mesh))


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("objective", EVERY_OBJECTIVE)
@pytest.mark.parametrize("normalization", ["batch_mean", "topk_ema"])
def test_chunked_step_equals_the_whole_step_every_objective(objective, normalization):
  assert_four_chunks_equal_the_whole_step(objective, normalization, "keep")


@pytest.mark.slow
def test_chunked_step_on_a_mesh_of_eight_devices():
  assert_two_chunks_on_a_mesh_equal_the_whole_step("keep")


def test_a_count_that_does_not_split_the_classes_is_one_line():
  mesh = partitioning.make_mesh(data=2, fsdp=4)
  config = _config(microbatches=3)
  with pytest.raises(errors.UsageError, match=r"^invalid config: train.microbatches must be 'auto' or a count >= 1 "
                                              r"that divides train.classes_per_step=4, got 3$"):
    trainer.validate_config(config)
  with pytest.raises(errors.UsageError, match="train.microbatches=4 leaves 1 classes per chunk, which do not split "
                                              "over the mesh's 2 data shards"):
    program_lib.requested_microbatches(_config(microbatches=4), mesh)
  assert program_lib.microbatch_counts(_config(), mesh) == [1, 2]
  with pytest.raises(errors.UsageError, match="got 'two'"):
    program_lib.requested_microbatches(_config(microbatches="two"), mesh)
  with pytest.raises(errors.UsageError, match=r"train.microbatch_features must be one of \('auto', 'keep', "
                                              r"'recompute'\), got 'sometimes'"):
    trainer.validate_config(_config(microbatches=2, features="sometimes"))


@pytest.mark.slow
def test_auto_picks_the_smallest_count_that_fits():
  """Memory per device falls with the count; auto takes the first under the capacity."""
  mesh = _mesh()
  config = _config(microbatches="auto", features="keep")
  totals = {}

  def compile_and_record(program):
    compiled = program.compile()
    totals[int(program.config.train.microbatches)] = program_lib.memory_total(program_lib.memory_parts(compiled))
    return compiled

  build = lambda c: program_lib.build_train_program(c, mesh)
  # Measure all three first (a capacity nothing fits), then pick with one between 2's and 1's.
  with pytest.raises(program_lib.DoesNotFit, match="no count fits"):
    program_lib.compile_fitting(config, mesh, capacity=(1, "test chip"), build=build,
                                compile_program=compile_and_record)
  assert totals[1] > totals[2] > totals[4], totals
  capacity = (totals[1] + totals[2]) // 2
  program, _, line = program_lib.compile_fitting(config, mesh, capacity=(capacity, "test chip"), build=build,
                                                 compile_program=compile_and_record)
  assert program.config.train.microbatches == 2
  assert line.startswith("train.microbatches=auto: 2 (1: ") and "did not fit; 2: " in line
  # On the CPU nothing is budgeted: auto is 1, and says why.
  program, _, line = program_lib.compile_fitting(config, mesh, capacity=None, build=build,
                                                 compile_program=lambda p: p.compile())
  assert program.config.train.microbatches == 1 and "not budget" in line


def preempted_and_resumed_equals_straight(tmp_path, monkeypatch, features):
  """A run stopped at step 4 and resumed ends with the parameters of a run straight through
  (the mesh: 8 devices, data 2 x fsdp 4, 2 chunks)."""
  config = mnist_tiny.get_config("smoke")
  config.train.classes_per_step, config.train.microbatches = 4, 2
  config.train.microbatch_features = features
  config.mesh.data, config.mesh.fsdp = 2, 4

  def final(workdir):
    return artifacts.load(workdir / "params_ema", kind="gen")[1]

  trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  monkeypatch.setattr(checkpointing.PreemptionGuard, "should_stop", lambda self, step: step == 4)
  trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert checkpointing.Checkpointer(tmp_path / "resumed").latest_step() == 4
  monkeypatch.undo()
  trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  jax.tree.map(np.testing.assert_array_equal, final(tmp_path / "resumed"), final(tmp_path / "straight"))


@pytest.mark.slow
def test_preempted_and_resumed_run_with_chunks_is_bit_exact(tmp_path, monkeypatch):
  """The pre-emption guarantee holds with chunks."""
  preempted_and_resumed_equals_straight(tmp_path, monkeypatch, "keep")
