"""Mesh and partition rules, optimizer schedule, CFG sampling, checkpoint round trips."""

import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from drifting_jax import checkpointing, partitioning
from drifting_jax.train import optim, train_step


def test_mesh_and_param_rules():
  mesh = partitioning.make_mesh(data=2, fsdp=4)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  # Large kernels shard their largest fsdp-divisible dim; small and norm params replicate.
  assert partitioning.param_spec("LightningDiT_0/Block_0/Dense_0/kernel", (768, 3072), mesh) == P(None, "fsdp")
  assert partitioning.param_spec("a/RMSNorm_0/weight", (768,), mesh) == P(None)
  assert partitioning.param_spec("tiny/kernel", (4, 4), mesh) == P()
  assert partitioning.param_spec("Embed_0/embedding", (1001, 768), mesh) == P(None, None)  # 1001 % 4 != 0
  assert partitioning.param_spec("Embed_0/embedding", (1000, 768), mesh) == P("fsdp", None)
  assert partitioning.param_spec("odd/kernel", (129, 257), mesh) == P()
  with pytest.raises(ValueError, match="divide"):
    partitioning.make_mesh(data=-1, fsdp=3)


def test_tree_shardings_and_host_to_global():
  mesh = partitioning.make_mesh(data=4, fsdp=2)
  tree = {"w": jnp.zeros((256, 128)), "b": jnp.zeros((128,))}
  shardings = partitioning.tree_shardings(tree, mesh)
  placed = jax.device_put(tree, shardings)
  assert placed["w"].sharding.spec == P("fsdp", None)
  local = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  glob = partitioning.host_to_global(local, mesh)
  assert glob.shape == (16, 3) and len(glob.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(glob), local)


def optim_config(**kw):
  c = ml_collections.ConfigDict(dict(learning_rate=1e-3, b1=0.9, b2=0.99, weight_decay=0.0, schedule="cosine",
                                     noop_steps=3, warmup_steps=4))
  c.update(kw)
  return c


def test_schedule_noop_ramp_cosine():
  sched = optim.learning_rate_schedule(optim_config(), total_steps=20)
  values = np.array([float(sched(s)) for s in range(21)])
  np.testing.assert_allclose(values[:4], 0.0, atol=1e-12)          # no-op, then the ramp starts at 0
  np.testing.assert_allclose(values[4:8], 1e-3 * np.arange(1, 5) / 4, rtol=1e-5)
  assert values[7] == pytest.approx(1e-3) and values[-1] == pytest.approx(0.0, abs=1e-9)
  assert np.all(np.diff(values[7:]) <= 1e-12)
  const = optim.learning_rate_schedule(optim_config(schedule="const", noop_steps=0, warmup_steps=0), 10)
  assert float(const(0)) == float(const(9)) == pytest.approx(1e-3)
  with pytest.raises(ValueError, match="schedule"):
    optim.learning_rate_schedule(optim_config(schedule="linear"), 10)


def test_cfg_scale_sampling_follows_power_law():
  alpha = np.asarray(train_step.sample_cfg_scales(jax.random.PRNGKey(0), 200_000, cfg_min=1.0, cfg_max=4.0,
                                                  neg_cfg_pw=3.0, no_cfg_frac=0.0))
  assert alpha.min() >= 1.0 and alpha.max() <= 4.0
  # CDF of p(a) ~ a^-3 on [1, 4]: (1 - a^-2) / (1 - 4^-2).
  for a in (1.5, 2.0, 3.0):
    assert np.mean(alpha <= a) == pytest.approx((1 - a**-2) / (1 - 4**-2), abs=0.005)
  log_uniform = np.asarray(train_step.sample_cfg_scales(jax.random.PRNGKey(1), 100_000, cfg_min=1.0, cfg_max=4.0,
                                                        neg_cfg_pw=1.0, no_cfg_frac=0.25))
  assert np.mean(log_uniform == 1.0) == pytest.approx(0.25, abs=0.01)
  assert train_step.unconditional_weight(jnp.array([1.0, 2.5]), 64, 16).tolist() == [0.0, pytest.approx(1.5 * 63 / 16)]


def test_checkpoint_round_trip_and_errors(tmp_path):
  mesh = partitioning.make_mesh()
  state = {"w": jnp.arange(64.0).reshape(8, 8), "step": jnp.array(3)}
  shardings = partitioning.tree_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  ckpt = checkpointing.Checkpointer(tmp_path, keep_last=2, async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, jax.tree.map(lambda x: x * step, state), {"bank": np.full((2, 2), step)})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  assert not (tmp_path / "host_state" / "1").exists()
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  step, restored, host = ckpt.restore(abstract)
  assert step == 3
  np.testing.assert_array_equal(restored["w"], np.arange(64.0).reshape(8, 8) * 3)
  np.testing.assert_array_equal(host["bank"], np.full((2, 2), 3))
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint for step 7"):
    ckpt.restore(abstract, 7)
  # A damaged checkpoint gives a clear error naming it.
  for f in (tmp_path / "checkpoints" / "3").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  with pytest.raises(checkpointing.CheckpointError, match="could not be restored"):
    checkpointing.Checkpointer(tmp_path).restore(abstract, 3)
  (tmp_path / "host_state" / "2" / "process_0.npz").unlink()
  with pytest.raises(checkpointing.CheckpointError, match="host state"):
    checkpointing.Checkpointer(tmp_path).restore(abstract, 2)
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint under"):
    checkpointing.Checkpointer(tmp_path / "empty").restore(abstract)


def test_preemption_guard_turns_sigterm_into_a_flag():
  guard = checkpointing.PreemptionGuard()
  try:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop(2)
  finally:
    guard.restore_handlers()
