"""`model.attention_impl="whole_sequence"`: the Pallas TPU kernel for short sequences.

The kernel runs here in the Pallas interpreter (its own code on the CPU) and is
compared with XLA's attention, forward and gradients, at the ablation's 272 tokens and
at odd shapes; the head masking that lets two heads of 64 share 128 lanes is checked
to be exact (a head's output does not move when another head's inputs do). It is
compiled for a TPU slice through libtpu (slow tests): a Mosaic call on each chip's
share of the batch, no [B, H, N, N] logits left in HBM.
"""

from __future__ import annotations

import functools
import re
import types

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import imagenet_latent_ablation
from drifting_jax import errors, partitioning
from drifting_jax.models import attention, generator as G, layers, whole_sequence_attention as ws
from attention_checks import assert_generator_equals_xla, compiled_attention

# The kernel sums each softmax row whole, as XLA does, in fp32; the matmuls' fp32
# accumulation order differs. Observed differences <= 1.1e-6 on values of order 1,
# forward and gradients; 1e-5 leaves room for other CPUs and still catches a masking
# or layout bug (a wrong head or lane gives errors of order 0.1).
TOL = dict(rtol=1e-5, atol=1e-5)

interpreted = functools.partial(ws.attention, interpret=True)
xla = functools.partial(attention.dot_product_attention, impl="xla")


def _qkv(shape, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys)


