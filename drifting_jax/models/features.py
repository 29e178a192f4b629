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
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from einops import rearrange, reduce

from drifting_jax import errors
from drifting_jax.models import artifacts, layers, mae

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


def mae_features(module, params, *, include_input: bool = True, remat_policy: str = "none",
                 **activation_kwargs) -> FeatureFunction:
  """The release's multi-scale MAE activations of a frozen encoder (stop-gradient params).

  With `include_input` (the release always does it: `usual_feats["global"]` in its
  `build_activation_function`) the raw sample is one more group, `"global"`
  `[N, 1, H*W*C]`, so the loss also sees the sample itself and not only what the
  encoder keeps of it.

  `remat_policy` (`layers.REMAT_POLICIES`) rematerialises the encoder's residual
  blocks where the features are differentiated: the train step's pass from the
  generated samples' features back to the samples (the params are frozen, so that
  backward pass computes only the gradient to the input). A pass without gradient
  (the data's features) computes exactly as without it.
  """
  if layers.check_remat_policy(remat_policy, "feature.remat_policy") != "none":
    module = module.clone(remat_policy=remat_policy)

  def apply(mae_params, x):
    mae_params = jax.lax.stop_gradient(mae_params)
    out = {"global": rearrange(x.astype(jnp.float32), "n h w c -> n 1 (h w c)")} if include_input else {}
    return {**out, **mae.activations(module, mae_params, x, **activation_kwargs)}

  return FeatureFunction(apply, params)


# --------------------------------------------------------------------------- the table of feature spaces


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A feature space made ready for a program: its extractor and its frozen params.

  `params` are real arrays, or `jax.ShapeDtypeStruct`s when built abstract (the
  compile mode: shapes only, no weights read), in the layout the trainer keeps on
  its devices (`frozen_params`). `source` says where they came from.
  """
  apply: Callable[[Any, jax.Array], Features]
  params: Any
  dtype: Any
  source: str


def frozen_params(params: Any, dtype) -> Any:
  """The frozen network's params as the programs keep them on the devices.

  When the network computes in bfloat16, its conv and dense kernels (every leaf of
  2 or more dimensions) are stored in bfloat16: flax casts them to the compute
  dtype at each use, so the features are bit-identical and the copy is half the
  size. Norm scales and biases (1-D) stay float32, as flax reads them in float32.
  Works on arrays and on abstract leaves alike.
  """
  if dtype != jnp.bfloat16:
    return params

  def cast(p):
    if getattr(p, "ndim", len(getattr(p, "shape", ()))) < 2:
      return p
    if isinstance(p, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(p.shape, jnp.bfloat16)
    return p.astype(jnp.bfloat16)

  return jax.tree.map(cast, params)


def _pixel_space(config, abstract: bool) -> FeatureNetwork:
  del abstract  # no params
  fn = pixel_features(patch_stats_sizes=tuple(config.feature.patch_stats_sizes))
  return FeatureNetwork(fn.apply, fn.params, jnp.float32, "pixels (no params)")


def mae_architecture(config) -> tuple[Any, Any, str]:
  """(MAE module, abstract params, source) of `feature.mae_path`, reading no weights:
  from the artifact's metadata when it is on this machine, else from the named size
  `compile.mae_model` (the compile mode never downloads 1.7 GB of weights for their shapes)."""
  path = str(config.feature.mae_path)
  folder = pathlib.Path(path).expanduser()
  if not path.startswith(artifacts.HF_SCHEME) and (folder / artifacts.METADATA_FILE).is_file():
    model_config = artifacts.read_metadata(folder)["model_config"]
    source = f"metadata of {folder}"
  else:
    model_config = mae.model_config_for(config.compile.mae_model)
    source = f"named size {config.compile.mae_model!r} (compile.mae_model; feature.mae_path={path})"
  return mae.build_module(model_config), artifacts.abstract_params("mae", model_config), source


def _mae_space(config, abstract: bool) -> FeatureNetwork:
  if abstract:
    module, params, source = mae_architecture(config)
  else:
    module, params, _ = artifacts.load(config.feature.mae_path, kind="mae")
    source = str(config.feature.mae_path)
  fn = mae_features(module, params, include_input=bool(config.feature.include_input),
                    remat_policy=config.feature.remat_policy, **config.feature.activation_kwargs.to_dict())
  return FeatureNetwork(fn.apply, frozen_params(params, module.dtype), module.dtype, source)


@dataclasses.dataclass(frozen=True)
class FeatureSpace:
  """One row of the table: `build(config, abstract) -> FeatureNetwork`, and what it is."""
  build: Callable[[Any, bool], FeatureNetwork]
  description: str


# `feature.kind` -> how to build its extractor and params (beside the tables of data
# sets, objectives, evaluators and modes). Adding a feature space is one row.
FEATURE_SPACES: dict[str, FeatureSpace] = {
    "pixels": FeatureSpace(_pixel_space, "the raw sample (FHM's MNIST setting), optional patch statistics"),
    "mae": FeatureSpace(_mae_space, "the release's latent-MAE activations of a frozen encoder (feature.mae_path)"),
}


def build_feature_network(config, *, abstract: bool = False) -> FeatureNetwork:
  """The feature space `config.feature.kind` names, with real params or (`abstract`) their shapes."""
  kind = config.feature.kind
  if kind not in FEATURE_SPACES:
    raise errors.UsageError(f"feature.kind must be one of {sorted(FEATURE_SPACES)}, got {kind!r}")
  return FEATURE_SPACES[kind].build(config, abstract)
