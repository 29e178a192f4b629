"""`train.microbatches`: gradient accumulation inside one compiled step, equal to the unchunked step.

The objective couples the samples of a class and normalizes by whole-batch statistics
(the release's batch-mean distance scale, gradient RMS per bandwidth). The microbatched
step either keeps the whole batch's features (computed chunk by chunk), evaluates the
objective on all of them at once and pulls its gradient back chunk by chunk
(`microbatch_features="keep"`), or gathers the batch's statistics over the chunks
first and then evaluates the objective chunk by chunk with them ("recompute").
Checked here, both ways, at toy size against the unchunked step for 1, 2 and 4
chunks: the loss, the gradient (Adam's first moment after one step is (1 - b1) g),
the top-k scales and the parameters after one update, to float32 rounding (the
chunked sums add the same terms in another order).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import mnist_tiny
from drifting_jax import checkpointing, errors, partitioning
from drifting_jax.models import artifacts
from drifting_jax.train import program as program_lib, trainer

CLASSES = 4


def _config(objective="log_kde", normalization="batch_mean", microbatches=1, features="auto", **loss):
  c = mnist_tiny.get_config("smoke")
  c.train.classes_per_step = CLASSES
  c.train.gen_per_class, c.train.pos_per_class, c.train.neg_per_class = 4, 6, 3
  c.train.cfg_max = 3.0  # guidance: unconditional negatives weighted per class
  c.loss.objective, c.loss.feature_normalization = objective, normalization
  c.loss.topk_k = 3
  c.loss.bandwidths = (0.1, 0.3)
  c.loss.kernel = "laplace"
  if normalization == "batch_mean":  # the tiny config anneals its widths, which needs a fixed scale
    c.loss.bandwidth_anneal_rate = 0.0
  for k, v in loss.items():
    c.loss[k] = v
  c.train.microbatches = microbatches
  c.train.microbatch_features = features
  return c


def _batch(config):
  rng = np.random.default_rng(0)
  t = config.train
  return {"labels": np.array([1, 3, 4, 8], np.int32),
          "positives": rng.uniform(-1, 1, (CLASSES, t.pos_per_class, 28, 28, 1)).astype(np.float32),
          "negatives": rng.uniform(-1, 1, (CLASSES, t.neg_per_class, 28, 28, 1)).astype(np.float32)}


def _one_step(config, mesh):
  program = program_lib.build_train_program(config, mesh)
  state = program.init()
  batch = {k: partitioning.host_to_global(v, mesh) for k, v in _batch(config).items()}
  new_state, metrics = program.jitted(state, program.place_feature_params(), batch)
  first_moment = [s for s in jax.tree.leaves(new_state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                  if hasattr(s, "mu")][0].mu
  return jax.device_get((metrics["loss"], first_moment, new_state.params, new_state.feature_scale))


def _assert_same_step(reference, chunked):
  loss_1, mu_1, params_1, scale_1 = reference
  loss_m, mu_m, params_m, scale_m = chunked
  np.testing.assert_allclose(loss_m, loss_1, rtol=2e-5)
  g_1, g_m = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (mu_1, mu_m))
  # Gradients: the same to rounding, relative to their largest entry (sums in another order).
  np.testing.assert_allclose(g_m, g_1, rtol=1e-4, atol=1e-5 * np.max(np.abs(g_1)))
  # The update: Adam's first step is ~lr * sign(g), ill-conditioned where g is ~0; compare the rest.
  p_1, p_m = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (params_1, params_m))
  big = np.abs(g_1) > 1e-3 * np.max(np.abs(g_1))
  np.testing.assert_allclose(p_m[big], p_1[big], rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), scale_m, scale_1)



def _mesh():
  return partitioning.make_mesh(devices=jax.devices()[:1])


@pytest.mark.slow  # whole training steps compiled (3 each): out of the edit-run loop (make test-fast)
@pytest.mark.parametrize("normalization,extra", [("batch_mean", {"normalize_gradients": True}),
                                                 ("topk_ema", {})])
def test_chunked_step_equals_the_whole_step_log_kde(normalization, extra):
  """The release's setting (batch-mean scale, gradient RMS per bandwidth) and FHM's top-k EMA."""
  mesh = _mesh()
  reference = _one_step(_config("log_kde", normalization, 1, **extra), mesh)
  assert np.isfinite(reference[0])
  for features in ("keep", "recompute"):
    for count in (2, 4):
      _assert_same_step(reference, _one_step(_config("log_kde", normalization, count, features, **extra), mesh))


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("objective", ["corrected", "release", "joint", "mmd", "sinkhorn"])
@pytest.mark.parametrize("normalization", ["batch_mean", "topk_ema"])
def test_chunked_step_equals_the_whole_step_every_objective(objective, normalization):
  if objective == "release" and normalization != "batch_mean":
    pytest.skip("the release objective computes its own batch-mean scale (a config error otherwise)")
  extra = {"normalize_gradients": True} if objective in ("corrected", "joint", "release") else {}
  if objective == "sinkhorn":
    extra = {"sinkhorn_epsilon": 0.1, "sinkhorn_max_iterations": 50}
  mesh = _mesh()
  reference = _one_step(_config(objective, normalization, 1, **extra), mesh)
  for features in ("keep", "recompute"):
    _assert_same_step(reference, _one_step(_config(objective, normalization, 4, features, **extra), mesh))


@pytest.mark.slow
def test_chunked_step_on_a_mesh_of_eight_devices():
  """Data 2 x fsdp 4: each chunk's classes split over the data shards, the samples over fsdp."""
  mesh = partitioning.make_mesh(data=2, fsdp=4)
  reference = _one_step(_config("log_kde", "batch_mean", 1, normalize_gradients=True), mesh)
  for features in ("keep", "recompute"):
    _assert_same_step(reference, _one_step(_config("log_kde", "batch_mean", 2, features, normalize_gradients=True),
                                           mesh))


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
  # With the features recomputed the step still compiles and shrinks with the count.
  recomputed = {}
  for count in (2, 4):
    compiled = program_lib.build_train_program(_config(microbatches=count, features="recompute"), mesh).compile()
    recomputed[count] = program_lib.memory_total(program_lib.memory_parts(compiled))
  assert recomputed[2] > recomputed[4], recomputed
  # On the CPU nothing is budgeted: auto is 1, and says why.
  program, _, line = program_lib.compile_fitting(config, mesh, capacity=None, build=build,
                                                 compile_program=lambda p: p.compile())
  assert program.config.train.microbatches == 1 and "not budget" in line


