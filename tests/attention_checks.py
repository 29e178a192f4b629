"""Checks shared by the attention-kernel tests (tests/test_attention_impl.py, tests/test_whole_sequence_attention.py).

`assert_generator_equals_xla`: a one-block toy latent DiT (fp32) computed another way
against the same generator on XLA's path, with perturbed parameters (the
zero-initialised output layers would make every gradient but theirs zero), its loss
and every parameter's gradient, to the tolerances of a kernel that sums the softmax in
another order. `compiled_attention`: the attention alone, forward and backward, on a
mesh of described devices, compiled.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from drifting_jax import partitioning
from drifting_jax.models import attention, generator as G


def assert_generator_equals_xla(config: Mapping[str, Any], **overrides) -> None:
  """`G.build_module({**config, **overrides})` computes what `G.build_module(config)` does:
  the same parameter tree, the loss to 1e-5, the gradients to 1e-4 (1e-5 of the largest)."""
  plain, other = G.build_module(config), G.build_module({**config, **overrides})
  args, kwargs = G.example_inputs(config, batch_size=2)
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), *args, **kwargs)["params"]
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  noise = G.draw_noise(plain, jax.random.PRNGKey(2), 2)
  labels, cfg = jnp.array([3, 7]), jnp.array([1.0, 2.5])
  loss = lambda module, p: jnp.sum(jnp.sin(module.apply({"params": p}, labels, cfg, noise=noise)["samples"]))
  (loss_plain, grad_plain), (loss_other, grad_other) = (
      jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params) for m in (plain, other))
  np.testing.assert_allclose(loss_other, loss_plain, rtol=1e-5)
  assert jax.tree.structure(grad_other) == jax.tree.structure(grad_plain)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.max(np.abs(b))),
               grad_other, grad_plain)


def compiled_attention(devices, impl: str, shape, mesh_shape=(1, 1), compiler_options=None):
  """`attention.dot_product_attention(impl=impl)` forward and backward on fp32 q, k, v of
  `shape`, batch split over a data x fsdp mesh of `devices`, compiled."""
  mesh = partitioning.make_mesh(*mesh_shape, devices=devices)
  x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))

  def forward_and_backward(q, k, v):
    with partitioning.activation_rules(mesh):
      out, pullback = jax.vjp(functools.partial(attention.dot_product_attention, impl=impl), q, k, v)
      return out, pullback(out)

  return jax.jit(forward_and_backward).lower(x, x, x).compile(compiler_options=compiler_options)
