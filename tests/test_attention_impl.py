"""`model.attention_impl`: the DiT's attention kernel per platform, against today's XLA attention.

The splash kernel runs here in the Pallas interpreter (the kernel's own code, on the
CPU) and is compared with "xla", forward and gradients; it is compiled for a TPU
slice through libtpu. cuDNN's fused attention cannot run without a GPU: its program
is compiled for an H100 described by the CUDA plugin and must hold the fused
attention's custom calls. "auto" is resolved from the platform of the devices a
program is built for, and on the CPU it is "xla": the step of before, bit for bit.
"""

from __future__ import annotations

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet_latent_ablation, mnist_demo
from drifting_jax import errors, partitioning
from drifting_jax.models import attention, generator as G
from attention_checks import assert_generator_equals_xla, compiled_attention

# The splash kernel sums the softmax block by block (online softmax) where XLA sums a
# whole row at once: the same fp32 arithmetic in another order. Observed differences
# here are <= 1.1e-6 on values of order 1 (forward and gradients); 1e-5 leaves room for
# other CPUs' rounding and would still catch a masking or layout bug (those are O(0.1)).
SPLASH_TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(shape, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  return tuple(jax.random.normal(k, shape, jnp.float32) for k in keys)


@pytest.mark.parametrize("tokens,head_dim", [(272, 64), (20, 32)])
def test_splash_equals_xla_forward_and_gradients(tokens, head_dim):
  """272 = DiT-B/2's 256 patches + 16 registers, padded to 384; 20 tokens pad to 128
  (mostly padding: unmasked zero keys would take most of the softmax)."""
  q, k, v, cotangent = _qkv((2, tokens, 3, head_dim))
  xla = functools.partial(attention.dot_product_attention, impl="xla")
  splash = functools.partial(attention.splash_attention, interpret=True)
  np.testing.assert_allclose(jax.jit(splash)(q, k, v), xla(q, k, v), **SPLASH_TOL)
  grads = lambda f: jax.jit(jax.grad(lambda *x: jnp.sum(f(*x) * cotangent), argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(grads(splash), grads(xla)):
    np.testing.assert_allclose(got, want, **SPLASH_TOL)


def test_splash_blocks_are_the_padded_length_up_to_512():
  assert [attention.splash_block(n) for n in (128, 384, 512, 640, 1152)] == [128, 384, 512, 128, 384]


def test_generator_with_splash_equals_xla(monkeypatch):
  """The module's wiring (layout, qk-norm, RoPE, the scale) with the kernel interpreted."""
  monkeypatch.setattr(attention, "splash_attention",
                      functools.partial(attention.splash_attention, interpret=True))
  assert_generator_equals_xla(G.model_config_for("tiny-latent", depth=1, use_bf16=False), attention_impl="splash")


def test_auto_resolves_from_the_target_devices_platform():
  tpu, gpu = types.SimpleNamespace(platform="tpu"), types.SimpleNamespace(platform="gpu")
  cpu = jax.devices()[:1]
  assert attention.resolve("auto", cpu, attention_dtype=jnp.float32) == "xla"
  assert attention.resolve("auto", [tpu, tpu], attention_dtype=jnp.float32) == "splash"
  # At the ablation's 272 tokens splash cost more HBM than xla (compile reports): not splash
  # there, and without the heads' shape not whole_sequence either (tests/test_whole_sequence_attention.py).
  assert attention.resolve("auto", [tpu], attention_dtype=jnp.float32, tokens=272) == "xla"
  assert attention.resolve("auto", [tpu], attention_dtype=jnp.float32, tokens=1040) == "splash"
  # cuDNN takes bf16 only: fp32 attention (attn_fp32) stays on XLA unless asked for.
  assert attention.resolve("auto", [gpu], attention_dtype=jnp.float32) == "xla"
  assert attention.resolve("auto", [gpu], attention_dtype=jnp.bfloat16) == "cudnn"
  assert attention.resolve("cudnn", [gpu], attention_dtype=jnp.float32) == "cudnn"
  assert attention.resolve("xla", [tpu], attention_dtype=jnp.float32) == "xla"
  for impl, devices in (("splash", cpu), ("cudnn", [tpu]), ("flash", cpu)):
    with pytest.raises(errors.UsageError, match="attention_impl"):
      attention.resolve(impl, devices, attention_dtype=jnp.float32)
  with pytest.raises(errors.UsageError, match="resolve 'auto'"):
    G.build_module({**G.model_config_for("tiny"), "attention_impl": "auto"})


def test_the_default_on_cpu_is_the_module_of_before():
  """configs/default.py says "auto": on CPU devices the demo's module is exactly the old one."""
  config = mnist_demo.get_config()
  module = G.module_for_run(config, partitioning.make_mesh().devices)
  assert (config.model.attention_impl, module.attention_impl, module.remat_policy) == ("auto", "xla", "none")
  assert module == G.build_module(G.model_config_from_run(config))


@pytest.mark.slow
def test_splash_compiles_for_a_tpu_slice():
  """v5p-8 (4 chips), data 2 x fsdp 2: the kernel (a Mosaic custom call) runs on each
  chip's share of the batch, so no chip gathers another's q, k or v."""
  pytest.importorskip("libtpu", reason="TPU targets need libtpu (requirements.txt)")
  from drifting_jax.scale import targets

  devices = targets.parse("v5p-8").devices()
  # "auto" at the smoke step's 260 tokens is whole_sequence (below attention.SPLASH_MIN_TOKENS); asked for, splash.
  config = imagenet_latent_ablation.get_config("compile_smoke")
  assert G.module_for_run(config, devices).attention_impl == "whole_sequence"
  config.model.attention_impl = "splash"
  assert G.module_for_run(config, devices).attention_impl == "splash"
  text = compiled_attention(devices, "splash", (8, 272, 12, 64), mesh_shape=(2, 2)).as_text()
  assert "tpu_custom_call" in text
  assert "all-gather" not in text


@pytest.mark.slow
def test_cudnn_compiles_to_fused_attention_for_an_h100(monkeypatch):
  pytest.importorskip("jax_cuda12_plugin", reason="GPU targets need jax-cuda12-plugin (not in requirements.txt)")
  from jax._src.cudnn import fused_attention_stablehlo
  from drifting_jax.scale import targets, xla_internals

  target = targets.parse("h100x8")
  devices = target.devices()[:1]
  try:
    fused_attention_stablehlo.check_cudnn_version()
  except RuntimeError:
    # JAX asks the cuDNN library for its version when it traces the call; this host has
    # the plugin but no cuDNN library: the version the plugin was built against stands in.
    _, cudnn = xla_internals._cuda_plugin_build_versions()  # pylint: disable=protected-access
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: cudnn)
  text = compiled_attention(devices, "cudnn", (2, 272, 4, 64), compiler_options=targets.compiler_options(target)).as_text()
  calls = set(re.findall(r'custom_call_target="([^"]+)"', text))
  assert {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"} <= calls, calls
