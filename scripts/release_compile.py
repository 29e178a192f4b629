r"""The release's own training step compiled for a TPU slice, measured as `--mode=compile` measures ours.

    python -m scripts.release_compile --release-src /work/release_src --target v6e-64 \
        --config latent_ablation [--classes N] [--hsdp-dim N] [--small] --out DIR

`--release-src` is a checkout of github.com/lambertae/drifting ("the release"), kept
outside this repository; nothing of it is copied here. Its modules are imported from
there at run time and its generator step is built the way its `train.py` builds it
(`main_gen` then `train_gen`, up to `train_step_jit`):

* its config (`configs/gen/<config>.yaml`, read by its `utils.misc.load_config`);
* its model, optimizer and schedule (`utils.model_builder.build_model_dict`: `DitGen`,
  `optax.adamw` over `create_learning_rate_fn`);
* its mesh (`utils.hsdp_util.set_global_mesh(hsdp_dim)`: (data, fsdp) with fsdp =
  `hsdp_dim`, laid out by `mesh_utils.create_device_mesh` over the slice's devices);
* its TrainState and shardings (`init_state_from_dummy_input`: params, Adam moments
  and EMA each sharded on one axis over `fsdp` by its `get_spec`, replicated over
  `data`);
* its frozen feature network (`models.mae_model.build_activation_function`: the MAE
  built from its model_config and initialised by `init_model_distributed`, fsdp-
  sharded the same way; random weights from its own init, none read);
* its step (`train.train_step` under `jax.jit(partial(...), out_shardings=(state
  shardings, None))`, drift loss `drift_loss.drift_loss`), with the batch laid out as
  its `merge_data` leaves it (`data_shard()`: split over `data`, replicated over `fsdp`).

The step is lowered with abstract inputs (no weights, no data) and compiled by libtpu
for the slice `--target` names (`drifting_jax.scale.targets`); the compiled program is
read by `drifting_jax.scale.analysis.analyze`, the function our compile mode uses.
DIR/release_compile_report.json has the same layout as our `compile_report.json`
(`programs.train.memory / flops / time / collectives / projection / batch`), plus
`placement` (bytes per device of each argument group) and `patches`.

`--small` takes the sizes of our compile_smoke (configs/imagenet_latent_ablation.py:
compile_smoke, read at run time): its tiny DiT's width, depth, heads and noise/class
tokens, the tiny MAE (32 channels, one block a stage), its batch (8 classes x 8
generated, 8 positives, 4 negatives), its reduced feature groups and bandwidths
(activation_kwargs, R_list), its target (v5p-8) and fsdp width (as hsdp_dim), so the
two small programs match and each compiles in minutes.

What had to be patched to run the release under jax 0.10.2 / flax 0.12.8 on a machine
with no TPU, data or weights (all at run time, in this process only; each is also
listed in the report's "patches" when applied):

1. `jax.distributed.initialize()` (`utils.misc.run_init`, called when `train.py` is
   imported): skipped. There is one process and no coordinator; the compile needs none.
2. `dataset.dataset` and `utils.fid_util` (imported by `train.py` and
   `utils.model_builder`): replaced by stub modules. They import torch/torchvision/
   diffusers (not installed, and not part of the step); the stubs' loaders return None.
3. `jax.device_count`, `jax.process_count`, `jax.local_device_count`, `jax.process_index`
   as the release's modules see them: the slice's (e.g. 64 devices, 16 hosts, 4 local,
   process 0) instead of this CPU process's. The release branches on
   `bsz % jax.device_count()` (train_step, enforce_ddp, DitGen) and sizes its mesh
   from `process_count() * local_device_count()`.
4. `mesh_utils.create_device_mesh` as `utils.hsdp_util` sees it: given the slice's
   devices (libtpu's topology description) instead of `jax.devices()`, otherwise its
   own call (`allow_split_physical_axes=True`) unchanged.
5. `jax.jit` as `utils.hsdp_util` sees it, during initialisation only: instead of
   running the init program, `jit(f, out_shardings=S)(*args)` returns
   `jax.eval_shape(f, *args)` as ShapeDtypeStructs carrying S. Same shapes, dtypes and
   shardings as its sharded init would materialise; no weights.
6. The MAE artifact: `load_init_entry("mae", "hf://mae_latent_256")` returns no weights
   and, as metadata, the `model:` section of the release's MAE training config
   (`configs/mae/latent_ablation_256.yaml`; `latent_640.yaml` for hf://mae_latent_640),
   which is what its `train_mae.py` stores as the artifact's `model_config`; `put_like`
   then keeps the abstract init. Nothing is downloaded.
7. `jnp.clip(x, a_min=...)` in `drift_loss.py`: jax 0.10.2's `jnp.clip` has no `a_min`/
   `a_max` keywords (deprecated in jax 0.4.27, removed since); the release's
   `drift_loss` module sees a `clip` that maps them to `min`/`max`.
8. `build_activation_function(postprocess_fn=...)`: given the identity instead of the
   VAE decoder from `get_postprocess_fn` (which needs diffusers). It is used only for
   ConvNeXt features, which these configs turn off.
9. `WandbLogger.set_logging` writes its offline log folder under DIR/release_workdir
   (use_wandb is false in the configs); the data loaders are not built (stub 2).

Everything else (model, loss, optimizer, EMA, clipping, shardings, RNG) is the
release's code as fetched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import sys
import time
import types
from functools import partial
from typing import Any

REPORT_NAME = "release_compile_report.json"
RELEASE_REPO = "lambertae/drifting"
# The release's MAE training configs, by the feature path its generator configs name.
MAE_CONFIGS = {"hf://mae_latent_256": "configs/mae/latent_ablation_256.yaml",
               "hf://mae_latent_640": "configs/mae/latent_640.yaml"}
# --small takes its sizes from our compile_smoke (configs/imagenet_latent_ablation.py:compile_smoke).
SMALL_CONFIG = ("configs.imagenet_latent_ablation", "compile_smoke")
# The generator's architecture knobs the release's DitGen shares with ours; the rest stay the release's.
_SMALL_MODEL_KEYS = ("hidden_size", "depth", "num_heads", "cond_dim", "noise_classes", "noise_coords", "n_cls_tokens")
# Modules of the release whose view of `jax` is the slice's (patch 3).
_JAX_VIEWERS = ("train", "utils.hsdp_util", "utils.misc", "utils.model_builder", "utils.logging",
                "models.generator", "models.mae_model", "drift_loss")
_RELEASE_TOP = ("train", "utils", "models", "dataset", "drift_loss", "memory_bank")


class Patches:
  """The run-time patches applied, in order, with their reasons (the report's "patches")."""

  def __init__(self):
    self.items: list[dict[str, str]] = []

  def add(self, what: str, why: str) -> None:
    self.items.append({"what": what, "why": why})


class _View:
  """A module as one release module sees it: attributes of `real`, some replaced."""

  def __init__(self, real, **overrides):
    self._real = real
    self.__dict__.update(overrides)

  def __getattr__(self, name):
    return getattr(self._real, name)


def _abstract_jit(jax):
  """`jax.jit` that evaluates shapes only: `jit(f, out_shardings=S)(*a)` = eval_shape(f, *a) with S."""

  def jit(fun, *, out_shardings=None, **_):
    def run(*args, **kwargs):
      shapes = jax.eval_shape(fun, *args, **kwargs)
      if out_shardings is None:
        return shapes
      return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s,
                                                            weak_type=getattr(a, "weak_type", False)),
                          shapes, out_shardings)
    return run

  return jit