@pytest.mark.slow
@pytest.mark.parametrize("features", ["keep", "recompute"])
def test_preempted_and_resumed_run_with_chunks_is_bit_exact(tmp_path, monkeypatch, features):
  """The pre-emption guarantee holds with chunks: a run stopped at step 4 and resumed ends
  with the parameters of a run straight through (the mesh: 8 devices, data 2 x fsdp 4)."""
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
  config = _config(microbatches="auto")
  config.train.classes_per_step = 16
  gib = program_lib.GIB
  compiled_as = []

  def compile_program(config):
    count, mode = int(config.train.microbatches), config.train.microbatch_features
    compiled_as.append((mode, count))
    floor = 100 if mode in ("keep", "auto") else 20
    return _FakeCompiled(int((floor + 64 / count) * gib))

  program, _, line = program_lib.compile_fitting(config, mesh, capacity=(40 * gib, "test GPU"),
                                                 build=lambda c: c, compile_program=compile_program)
  assert compiled_as == [("keep", 1), ("keep", 2), ("recompute", 2), ("recompute", 4)], compiled_as
  assert program.train.microbatches == 4 and program.train.microbatch_features == "recompute"
  assert line.startswith("train.microbatches=auto: 4 with train.microbatch_features=recompute (keep: 1: 164.00 GiB, "
                         "2: 132.00 GiB, no larger count can fit with the features kept, recompute: 2: 52.00 GiB did "
                         "not fit; 4: 36.00 GiB fits the 40 GiB of a test GPU"), line
  # Where kept features can fit, auto finds them first (floor 100 < 120 GiB at 4 chunks: 116).
  compiled_as.clear()
  program, _, line = program_lib.compile_fitting(config, mesh, capacity=(120 * gib, "test GPU"),
                                                 build=lambda c: c, compile_program=compile_program)
  assert compiled_as == [("keep", 1), ("keep", 2), ("keep", 4)] and program.train.microbatch_features == "keep"
  # An explicit mode is the only one tried.
  config.train.microbatch_features = "keep"
  with pytest.raises(program_lib.DoesNotFit, match="no count fits"):
    program_lib.compile_fitting(config, mesh, capacity=(40 * gib, "test GPU"), build=lambda c: c,
                                compile_program=compile_program)