def _grads(f, q, k, v, cotangent):
  loss = lambda *x: jnp.sum(f(*x).astype(jnp.float32) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("tokens,heads,head_dim", [
    (272, 4, 64),  # DiT-B/2's 256 patches + 16 registers; two heads share 128 lanes
    (260, 4, 32),  # the compile smoke's 256 + 4 (not a multiple of 8); four heads a slab
    (20, 2, 128),  # one head a slab
    (9, 2, 256),   # a head of two slabs' width, an odd token count
])
def test_equals_xla_forward_and_gradients(tokens, heads, head_dim):
  q, k, v, cotangent = _qkv((2, tokens, heads, head_dim))
  np.testing.assert_allclose(jax.jit(interpreted)(q, k, v), xla(q, k, v), **TOL)
  for got, want in zip(_grads(interpreted, q, k, v, cotangent), _grads(xla, q, k, v, cotangent)):
    np.testing.assert_allclose(got, want, **TOL)


def test_scale_is_applied_once():
  q, k, v, _ = _qkv((1, 16, 2, 64))
  np.testing.assert_allclose(ws.attention(q, k, v, scale=0.3, interpret=True),
                             attention.dot_product_attention(q, k, v, impl="xla", scale=0.3), **TOL)


def test_heads_sharing_lanes_do_not_see_each_other():
  """Heads 0 and 1 share a 128-lane slab: head 0's output and gradients must not move,
  bit for bit, when head 1's q, k and v change (the masking is exact, not approximate)."""
  q, k, v, cotangent = _qkv((2, 24, 2, 64))
  q2, k2, v2 = (x.at[:, :, 1].set(10 * x[:, :, 1] + 3) for x in (q, k, v))
  out, out2 = interpreted(q, k, v), interpreted(q2, k2, v2)
  np.testing.assert_array_equal(out[:, :, 0], out2[:, :, 0])
  assert np.max(np.abs(out[:, :, 1] - out2[:, :, 1])) > 0.1
  head0 = cotangent.at[:, :, 1].set(0)
  for g, g2 in zip(_grads(interpreted, q, k, v, head0), _grads(interpreted, q2, k2, v2, head0)):
    np.testing.assert_array_equal(g[:, :, 0], g2[:, :, 0])
    np.testing.assert_array_equal(g[:, :, 1], 0)  # head 1 gets no gradient from head 0's output


def test_bf16_inputs_against_fp32_of_the_same_values():
  """bf16 q, k, v (attn_fp32=False): output in bf16, the softmax in fp32; against the fp32
  attention of the same (rounded) inputs, within bf16's rounding of the output and of
  the probabilities fed to the second matmul (2^-8 relative, values of order 1)."""
  q, k, v, cotangent = _qkv((2, 32, 4, 64), dtype=jnp.bfloat16)
  out = interpreted(q, k, v)
  assert out.dtype == jnp.bfloat16
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  np.testing.assert_allclose(out.astype(jnp.float32), xla(*upcast), atol=2e-2, rtol=2e-2)
  for got, want in zip(_grads(interpreted, q, k, v, cotangent), _grads(xla, *upcast, cotangent)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2 * np.max(np.abs(want)), rtol=5e-2)


def test_plan_cuts_and_refusals():
  ablation = ws.plan(272, 12, 64, jnp.float32)
  assert (ablation.width, ablation.heads_per_slab, ablation.slabs) == (128, 2, 6)
  assert (ws.plan(16, 4, 256, jnp.bfloat16).width, ws.plan(16, 4, 256, jnp.bfloat16).slabs) == (256, 4)
  # One grid step's VMEM at the ablation: 7 blocks of [272, 128] fp32 double-buffered
  # + 6 fp32 [272, 384] temporaries, well under the budget.
  assert ablation.vmem_bytes(4, arrays=7) == 2 * 7 * 272 * 128 * 4 + 6 * 272 * 384 * 4
  assert "lanes" in ws.plan(272, 12, 48, jnp.float32)   # 48 neither divides nor is a multiple of 128
  assert "lanes" in ws.plan(272, 3, 64, jnp.float32)    # an odd number of 64-wide heads
  assert "VMEM" in ws.plan(4096, 12, 64, jnp.float32)  # long sequences: splash's
  assert "dtype" in ws.plan(272, 12, 64, jnp.int32)
  with pytest.raises(ValueError, match="48"):
    ws.attention(*_qkv((1, 16, 2, 48))[:3], interpret=True)
  q, k, v, _ = _qkv((1, 16, 2, 64))
  with pytest.raises(ValueError, match="share shape"):
    ws.attention(q, k[:, :8], v, interpret=True)


def test_resolve_picks_it_below_splash_lengths_on_tpu_and_refuses_shapes_it_cannot_take():
  tpu, cpu = types.SimpleNamespace(platform="tpu"), jax.devices()[:1]
  shape = dict(tokens=272, heads=12, head_dim=64)
  assert attention.resolve("auto", [tpu], attention_dtype=jnp.float32, **shape) == "whole_sequence"
  assert attention.resolve("auto", [tpu], attention_dtype=jnp.float32, **{**shape, "tokens": 1040}) == "splash"
  # A shape the kernel cannot take falls back to XLA under auto...
  assert attention.resolve("auto", [tpu], attention_dtype=jnp.float32, **{**shape, "head_dim": 48}) == "xla"
  # ...and is refused in one line when asked for, before anything is compiled.
  with pytest.raises(errors.UsageError, match="whole_sequence cannot take 272 tokens x 12 heads of 48"):
    attention.resolve("whole_sequence", [tpu], attention_dtype=jnp.float32, **{**shape, "head_dim": 48})
  with pytest.raises(errors.UsageError, match="needs TPUs"):
    attention.resolve("whole_sequence", cpu, attention_dtype=jnp.float32, **shape)
  assert attention.resolve("auto", cpu, attention_dtype=jnp.float32, **shape) == "xla"


@pytest.fixture
def interpreted_kernels(monkeypatch):
  """Both entry points of the kernel in the Pallas interpreter (the CPU cannot compile Mosaic)."""
  monkeypatch.setattr(ws, "attention", functools.partial(ws.attention, interpret=True))
  monkeypatch.setattr(ws, "attention_from_projection", functools.partial(ws.attention_from_projection, interpret=True))


@pytest.mark.parametrize("preamble_in_kernel", [True, False])
def test_generator_with_it_equals_xla(interpreted_kernels, monkeypatch, preamble_in_kernel):
  """The module's wiring, interpreted: with the release's preamble (RMSNorm qk-norm, RoPE,
  fp32 attention) the kernel takes the projection and does the preamble itself; without
  qk-norm it takes q, k, v ([B, N, H*D] views)."""
  calls = []
  from_projection = ws.attention_from_projection
  monkeypatch.setattr(ws, "attention_from_projection", lambda *a, **k: calls.append(1) or from_projection(*a, **k))
  config = G.model_config_for("tiny-latent", depth=1, use_bf16=False, use_qknorm=preamble_in_kernel)
  assert_generator_equals_xla(config, attention_impl="whole_sequence")
  assert bool(calls) == preamble_in_kernel


def test_on_a_mesh_each_device_takes_its_share_of_the_batch(interpreted_kernels):
  """Under the activation rules on 4 x 2 CPU devices the kernel runs per device
  (shard_map over the batch): same values and gradients as XLA's attention."""
  mesh = partitioning.make_mesh(4, 2)
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  q, k, v, cotangent = (jax.device_put(x, sharding) for x in _qkv((8, 24, 2, 64)))

  def run(impl):
    def f(q, k, v):
      with partitioning.activation_rules(mesh):
        return attention.dot_product_attention(q, k, v, impl=impl)
    out, grads = jax.jit(lambda *x: (f(*x), jax.grad(lambda *y: jnp.sum(f(*y) * cotangent), argnums=(0, 1, 2))(*x)))(
        q, k, v)
    return out, grads

  (out_w, grads_w), (out_x, grads_x) = run("whole_sequence"), run("xla")
  np.testing.assert_allclose(out_w, out_x, **TOL)
  for got, want in zip(grads_w, grads_x):
    np.testing.assert_allclose(got, want, **TOL)


def _projection_reference(qkv, q_weight, k_weight, heads, out_dtype):
  """generator.Attention's XLA path from the projection on: split, RMSNorm qk-norm, RoPE, fp32 attention."""
  q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b n h d", three=3, h=heads)
  q = layers.RMSNorm(epsilon=1e-6).apply({"params": {"weight": q_weight}}, q)
  k = layers.RMSNorm(epsilon=1e-6).apply({"params": {"weight": k_weight}}, k)
  q, k = layers.apply_rope(q, k, dtype=jnp.float32)
  out = xla(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  return einops.rearrange(out, "b n h d -> b n (h d)").astype(out_dtype)


def _projection_inputs(batch, tokens, heads, head_dim, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  qkv = (2.0 * jax.random.normal(keys[0], (batch, tokens, 3 * heads * head_dim))).astype(dtype)
  q_weight, k_weight = (1 + 0.3 * jax.random.normal(key, (head_dim,)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], (batch, tokens, heads * head_dim))
  return qkv, q_weight, k_weight, cotangent


def _projection_grads(f, qkv, q_weight, k_weight, cotangent):
  loss = lambda *x: jnp.sum(f(*x).astype(jnp.float32) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(qkv, q_weight, k_weight)


@pytest.mark.parametrize("tokens,heads,head_dim", [(272, 2, 64), (20, 8, 32), (16, 2, 128)])
def test_from_projection_equals_the_modules_xla_path(tokens, heads, head_dim):
  """qk-norm, RoPE (its lane rotations) and their backward in the kernel: output and the
  gradients of the projection and of both norm weights, against XLA's path (fp32)."""
  qkv, q_weight, k_weight, cotangent = _projection_inputs(2, tokens, heads, head_dim)
  fused = functools.partial(ws.attention_from_projection, heads=heads, epsilon=1e-6, interpret=True)
  reference = functools.partial(_projection_reference, heads=heads, out_dtype=jnp.float32)
  np.testing.assert_allclose(jax.jit(fused)(qkv, q_weight, k_weight), reference(qkv, q_weight, k_weight), **TOL)
  for got, want in zip(_projection_grads(fused, qkv, q_weight, k_weight, cotangent),
                       _projection_grads(reference, qkv, q_weight, k_weight, cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


def test_from_projection_in_bf16():
  """A bf16 projection (the release's use_bf16): output and gradients in bf16, within a few
  bf16 roundings (2^-8 relative) of the module's path. Exact agreement is not expected:
  the kernel sums each head's mean square in another order, so a normalized q or k
  entry can round to the neighbouring bf16 value and move the output by an ulp or two.
  The fp32 test above checks the arithmetic; this one the dtypes and the casts."""
  qkv, q_weight, k_weight, cotangent = _projection_inputs(2, 24, 4, 64, dtype=jnp.bfloat16)
  fused = functools.partial(ws.attention_from_projection, heads=4, epsilon=1e-6, interpret=True)
  reference = functools.partial(_projection_reference, heads=4, out_dtype=jnp.bfloat16)
  out, want = fused(qkv, q_weight, k_weight), reference(qkv, q_weight, k_weight)
  assert out.dtype == jnp.bfloat16
  out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(out, want, rtol=0, atol=2e-2 * np.max(np.abs(want)))
  for got, want in zip(_projection_grads(fused, qkv, q_weight, k_weight, cotangent),
                       _projection_grads(reference, qkv, q_weight, k_weight, cotangent)):
    assert got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.max(np.abs(want)))


def test_from_projection_refuses_what_it_cannot_take():
  qkv, q_weight, k_weight, _ = _projection_inputs(1, 16, 2, 64)
  with pytest.raises(ValueError, match="3 x heads"):
    ws.attention_from_projection(qkv[..., :-1], q_weight, k_weight, heads=2, epsilon=1e-6, interpret=True)
  with pytest.raises(ValueError, match=r"must be \[64\]"):
    ws.attention_from_projection(qkv, q_weight[:32], k_weight, heads=2, epsilon=1e-6, interpret=True)
  qkv48, q48, k48, _ = _projection_inputs(1, 16, 2, 48)
  with pytest.raises(ValueError, match="lanes"):
    ws.attention_from_projection(qkv48, q48, k48, heads=2, epsilon=1e-6, interpret=True)


def test_from_projection_on_a_mesh_sums_the_norm_weights_gradients_over_devices(interpreted_kernels):
  """Per device on 4 x 2 CPU devices, the norm weights replicated: their gradient is the
  sum over every device's share of the batch (shard_map's transpose), as XLA's path has it."""
  mesh = partitioning.make_mesh(4, 2)
  qkv, q_weight, k_weight, cotangent = _projection_inputs(8, 16, 2, 64)
  qkv, cotangent = (jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in (qkv, cotangent))

  def fused(qkv, q_weight, k_weight):
    with partitioning.activation_rules(mesh):
      return attention.attention_from_projection(qkv, q_weight, k_weight, heads=2, epsilon=1e-6, scale=0.125,
                                                 out_dtype=jnp.float32)

  reference = functools.partial(_projection_reference, heads=2, out_dtype=jnp.float32)
  np.testing.assert_allclose(jax.jit(fused)(qkv, q_weight, k_weight), reference(qkv, q_weight, k_weight), **TOL)
  for got, want in zip(_projection_grads(fused, qkv, q_weight, k_weight, cotangent),
                       _projection_grads(reference, qkv, q_weight, k_weight, cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


@pytest.mark.slow
def test_compiles_for_a_tpu_slice_without_logits_in_hbm():
  """v6e-8, data 4 x fsdp 2, DiT-B/2's attention at 272 tokens: a Mosaic call per chip
  on its share of the batch, no all-gather, and no [.., 272, 272] buffer anywhere in the
  program (XLA's attention keeps several); its HBM bytes (XLA's count plus the calls'
  declared traffic) are a fraction of XLA's attention's."""
  pytest.importorskip("libtpu", reason="TPU targets need libtpu (requirements.txt)")
  from drifting_jax.scale import targets, xla_internals

  devices = targets.parse("v6e-8").devices()
  config = imagenet_latent_ablation.get_config()
  assert G.module_for_run(config, devices).attention_impl == "whole_sequence"  # "auto" at 272 tokens
  shape = (64, 272, 12, 64)
  fused, plain = (compiled_attention(devices, impl, shape, mesh_shape=(4, 2)) for impl in ("whole_sequence", "xla"))
  text = fused.as_text()
  assert "tpu_custom_call" in text and "all-gather" not in text
  logits = re.compile(r"\[[0-9,]*272,272\]")
  assert not logits.search(text)
  assert logits.search(plain.as_text())
  fused_bytes, plain_bytes = (xla_internals.cost_numbers(c)["bytes accessed"] for c in (fused, plain))
  assert fused_bytes < 0.5 * plain_bytes, (fused_bytes, plain_bytes)


@pytest.mark.slow
def test_the_modules_attention_compiles_for_a_tpu_with_a_fraction_of_xlas_traffic():
  """DiT-B/2's attention module (qkv projection, qk-norm, RoPE, fp32 attention, output
  projection) at 64 examples of 272 tokens on one v6e chip, forward and backward: with
  whole_sequence the preamble is inside the two Mosaic calls, and libtpu's bytes for the
  module are under 0.3x those of XLA's attention (0.18x when written: 1.47 against 8.34 GB)."""
  pytest.importorskip("libtpu", reason="TPU targets need libtpu (requirements.txt)")
  from drifting_jax.scale import targets, xla_internals

  targets.compile_environment()
  device = targets.parse("v6e-8").devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)

  def compiled(impl):
    module = G.Attention(hidden_size=768, num_heads=12, use_qknorm=True, use_rmsnorm=True, use_rope=True,
                         attn_fp32=True, attention_impl=impl, dtype=jnp.bfloat16)
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 272, 768), jnp.bfloat16)))
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    x = spec(jax.ShapeDtypeStruct((64, 272, 768), jnp.bfloat16))
    grads = lambda p, x, cotangent: jax.vjp(module.apply, p, x)[1](cotangent)
    return jax.jit(grads).lower(jax.tree.map(spec, params), x, x).compile()

  fused, plain = compiled("whole_sequence"), compiled("xla")
  text = fused.as_text()
  assert len(re.findall(r'custom_call_target="tpu_custom_call"', text)) == 2  # forward, backward
  assert not re.search(r"\[[0-9,]*272,272\]", text)
  # The norms are inside the kernel: no XLA operation comes from them (XLA's path has several).
  norm_ops = re.compile(r'op_name="[^"]*/[qk]_norm/')
  assert not norm_ops.search(text) and norm_ops.search(plain.as_text())
  fused_bytes, plain_bytes = (xla_internals.cost_numbers(c)["bytes accessed"] for c in (fused, plain))
  assert fused_bytes < 0.3 * plain_bytes, (fused_bytes, plain_bytes)


def test_analytical_flops_count_the_kernels_declared_work_on_every_shard():
  """The analytical FLOP count (scale/flops.py) sees a Pallas kernel through its declared
  cost and a shard_map body once per shard: 2 [N, N] x [N, D] products per head forward,
  5 more backward (the logits recomputed, then dv, dp, dq, dk), alone or per device on
  4 x 2 devices. (Before, it counted the kernel body once, as if it were one grid step.)"""
  from drifting_jax.scale import flops

  batch, tokens, heads, head_dim = 8, 32, 4, 64
  qkv = jax.ShapeDtypeStruct((batch, tokens, 3 * heads * head_dim), jnp.float32)
  weight = jax.ShapeDtypeStruct((head_dim,), jnp.float32)
  product = 2 * batch * heads * tokens * tokens * head_dim
  mesh = partitioning.make_mesh(4, 2)

  def on_mesh(qkv, q_weight, k_weight):
    with partitioning.activation_rules(mesh):
      return attention.attention_from_projection(qkv, q_weight, k_weight, heads=heads, epsilon=1e-6, scale=0.125,
                                                 out_dtype=jnp.float32)

  alone = functools.partial(ws.attention_from_projection, heads=heads, epsilon=1e-6)
  for f in (alone, on_mesh):
    grads = lambda *x, f=f: jax.grad(lambda *y: jnp.sum(f(*y)), argnums=(0, 1, 2))(*x)
    assert flops.program_flops(f, qkv, weight, weight) == 2 * product
    assert flops.program_flops(grads, qkv, weight, weight) == 7 * product
