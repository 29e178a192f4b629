"""The generator's training program, assembled in one place for everyone who compiles it.

`train` runs it, `--mode=compile` compiles it for a slice it does not have, and the
accelerator check times it; all three call `build_train_program`, so what the
compile mode reports on is by construction what the run executes (MaxText's
`train_compile.py` works the same way). The builder returns

    step               train_step(state, feature_params, batch) -> (state, metrics), un-jitted
    jitted             the step under jit, with the state and frozen params laid out by the
                       partition rules, the state donated
    abstract_state     TrainState of ShapeDtypeStructs carrying their shardings
    abstract_feature_params, abstract_batch   likewise
    init()             a freshly initialized, sharded TrainState
    compile()          the executable for those abstract inputs (the run's pre-flight:
                       its first step runs this executable; no second compile)

and the batch's layout is stated once (`batch_spec`): the names, global shapes and
dtypes of what a positive source hands the step. The program's abstract batch is
built from it, and `check_host_batch` (the trainer, on every drawn batch; the
accelerator check, on its batch) refuses another layout with one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from drifting_jax import config_defaults, errors, losses, partitioning
from drifting_jax.models import features as features_lib, generator as generator_lib
from drifting_jax.train import optim
from drifting_jax.train import train_step as train_step_lib
from drifting_jax.train.train_step import TrainState

GIB = 2**30


# --------------------------------------------------------------------------- the batch


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's batch, stated once: name -> global shape and dtype.

      labels     [B]                 int32    the step's classes
      positives  [B, Cp, H, W, C]    float32  data of each class (model range)
      negatives  [B, Cn, H, W, C]    float32  unconditional data (Cn may be 0)

  B = train.classes_per_step over all hosts; each host yields its B / processes rows.
  """
  t, d = config.train, config.data
  sample = (int(d.image_size), int(d.image_size), int(d.channels))
  b = int(t.classes_per_step)
  return {"labels": jax.ShapeDtypeStruct((b,), jnp.int32),
          "positives": jax.ShapeDtypeStruct((b, int(t.pos_per_class), *sample), jnp.float32),
          "negatives": jax.ShapeDtypeStruct((b, int(t.neg_per_class), *sample), jnp.float32)}


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """`batch_spec` with the shardings `partitioning.batch_to_global` gives the real batch."""
  return {name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=partitioning.global_batch_sharding(s.shape, mesh))
          for name, s in batch_spec(config).items()}


def check_host_batch(batch: dict[str, np.ndarray], config: ml_collections.ConfigDict, processes: int) -> None:
  """Refuses (one line) a host batch whose names, shapes or dtypes are not `batch_spec`'s share of one host."""
  spec = batch_spec(config)
  if set(batch) != set(spec):
    raise errors.UsageError(f"the positive source yielded fields {sorted(batch)}; the train step takes "
                            f"{sorted(spec)} (train/program.py: batch_spec)")
  for name, s in spec.items():
    want = (s.shape[0] // processes, *s.shape[1:])
    value = np.asarray(batch[name])  # host arrays: no copy
    got, dtype = value.shape, value.dtype
    if tuple(got) != want or np.dtype(dtype) != np.dtype(s.dtype):
      raise errors.UsageError(f"the positive source yielded {name} {tuple(got)} {np.dtype(dtype)}; the train step "
                              f"takes {want} {np.dtype(s.dtype)} per host ({processes} processes; "
                              "train/program.py: batch_spec)")


# --------------------------------------------------------------------------- frozen features


def feature_param_shardings(params: Any, mesh, placement: str) -> Any:
  """Where the frozen network's params live: "fsdp" follows the generator's partition
  rules (split over fsdp, replicated over data: least memory, but gathered for each
  of the step's three passes through the network), "replicated" keeps a whole copy
  on every device (no gathers)."""
  if placement == "replicated":
    return jax.tree.map(lambda _: partitioning.replicated(mesh), params)
  if placement != "fsdp":
    raise errors.UsageError(f"feature.param_placement must be 'fsdp' or 'replicated', got {placement!r}")
  return partitioning.tree_shardings(params, mesh)


def feature_names(network: features_lib.FeatureNetwork, config: ml_collections.ConfigDict) -> list[str]:
  """The feature groups the network gives a sample of the config's shape (traced, nothing computed)."""
  sample = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, config.data.channels),
                                jnp.float32)
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), network.params)
  return sorted(jax.eval_shape(network.apply, params, sample))


# --------------------------------------------------------------------------- the program