def _stub(name: str, **attrs) -> types.ModuleType:
  module = types.ModuleType(name)
  module.__dict__.update(attrs)
  module.__file__ = f"<stub of the release's {name} (scripts/release_compile.py)>"
  return module


def _not_built(*_a, **_k):
  raise RuntimeError("stub (scripts/release_compile.py): the release's data/FID pipeline is not part of the step")


def release_commit(src: pathlib.Path) -> dict[str, str]:
  """Which release: the commit in <src>/RELEASE_COMMIT (or of <src>'s git checkout), and a hash of its .py files."""
  digest = hashlib.sha256()
  for path in sorted(src.rglob("*.py")):
    digest.update(str(path.relative_to(src)).encode())
    digest.update(path.read_bytes())
  marker = src / "RELEASE_COMMIT"
  commit = marker.read_text().strip() if marker.is_file() else "unknown"
  if commit == "unknown" and (src / ".git").exists():
    import subprocess
    done = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    commit = done.stdout.strip() or commit
  return {"repo": RELEASE_REPO, "commit": commit, "python_sources_sha256": digest.hexdigest()}


def import_release(src: pathlib.Path, target, patches: Patches) -> dict[str, Any]:
  """Imports the release's modules from `src` with patches 1-4, 7 applied; returns them by name."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import mesh_utils

  for name in list(sys.modules):  # a clean import, should this run twice in one process
    if name.split(".")[0] in _RELEASE_TOP:
      del sys.modules[name]
  sys.path.insert(0, str(src))

  sys.modules["dataset"] = _stub("dataset", __path__=[])
  sys.modules["dataset.dataset"] = _stub(
      "dataset.dataset", infinite_sampler=_not_built, get_postprocess_fn=_not_built, epoch0_sampler=_not_built,
      create_imagenet_split=lambda **_: (None, None, None))
  sys.modules["utils.fid_util"] = _stub("utils.fid_util", evaluate_fid=_not_built)
  patches.add("stub modules dataset.dataset, utils.fid_util",
              "they import torch/torchvision/diffusers (not installed here, not part of the step); the stub "
              "create_imagenet_split returns (None, None, None): no data loaders are built")

  from utils import misc
  misc._did_run_init = True  # train.py calls run_init() at import
  patches.add("utils.misc.run_init: jax.distributed.initialize() skipped",
              "one process, no coordinator; compiling for the slice needs no distributed runtime")

  import train  # the release's train.py
  from utils import hsdp_util, model_builder
  from models import generator, mae_model
  import drift_loss
  modules = {"train": train, "hsdp_util": hsdp_util, "misc": misc, "model_builder": model_builder,
             "generator": generator, "mae_model": mae_model, "drift_loss": drift_loss}
  for module in modules.values():
    if not str(getattr(module, "__file__", "")).startswith(str(src)):
      raise RuntimeError(f"{module.__name__} was imported from {module.__file__}, not from {src}")

  n, hosts = target.num_devices, target.hosts
  view = _View(jax, device_count=lambda backend=None: n, process_count=lambda backend=None: hosts,
               local_device_count=lambda backend=None: n // hosts, process_index=lambda backend=None: 0)
  for name in _JAX_VIEWERS:
    sys.modules[name].jax = view
  patches.add(f"jax.device_count/process_count/local_device_count/process_index as the release's modules see "
              f"them: {n} / {hosts} / {n // hosts} / 0",
              f"the slice's ({target.name}), not this CPU process's: the release sizes its mesh from "
              "process_count() * local_device_count() and branches on bsz % device_count()")

  devices = target.devices()
  hsdp_util.mesh_utils = _View(mesh_utils, create_device_mesh=lambda shape, devices_=None, **kw:
                               mesh_utils.create_device_mesh(shape, devices=devices, **kw))
  patches.add("utils.hsdp_util's mesh_utils.create_device_mesh given the slice's devices",
              "libtpu's topology description of the target instead of jax.devices() (CPU); the release's own "
              "call, mesh shape and allow_split_physical_axes=True otherwise unchanged")

  def clip(x=None, min=None, max=None, *, a_min=None, a_max=None):
    return jnp.clip(x, a_min if min is None else min, a_max if max is None else max)

  drift_loss.jnp = _View(jnp, clip=clip)
  # drift_loss is jitted at import; its traced body reads the module global `jnp` at trace time.
  patches.add("drift_loss.jnp.clip accepts a_min/a_max",
              "jax 0.10.2's jnp.clip(arr, min, max) has no a_min/a_max keywords (deprecated in jax 0.4.27, "
              "since removed); the release calls jnp.clip(..., a_min=...) in cdist and drift_loss")
  return modules


def small_settings() -> dict[str, Any]:
  """The sizes of our compile_smoke, in the release's config terms (the --small overrides)."""
  import importlib
  from drifting_jax.models import generator as generator_lib, mae as mae_lib
  module, variant = SMALL_CONFIG
  c = importlib.import_module(module).get_config(variant)
  model = generator_lib.model_config_from_run(c)
  mae = mae_lib.model_config_for(c.compile.mae_model)
  t = c.train
  kwargs = c.feature.activation_kwargs.to_dict()
  return {
      "source": f"{module.replace('.', '/')}.py:{variant}",
      "model": {k: model[k] for k in _SMALL_MODEL_KEYS},
      "mae_model": {"base_channels": mae["base_channels"], "layers": list(mae["layers"]), "use_bf16": mae["use_bf16"]},
      "train": {"train_batch_size": int(t.classes_per_step), "pos_per_sample": int(t.pos_per_class),
                "neg_per_sample": int(t.neg_per_class)},
      "gen_per_label": int(t.gen_per_class),
      "activation_kwargs": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in kwargs.items()},
      "R_list": [float(r) for r in c.loss.bandwidths],
      "target": str(c.compile.target), "hsdp_dim": int(c.mesh.fsdp),
  }


