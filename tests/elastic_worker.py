"""A training run that records what the elastic-resume tests compare (tests/test_elastic_resume.py).

As a script, one process of a run on its own CPU devices (their number comes from
XLA_FLAGS, set by the caller), several processes joined on 127.0.0.1:

    python tests/elastic_worker.py WORKDIR OUT_DIR DATA FSDP [STOP_AT]
        [--coordinator 127.0.0.1:PORT --num_processes N --process_id I]

In the test process itself, `run(...)` with pytest's monkeypatch.

The run is `configs/mnist_tiny.py:smoke` with the memory-bank sampler, 6 steps, a
checkpoint every 2 (all kept), on a (DATA, FSDP) mesh, resuming from WORKDIR's
latest checkpoint if it has one and stopping at STOP_AT if given (a preemption
stand-in). It records, per process:

  start_step                        the step the run started from (the restored step)
  restored/<field>/<path>           the train state right after the restore (resumed runs)
  loaded/<key>                      the host state as loaded into the banks (resumed runs)
  draw/<step>/<name>                this process's batch drawn at each step it ran
  saved/<step>/<field>/<path>       the train state at each checkpoint it saved
  final/<field>/<path>              the train state at the end
  fsdp_sharded                      how many parameters of the final state are split over fsdp
  eval/share, eval/whole            evaluation's samples from the final params (`evaluation_samples`)

Train states are gathered to every process (the model is tiny), so each process
records the global values.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS, EVERY_STEPS = 6, 2
FIELDS = ("step", "params", "ema_params", "opt_state", "feature_scale", "rng")


def make_config(data: int, fsdp: int):
  from configs import mnist_tiny
  config = mnist_tiny.get_config("smoke")
  config.train.positive_sampler = "bank"
  config.train.total_steps = TOTAL_STEPS
  config.checkpoint.every_steps = EVERY_STEPS
  config.checkpoint.keep_last = TOTAL_STEPS // EVERY_STEPS
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config


def run(workdir, data: int, fsdp: int, *, stop_at: int = 0, setattr=setattr) -> dict:
  """Trains (or resumes) in this process; `setattr` patches the trainer's parts (pytest's
  monkeypatch.setattr in a test, so they are restored after it). Returns the record."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from drifting_jax import checkpointing, partitioning
  from drifting_jax.train import data as train_data, run as run_lib, trainer

  record: dict[str, np.ndarray] = {}
  replicate = {}  # one compiled copy to every device, for all the states gathered

  def gather(prefix: str, state) -> None:
    fields = {field: getattr(state, field) for field in FIELDS}
    if jax.process_count() > 1:  # each process holds parts only: copy the whole state everywhere first
      mesh = jax.tree.leaves(fields)[0].sharding.mesh
      if "fn" not in replicate:
        replicate["fn"] = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, PartitionSpec()))
      fields = jax.tree.map(lambda leaf: leaf.addressable_data(0), replicate["fn"](fields))
    for path, leaf in jax.tree_util.tree_flatten_with_path(fields)[0]:
      record[f"{prefix}/{partitioning._path_string(path)}"] = np.array(leaf)

  make_source = train_data.make_source

  def recording_source(config, data):
    source = make_source(config, data)
    load, draw = source.load_state_dict, source.draw

    def load_state_dict(state):
      load(state)
      record.update({f"loaded/{k}": np.array(v) for k, v in source.state_dict().items()})

    def recorded_draw(step):
      batch = draw(step)
      record.update({f"draw/{step}/{k}": np.array(v) for k, v in batch.items()})
      return batch

    source.load_state_dict, source.draw = load_state_dict, recorded_draw
    return source

  restore_or_init, save = run_lib.Run.restore_or_init, run_lib.Run.save

  def recorded_restore_or_init(self, state, *args, **kwargs):
    start_step, state = restore_or_init(self, state, *args, **kwargs)
    record["start_step"] = np.asarray(start_step)
    if start_step:
      gather("restored", state)
    return start_step, state

  def recorded_save(self, step, state, host_state=None):
    gather(f"saved/{step}", state)
    save(self, step, state, host_state)

  setattr(train_data, "make_source", recording_source)
  setattr(run_lib.Run, "restore_or_init", recorded_restore_or_init)
  setattr(run_lib.Run, "save", recorded_save)
  if stop_at:
    setattr(checkpointing.PreemptionGuard, "should_stop", lambda self, step: step == stop_at)

  config = make_config(data, fsdp)
  state = trainer.train_and_evaluate(config, str(workdir))
  gather("final", state)
  record.update(evaluation_samples(config, state.params))
  record["fsdp_sharded"] = np.asarray(sum("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)))
  return record


def evaluation_samples(config, params) -> dict:
  """Samples as evaluation draws them, from the run's (global) params on this process:

  eval/share   this process's share of a 23-label list (`np.array_split` over processes)
  eval/whole   the whole list, drawn by this process alone (the same labels on every host)
  eval/global_share   this process's share, drawn by one program over every host's devices
              (`global_params`: the layout of slices that refuse per-host programs)
  eval/refuses_global_params   whether `generate` refused the params as they are
  """
  import jax
  import numpy as np

  from drifting_jax.eval import sampling
  from drifting_jax.models import generator as generator_lib

  module = generator_lib.build_module(generator_lib.model_config_from_run(config))
  labels = (np.arange(23) * 3 % config.data.num_classes).astype(np.int32)
  parts = np.array_split(labels, jax.process_count())
  first = sum(len(part) for part in parts[:jax.process_index()])
  local = sampling.host_local_params(params)
  share = sampling.generate(module, local, parts[jax.process_index()], 1.0, seed=5, batch_size=4, first_index=first)
  whole = sampling.generate(module, local, labels, 1.0, seed=5, batch_size=4)
  everywhere = sampling.global_params(params)
  global_share = sampling.generate(module, everywhere, parts[jax.process_index()], 1.0, seed=5, batch_size=4,
                                   first_index=first)
  # The global params themselves are refused on several processes: fed each host's own
  # labels, one program over all hosts mixes them up wherever the partitioner splits the
  # batch over hosts (a 2-host evaluation of mnist_tiny scored 0.41 accuracy for 0.93).
  try:
    sampling.generate(module, params, parts[jax.process_index()], 1.0, seed=5, batch_size=4, first_index=first)
    refused = False
  except ValueError:
    refused = True
  return {"eval/share": share, "eval/whole": whole, "eval/global_share": global_share,
          "eval/refuses_global_params": np.asarray(refused)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("out_dir")
  parser.add_argument("data", type=int)
  parser.add_argument("fsdp", type=int)
  parser.add_argument("stop_at", type=int, nargs="?", default=0)
  parser.add_argument("--coordinator")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  args = parser.parse_args()

  sys.path.insert(0, str(ROOT))
  import jax
  import numpy as np
  if args.coordinator:  # the tests pass 127.0.0.1 only
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  record = run(args.workdir, args.data, args.fsdp, stop_at=args.stop_at)
  out = pathlib.Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / f"process_{jax.process_index()}.npz", **record)


if __name__ == "__main__":
  main()