def module_config(module) -> dict[str, Any]:
  return {k: getattr(module, k) for k in generator_lib.CONFIG_KEYS if k not in generator_lib.RUNTIME_ONLY_KEYS}


def build_generator(config: ml_collections.ConfigDict, mesh):
  """The generator module of the run on `mesh` (`model.name` with its overrides, its remat
  policy and its attention kernel for the mesh's devices: `generator.module_for_run`)."""
  return generator_lib.module_for_run(config, mesh.devices)


def state_factory(config: ml_collections.ConfigDict, module, tx: optax.GradientTransformation,
                  names: list[str]) -> Callable[[], TrainState]:
  """`make() -> TrainState` at step 0: fresh params (EMA equal to them), optimizer, rng, and
  each feature group's distance-scaling state where the scaling keeps one."""
  args, kwargs = generator_lib.example_inputs(module_config(module), batch_size=1)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  with errors.as_usage_error("bad loss config: "):
    scaling = losses.distance_scaling_from_config(config.loss)

  def make():
    params = module.init({"params": init_rng}, *args, **kwargs)["params"]
    scales = {name: scaling.init(config.data.num_classes) for name in names} if scaling.stateful else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params), rng=train_rng, feature_scale=scales)

  return make


@dataclasses.dataclass
class TrainProgram:
  """Everything about one run's training step on one mesh (see the module docstring)."""
  config: ml_collections.ConfigDict
  mesh: Any
  generator: Any
  features: features_lib.FeatureNetwork
  feature_names: list[str]
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  step: Callable[..., Any]
  jitted: Any
  state_shardings: Any
  feature_shardings: Any
  abstract_state: Any
  abstract_feature_params: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  _make_state: Callable[[], TrainState]

  def init(self) -> TrainState:
    """A fresh TrainState, made on the devices in its sharded layout (one compiled program)."""
    return jax.jit(self._make_state, out_shardings=self.state_shardings)()

  def place_feature_params(self) -> Any:
    """The frozen network's params on the mesh (needs a program built with real params)."""
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.features.params)):
      raise ValueError("this program was built with abstract feature params: nothing to place")
    return jax.device_put(self.features.params, self.feature_shardings)

  def args(self) -> tuple[Any, Any, dict[str, jax.ShapeDtypeStruct]]:
    """The step's abstract inputs, as the run passes them: (state, feature params, batch)."""
    return self.abstract_state, self.abstract_feature_params, self.abstract_batch

  def lower(self):
    return self.jitted.lower(*self.args())

  def compile(self, compiler_options: Optional[dict] = None):
    return self.lower().compile(compiler_options=compiler_options)

  @property
  def generator_params(self) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract_state.params)))


def build_train_program(config: ml_collections.ConfigDict, mesh, *, abstract_features: bool = False,
                        objective: Optional[train_step_lib.Objective] = None) -> TrainProgram:
  """The training program of `config` on `mesh` (see the module docstring).

  abstract_features: build the frozen feature network from its architecture alone
    (shapes, no weights read: the compile mode); else its params are loaded.
  objective: replaces the configured objective (`train_step.trivial_objective` measures
    the loss's share of the step).
  """
  config_defaults.complete(config)
  t = config.train
  module = build_generator(config, mesh)
  network = features_lib.build_feature_network(config, abstract=abstract_features)
  names = feature_names(network, config)
  tx, schedule = optim.make_optimizer(config.optim, t.total_steps, t.max_grad_norm)
  make_state = state_factory(config, module, tx, names)
  state_shape = jax.eval_shape(make_state)
  state_shardings = partitioning.tree_shardings(state_shape, mesh)
  feature_shape = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), network.params)
  feature_shardings = feature_param_shardings(feature_shape, mesh, config.feature.param_placement)
  step = train_step_lib.make_train_step(generator=module, tx=tx, schedule=schedule, feature_apply=network.apply,
                                        config=config, mesh=mesh, objective=objective)
  jitted = jax.jit(step, in_shardings=(state_shardings, feature_shardings, None),
                   out_shardings=(state_shardings, partitioning.replicated(mesh)), donate_argnums=(0,))
  return TrainProgram(
      config=config, mesh=mesh, generator=module, features=network, feature_names=names, tx=tx, schedule=schedule,
      step=step, jitted=jitted, state_shardings=state_shardings, feature_shardings=feature_shardings,
      abstract_state=partitioning.with_shardings(state_shape, state_shardings),
      abstract_feature_params=partitioning.with_shardings(feature_shape, feature_shardings),
      abstract_batch=abstract_batch(config, mesh), _make_state=make_state)