def load_configs(src: pathlib.Path, name: str, misc, small: bool, classes: int | None,
                 hsdp_dim: int | None) -> tuple[Any, Any, str]:
  """(generator config, MAE config, MAE config file) as the release's load_config reads them, with overrides."""
  path = src / "configs" / "gen" / f"{name}.yaml"
  if not path.is_file():
    known = sorted(p.stem for p in (src / "configs" / "gen").glob("*.yaml"))
    raise SystemExit(f"no release config {path}; known: {known}")
  config = misc.load_config(str(path))
  mae_path = str(config.feature.get("mae_path", ""))
  if not config.feature.get("use_mae", True) or config.feature.get("use_convnext", False):
    raise SystemExit(f"{name}: only MAE features (use_mae, no ConvNeXt) are built here")
  if mae_path not in MAE_CONFIGS:
    raise SystemExit(f"{name}: unknown MAE artifact {mae_path!r}; known: {sorted(MAE_CONFIGS)}")
  mae_file = MAE_CONFIGS[mae_path]
  mae_config = misc.load_config(str(src / mae_file))
  if small:
    s = small_settings()
    config.model.update(s["model"])
    mae_config.model.update(s["mae_model"])
    config.train.update(s["train"])
    config.train.forward_dict["gen_per_label"] = s["gen_per_label"]
    config.train.activation_kwargs = misc.EasyDict(s["activation_kwargs"])
    config.train.loss_kwargs["R_list"] = s["R_list"]
    config.hsdp_dim = s["hsdp_dim"]
  if classes:
    config.train.train_batch_size = int(classes)
  if hsdp_dim:
    config.hsdp_dim = int(hsdp_dim)
  return config, mae_config, mae_file


