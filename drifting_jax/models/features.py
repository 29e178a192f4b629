"""One interface for the feature spaces the drifting loss is computed in.

A feature function maps a batch of samples `x[N, H, W, C]` (model range) to a dict
of feature groups `{name: [N, T, D]}`: T tokens of dimension D per sample. The loss
treats every group separately and sums the group losses, as the release's trainer
does (its `b x f d -> (b f) x d` rearrangement makes each token position a group).

* `pixel_features`: the paper's MNIST setting: the raw sample as one vector
  (`"pixels"`, T=1, D=H*W*C), optionally with patch mean/std statistics.
* `mae_features`: the release's latent-MAE activation extractor
  (`drifting_jax.models.mae.activations`), with a frozen encoder, beside the raw
  sample as one vector (`"global"`), as the release's `activation_fn` adds it.

Both return a `FeatureFunction` whose `params` are passed back in on every call, so
that the trainer can place them on the mesh once (replicated) and jit over them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from einops import rearrange, reduce

from drifting_jax.models import mae

Features = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class FeatureFunction:
  """`fn(params, x) -> {name: [N, T, D]}` with the params it needs."""
  apply: Callable[[Any, jax.Array], Features]
  params: Any

  def __call__(self, params: Any, x: jax.Array) -> Features:
    return self.apply(params, x)


def patch_statistics(x: jax.Array, size: int) -> Features:
  """Mean and std over non-overlapping size x size patches: two groups of [N, T, C]."""
  n, h, w, _ = x.shape
  if h % size or w % size:
    raise ValueError(f"patch statistics of size {size} need H and W divisible by it, got {h}x{w}")
  patches = rearrange(x, "n (h p) (w q) c -> n (h w) (p q) c", p=size, q=size)
  mean = reduce(patches, "n t k c -> n t c", "mean")
  std = jnp.sqrt(reduce(jnp.square(patches - mean[:, :, None]), "n t k c -> n t c", "mean") + 1e-6)
  return {f"patch_mean_{size}": mean, f"patch_std_{size}": std}


def pixel_features(*, patch_stats_sizes: tuple[int, ...] = ()) -> FeatureFunction:
  """The raw sample as one [N, 1, H*W*C] group, plus optional patch statistics."""
  sizes = tuple(int(s) for s in patch_stats_sizes)

  def apply(params, x):
    del params  # pixel features have none
    if x.ndim != 4:
      raise ValueError(f"pixel features expect [N, H, W, C] samples, got shape {x.shape}")
    x = x.astype(jnp.float32)
    out = {"pixels": rearrange(x, "n h w c -> n 1 (h w c)")}
    for size in sizes:
      out.update(patch_statistics(x, size))
    return out

  return FeatureFunction(apply, {})


def mae_features(module, params, *, include_input: bool = True, **activation_kwargs) -> FeatureFunction:
  """The release's multi-scale MAE activations of a frozen encoder (stop-gradient params).

  With `include_input` (the release always does it: `usual_feats["global"]` in its
  `build_activation_function`) the raw sample is one more group, `"global"`
  `[N, 1, H*W*C]`, so the loss also sees the sample itself and not only what the
  encoder keeps of it.
  """

  def apply(mae_params, x):
    mae_params = jax.lax.stop_gradient(mae_params)
    out = {"global": rearrange(x.astype(jnp.float32), "n h w c -> n 1 (h w c)")} if include_input else {}
    return {**out, **mae.activations(module, mae_params, x, **activation_kwargs)}

  return FeatureFunction(apply, params)