# --------------------------------------------------------------------------- pre-flight


def memory_parts(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program by kind, from the compiler's buffer assignment."""
  m = compiled.memory_analysis()
  return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
          "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
          "code": int(m.generated_code_size_in_bytes)}


def memory_total(parts: dict[str, int]) -> int:
  # Donated arguments share their buffers with the outputs they alias.
  return parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]


def fit_verdict(total: int, capacity: int, device: str, parts: dict[str, int]) -> str:
  """One line: fits with what headroom, or does not fit by how much, naming the largest contributors.

  `device` names one device ("v6e chip", "H100 GPU"). The compile mode and the run's
  pre-flight print the same line.
  """
  if total <= capacity:
    return (f"fits: {total / GIB:.2f} GiB of {capacity / GIB:.0f} GiB per {device} "
            f"({(capacity - total) / GIB:.2f} GiB free)")
  shown = {k: v for k, v in parts.items() if k != "aliased"}
  largest = sorted(shown.items(), key=lambda kv: -kv[1])[:2]
  return (f"does not fit: needs {total / GIB:.2f} GiB per {device}, which has "
          f"{capacity / GIB:.0f} GiB ({(total - capacity) / GIB:.2f} GiB over; largest: "
          + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in largest) + ")")


class DoesNotFit(errors.UsageError):
  """A program needs more memory than its devices have (the message is the one-line verdict)."""


def device_capacity(device) -> Optional[tuple[int, str]]:
  """(bytes a program may use, the device's name) of an accelerator; None on the CPU,
  whose memory is the host's and which the compiler does not budget."""
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit")
  if not limit:
    return None
  word = "GPU" if device.platform in ("gpu", "cuda", "rocm") else "chip"
  return int(limit), f"{device.device_kind} {word}"


def preflight(config: ml_collections.ConfigDict, mesh, what: str = "the training step") -> tuple[TrainProgram, Any]:
  """Builds and compiles the run's step for its abstract inputs and checks that it fits the devices.

  Returns (program, the executable the run then calls for every step); resolves
  `train.microbatches="auto"` by the compiler's memory analysis (and logs the one line
  that says what it picked). When the step needs more than a device has, raises
  `DoesNotFit` with the compile mode's one-line verdict, before any data is loaded or
  bank filled.
  """
  capacity = device_capacity(mesh.devices.flat[0])
  program, compiled, note = compile_fitting(config, mesh, capacity=capacity,
                                            build=lambda c: build_train_program(c, mesh),
                                            compile_program=lambda p: p.compile())
  if note:
    logging.info("%s", note)
    print(note, flush=True)
  check_fits(compiled, mesh, what)
  return program, compiled


def check_fits(compiled, mesh, what: str) -> None:
  capacity = device_capacity(mesh.devices.flat[0])
  if capacity is None:
    return
  limit, device = capacity
  parts = memory_parts(compiled)
  total = memory_total(parts)
  if total > limit:
    raise DoesNotFit(f"{what} {fit_verdict(total, limit, device, parts)} (the compiler's memory analysis; "
                     "set train.microbatches (a count or 'auto'; with train.microbatch_features=recompute "
                     "a chunk's features only are alive), lower train.classes_per_step, raise mesh.fsdp "
                     "or set model.remat_policy=dots and feature.remat_policy=dots)")


# --------------------------------------------------------------------------- microbatches