def _per_device_bytes(tree) -> int:
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return int(total)


def _count(tree) -> int:
  import jax
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _global_bytes(tree) -> int:
  import jax
  import numpy as np
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _dtypes(tree) -> dict[str, int]:
  import collections
  import jax
  out = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    out[str(leaf.dtype)] += math.prod(leaf.shape)
  return dict(out)


def _specs(tree) -> dict[str, int]:
  """How many leaves carry each PartitionSpec."""
  import collections
  import jax
  return dict(collections.Counter(str(leaf.sharding.spec) for leaf in jax.tree.leaves(tree)))


def _placement(tree, mesh_size: int) -> dict[str, Any]:
  return {"params": _count(tree), "global_bytes": _global_bytes(tree), "bytes_per_device": _per_device_bytes(tree),
          "replication": _per_device_bytes(tree) * mesh_size / max(1, _global_bytes(tree)),
          "dtypes": _dtypes(tree), "partition_specs": _specs(tree)}


def build(args, patches: Patches) -> dict[str, Any]:
  """Builds and compiles the release's step; returns the report."""
  import jax
  import jax.numpy as jnp
  from drifting_jax.scale import analysis, flops as flops_lib, targets as targets_lib
  from drifting_jax.scale.compile_mode import _libtpu_version

  small = args.small
  # The libtpu that compiles is the one loaded now (by target.devices() below): read its version before,
  # and again at the end, should the package be replaced on disk while this runs.
  libtpu_loaded = _libtpu_version()
  target = targets_lib.parse(args.target or (small_settings()["target"] if small else "v6e-64"))
  src = pathlib.Path(args.release_src).resolve()
  m = import_release(src, target, patches)
  train, hsdp_util, mae_model = m["train"], m["hsdp_util"], m["mae_model"]
  config, mae_config, mae_file = load_configs(src, args.config, m["misc"], small, args.classes, args.hsdp_dim)

  # main_gen: the mesh, then build_model_dict (model, optimizer, schedule; logger).
  hsdp_util.set_global_mesh(config.get("hsdp_dim", min(8, target.num_devices)))
  mesh = hsdp_util.get_global_mesh()
  workdir = pathlib.Path(args.out) / "release_workdir"
  patches.add("WandbLogger offline folder under DIR/release_workdir; no data loaders",
              "build_model_dict makes the logger's folder; use_wandb is false in the release's configs")
  model_dict = m["model_builder"].build_model_dict(config, m["generator"].DitGen, workdir=str(workdir))

  # The MAE (patch 6): its model_config from the MAE training config, no weights.
  mae_model_config = dict(mae_config.model)

  def load_init_entry(model_type, path, **_):
    assert model_type == "mae", model_type
    return None, {"model_config": dict(mae_model_config)}

  mae_model.load_init_entry = load_init_entry
  mae_model.put_like = lambda entry, template: template if entry is None else entry
  patches.add(f"models.mae_model.load_init_entry / put_like: no artifact; metadata.model_config = the model: "
              f"section of {mae_file}",
              f"{config.feature.mae_path} is not downloaded (weights do not change the program); its "
              "model_config is what the release's train_mae.py stores from that config; the MAE keeps its "
              "random init from init_model_distributed")

  real_jit = hsdp_util.jax.__dict__.get("jit")
  hsdp_util.jax.jit = _abstract_jit(jax)
  patches.add("utils.hsdp_util's jax.jit during init: eval_shape with the out_shardings",
              "init_state_from_dummy_input and init_model_distributed jit their init with out_shardings and "
              "run it; here the same functions give ShapeDtypeStructs with those shardings (no TPU to run on, "
              "no weights needed)")
  try:
    activation_fn, feature_params = mae_model.build_activation_function(
        mae_path=str(config.feature.mae_path), use_convnext=bool(config.feature.get("use_convnext", False)),
        convnext_bf16=bool(config.feature.get("convnext_bf16", False)),
        use_mae=bool(config.feature.get("use_mae", True)), postprocess_fn=lambda x: x)
    patches.add("build_activation_function(postprocess_fn=identity)",
                "main_gen passes the VAE decoder (diffusers); it is used only for ConvNeXt features, off here")

    # train_gen, up to train_step_jit (release train.py).
    t = dict(config.train)
    ema_decay = float(t.get("ema_decay", 0.999))
    rng = jax.random.PRNGKey(int(t.get("seed", 42)))
    rng, _init_rng = jax.random.split(rng)
    rng_train, _rng_eval = jax.random.split(rng)
    model = model_dict.model
    state = hsdp_util.init_state_from_dummy_input(model, model_dict.optimizer, train.TrainState, rng,
                                                  model.dummy_input(), model.rng_keys(), ema_decay=ema_decay)
  finally:
    if real_jit is None:
      del hsdp_util.jax.jit
    else:
      hsdp_util.jax.jit = real_jit

  forward_dict = dict(t.get("forward_dict", {}))
  activation_kwargs = dict(t.get("activation_kwargs", {}))
  loss_kwargs = dict(t.get("loss_kwargs", {}))
  loss_kwargs["R_list"] = tuple(loss_kwargs["R_list"])
  max_grad_norm = float(t.get("max_grad_norm", 2.0))
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  step_fn = partial(train.train_step, rng_init=rng_train, learning_rate_fn=model_dict.learning_rate_fn,
                    feature_apply=activation_fn, activation_kwargs=activation_kwargs, loss_kwargs=loss_kwargs,
                    **forward_dict, max_grad_norm=max_grad_norm)
  train_step_jit = jax.jit(step_fn, out_shardings=(state_sharding, None))

  # The batch as merge_data leaves it: data_shard(), i.e. split over `data`, replicated over `fsdp`.
  b = int(t["train_batch_size"])
  pos, neg = int(t["pos_per_sample"]), int(t["neg_per_sample"])
  gen = int(forward_dict.get("gen_per_label", 16))
  size, channels = int(config.model.input_size), int(config.model.in_channels)
  batch_sharding = hsdp_util.data_shard()
  labels = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)
  positives = jax.ShapeDtypeStruct((b, pos, size, size, channels), jnp.float32, sharding=batch_sharding)
  negatives = jax.ShapeDtypeStruct((b, neg, size, size, channels), jnp.float32, sharding=batch_sharding)
  step_args = (state, labels, positives, negatives, feature_params)

  start = time.perf_counter()
  print(f"release_compile: lowering and compiling the release's train_step for {target.name} "
        f"(mesh {dict(mesh.shape)})", flush=True)
  compiled = train_step_jit.lower(*step_args).compile()
  compile_seconds = time.perf_counter() - start
  print(f"release_compile: compiled in {compile_seconds:.1f} s", flush=True)
  report_train = analysis.analyze(compiled, target)
  del compiled

  flops_note = None
  try:
    analytical_global = flops_lib.program_flops(step_fn, *step_args)
  except Exception as e:  # noqa: BLE001  (an extra count; the compile stands without it)
    analytical_global, flops_note = None, f"analytical count failed: {type(e).__name__}: {e}"
  compiler = report_train["flops_per_device"]
  analytical = analytical_global / mesh.size if analytical_global else None
  report_train["flops"] = {
      "compiler_per_device": compiler, "analytical_per_device": analytical,
      "analytical_traced_step_global": analytical_global,
      "compiler_over_analytical": compiler / analytical if analytical else None,
      "note": flops_note or ("analytical = matmul and convolution FLOPs of the traced step (2 per multiply-add), "
                             "divided over the devices; the compiler also counts elementwise work"),
  }
  seconds = report_train["time"]["seconds"]
  images = b * gen
  total_steps = int(t.get("total_steps", 0))
  report_train["projection"] = {
      "label": "compiler's estimate, not a measurement", "step_seconds": seconds,
      "generated_images_per_second": images / seconds if seconds else None, "total_steps": total_steps,
      "run_hours": seconds * total_steps / 3600.0,
      "mfu": analytical / (target.chip.device_peak_flops * seconds) if (seconds and analytical) else None,
  }
  report_train["placement"] = {
      "params": _placement(state.params, mesh.size), "opt_state": _placement(state.opt_state, mesh.size),
      "ema_params": _placement(state.ema_params, mesh.size),
      "feature_params": _placement(feature_params, mesh.size),
      "batch": {"bytes_per_device": _per_device_bytes((labels, positives, negatives)),
                "partition_spec": str(batch_sharding.spec)},
  }
  report_train.update(
      compile_seconds=compile_seconds, generator_params=_count(state.params),
      feature_params=_count(feature_params), feature_param_bytes=_global_bytes(feature_params),
      mae_architecture=(f"model: section of the release's {mae_file}"
                        + (f" with the --small sizes of {small_settings()['source']}" if small else "")),
      batch={"classes_per_step": b, "gen_per_class": gen, "pos_per_class": pos, "neg_per_class": neg,
             "generated_per_step": images})

  import flax
  import optax
  libtpu_now = _libtpu_version()
  if libtpu_now != libtpu_loaded:
    print(f"release_compile: warning: libtpu on disk changed from {libtpu_loaded} to {libtpu_now} while this "
          f"ran; the compile used {libtpu_loaded}", flush=True)
  return {
      "label": "the release's training step, compiled; every time and rate is the TPU compiler's estimate or a "
               "roofline, not a measurement",
      "release": {**release_commit(src), "source": str(src), "config": f"configs/gen/{args.config}.yaml",
                  "mae_config": mae_file, "small": bool(small)},
      "release_config": {"hsdp_dim": config.get("hsdp_dim"), "model": dict(config.model),
                         "mae_model": mae_model_config, "optimizer": json.loads(json.dumps(config.optimizer)),
                         "train": json.loads(json.dumps(config.train))},
      "target": target.to_dict(), "mesh": dict(mesh.shape), "jax": jax.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "libtpu": libtpu_loaded,
      **({"libtpu_on_disk_at_end": libtpu_now} if libtpu_now != libtpu_loaded else {}),
      "patches": patches.items,
      "programs": {"train": report_train},
  }


