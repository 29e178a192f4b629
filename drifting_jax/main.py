r"""drifting_jax entry point.

    python -m drifting_jax.main --config=configs/mnist_tiny.py --workdir=runs/demo \
        [--mode=train|sample|evaluate|watch|train_classifier|train_mae|build_latents|import_latents]
        [--config.a.b=value ...]

The config file returns an ml_collections.ConfigDict; command-line overrides are
type-checked against it before any work starts (an unknown key or a value of the
wrong type is an error, not a silently ignored flag).

A user's mistake (a bad flag or config value, an unknown objective, kernel or data
set, a missing checkpoint, artifact or data set: `errors.UsageError`) prints one
line, `error: <what, and the fix>`, and exits with status 2; a bug keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from drifting_jax import host_memory

host_memory.keep_freed_memory()  # before JAX starts its threads (see host_memory)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from drifting_jax import errors, modes  # noqa: E402  # light: a mode's module is imported when the mode runs

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", list(modes.MODES), "What to run (drifting_jax.modes).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs (else taken from the environment).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-process runs).")
flags.DEFINE_bool("tpu_pod", False, "Multi-host TPU VM: jax.distributed discovers the pod itself.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
  if FLAGS.tpu_pod:
    jax.distributed.initialize()
    return
  explicit = FLAGS.coordinator_address is not None
  if explicit or os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
    if "cpu" in os.environ.get("JAX_PLATFORMS", ""):  # CPU collectives across processes
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def _exit_with(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_STATUS)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override as one line instead of a traceback.

  ml_collections reports an unknown config field as an AttributeError and a value
  of the wrong type as a ValueError or TypeError; a config file's own variant check
  (`--config=configs/x.py:name`) raises a ValueError. While parsing, all of them are
  the command line's fault.
  """
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # A config file that raised while loading is reported with its whole traceback
    # in the message; its last line is the config file's own message.
    lines = [line for line in str(e).splitlines() if line.strip()]
    message = lines[-1] if "Traceback" in str(e) else " ".join(lines)
    _exit_with(f"{message} (see --helpshort)")
  except AttributeError as e:
    _exit_with(f"no such config field: {e} (overrides must name a field of the config file; see --helpshort)")
  except (ValueError, TypeError, KeyError) as e:
    _exit_with(f"bad --config or override: {e}")


def main(argv):
  if len(argv) > 1:
    _exit_with(f"unexpected arguments: {argv[1:]}")
  try:
    _initialize_distributed()
    config = FLAGS.config
    logging.info("process %d/%d, %d local devices, %d devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    logging.info("config:\n%s", config)
    modes.run(FLAGS.mode, config, FLAGS.workdir)
  except errors.UsageError as e:
    _exit_with(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