def microbatch_problem(config: ml_collections.ConfigDict, mesh, count: int) -> Optional[str]:
  """Why `count` chunks cannot split the step's classes on `mesh` (None when they can)."""
  b = int(config.train.classes_per_step)
  if count < 1 or b % count:
    return f"train.microbatches={count} must divide train.classes_per_step={b}"
  data = int(mesh.shape["data"])
  if count > 1 and (b // count) % data:
    return (f"train.microbatches={count} leaves {b // count} classes per chunk, which do not split over the "
            f"mesh's {data} data shards (each shard needs whole classes of every chunk)")
  return None


def microbatch_counts(config: ml_collections.ConfigDict, mesh) -> list[int]:
  """The counts that split the step's classes on `mesh`, smallest first."""
  b = int(config.train.classes_per_step)
  return [m for m in range(1, b + 1) if microbatch_problem(config, mesh, m) is None]


def requested_microbatches(config: ml_collections.ConfigDict, mesh) -> Optional[int]:
  """`train.microbatches` checked (one-line UsageError): the count, or None for "auto"."""
  value = config.train.microbatches
  if value == "auto":
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise errors.UsageError(f"train.microbatches must be a count >= 1 or 'auto', got {value!r}")
  problem = microbatch_problem(config, mesh, int(value))
  if problem:
    raise errors.UsageError(problem)
  return int(value)


def with_microbatches(config: ml_collections.ConfigDict, count: int,
                      features: Optional[str] = None) -> ml_collections.ConfigDict:
  """A copy of `config` whose train.microbatches is `count` (and train.microbatch_features
  `features`, where given); the config itself when it already is."""
  if config.train.microbatches == count and features in (None, config.train.microbatch_features):
    return config
  copy = ml_collections.ConfigDict(config.to_dict())
  del copy.train["microbatches"]  # its type there is the original value's ("auto": str)
  copy.train.microbatches = int(count)
  if features is not None:
    copy.train.microbatch_features = features
  return copy


def keep_cannot_fit(counts: list[int], totals: list[int], limit: int) -> bool:
  """Whether no larger count can fit with the whole batch's features kept, from the last two tried.

  With them kept, a step's memory is about floor + activations / count (the floor: the
  batch's features and their gradient, the state). From counts m1 < m2 the larger
  counts can save at most activations / m2 = (its drop from m1) * m1 / (m2 - m1).
  """
  if len(totals) < 2:
    return False
  (m1, m2), (t1, t2) = counts[-2:], totals[-2:]
  return t2 - limit > max(t1 - t2, 0) * m1 / (m2 - m1)


def compile_fitting(config: ml_collections.ConfigDict, mesh, *, capacity: Optional[tuple[int, str]],
                    build: Callable[[ml_collections.ConfigDict], "TrainProgram"],
                    compile_program: Callable[["TrainProgram"], Any]) -> tuple["TrainProgram", Any, Optional[str]]:
  """The program of `config` compiled, with `train.microbatches="auto"` resolved.

  A count: built and compiled as it is. "auto": each valid count from the smallest
  is compiled until one fits `capacity` (bytes, device name) by the compiler's memory
  analysis; a compiler that refuses a program for lack of memory (`DoesNotFit` from
  `compile_program`) counts as not fitting. With `train.microbatch_features="auto"`
  the counts keep the whole batch's features first and, once the memory the counts
  tried so far saved says no larger count can fit so (`keep_cannot_fit`), recompute
  them from 2 chunks up. Returns (program, executable, the one line that says what
  auto picked and why; None for a given count).
  """
  count = requested_microbatches(config, mesh)
  if count is not None:
    program = build(config)
    return program, compile_program(program), None
  if capacity is None:
    program = build(with_microbatches(config, 1))
    return program, compile_program(program), ("train.microbatches=auto: 1 (the CPU's memory is the host's, "
                                                "which the compiler does not budget)")
  limit, device = capacity
  requested = train_step_lib.microbatch_features_mode(config.train)
  modes = ["keep", "recompute"] if config.train.microbatch_features == "auto" else [requested]
  tried = []
  for mode in modes:
    label = f"{mode}: " if len(modes) > 1 else ""
    counts, totals = [], []
    for count in microbatch_counts(config, mesh):
      if mode == "recompute" and count == 1 and len(modes) > 1:
        continue  # one chunk is the unchunked step, tried already
      program = build(with_microbatches(config, count, mode if len(modes) > 1 else None))
      try:
        compiled = compile_program(program)
      except DoesNotFit:
        tried.append(f"{label}{count}: refused by the compiler")
        label = ""
        continue
      total = memory_total(memory_parts(compiled))
      if total <= limit:
        why = f"{', '.join(tried)} did not fit; " if tried else ""
        which = f" with train.microbatch_features={mode}" if len(modes) > 1 else ""
        return program, compiled, (f"train.microbatches=auto: {count}{which} ({why}{count}: {total / GIB:.2f} GiB "
                                   f"fits the {limit / GIB:.0f} GiB of a {device}; the compiler's memory analysis)")
      tried.append(f"{label}{count}: {total / GIB:.2f} GiB")
      label = ""
      counts.append(count)
      totals.append(total)
      if mode == "keep" and len(modes) > 1 and keep_cannot_fit(counts, totals, limit):
        tried.append("no larger count can fit with the features kept")
        break
  raise DoesNotFit(f"train.microbatches=auto: no count fits the {limit / GIB:.0f} GiB of a {device} "
                   f"({', '.join(tried)}); lower train.classes_per_step or use more devices")