def summary(report: dict[str, Any]) -> str:
  r = report["programs"]["train"]
  mem, tm, fl = r["memory"], r["time"], r["flops"]
  gib = 2**30
  p = r["placement"]
  lines = [
      f"release {report['release']['config']} on {report['target']['name']} (mesh {report['mesh']}): "
      f"{mem['verdict']}",
      f"  memory per device: arguments {mem['arguments_bytes'] / gib:.2f} GiB, outputs {mem['outputs_bytes'] / gib:.2f}"
      f" (aliased {mem['aliased_bytes'] / gib:.2f}), temporaries {mem['temporaries_bytes'] / gib:.2f}, code "
      f"{mem['code_bytes'] / gib:.3f}; total {mem['total_bytes'] / gib:.2f} GiB",
      f"  FLOPs per device: compiler {fl['compiler_per_device'] / 1e12:.3f} T"
      + (f", analytical {fl['analytical_per_device'] / 1e12:.3f} T" if fl["analytical_per_device"] else ""),
      f"  step time (estimate): {tm['seconds'] * 1e3:.1f} ms [{tm['source']}]; roofline "
      f"{tm['roofline_seconds'] * 1e3:.1f} ms ({tm['bound']}-bound)",
      f"  MAE params: {p['feature_params']['params'] / 1e6:.1f} M, {p['feature_params']['dtypes']}, "
      f"{p['feature_params']['bytes_per_device'] / 1e9:.3f} GB per device",
      f"  patches: {len(report['patches'])} (see 'patches' in the report)",
  ]
  return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--release-src", required=True, help="checkout of lambertae/drifting (outside this repo)")
  parser.add_argument("--target", default=None, help="TPU slice, e.g. v6e-64, v5p-64 (default v6e-64; "
                                                     "compile_smoke's with --small)")
  parser.add_argument("--config", default="latent_ablation", help="release config: configs/gen/<NAME>.yaml")
  parser.add_argument("--classes", type=int, default=None, help="classes per step (train.train_batch_size)")
  parser.add_argument("--hsdp-dim", type=int, default=None, help="the release's hsdp_dim (fsdp axis size)")
  parser.add_argument("--small", action="store_true", help="tiny DiT and MAE, small batch (a quick check)")
  parser.add_argument("--out", required=True, help="output folder for release_compile_report.json")
  args = parser.parse_args(argv)

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from drifting_jax.scale import targets as targets_lib
  targets_lib.compile_environment()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  report = build(args, Patches())
  (out / REPORT_NAME).write_text(json.dumps(report, indent=2, default=float))
  print(summary(report), flush=True)
  print(f"release_compile: wrote {out / REPORT_NAME}", flush=True)
  return report


if __name__ == "__main__":
  main()
