"""Checkpoints: orbax for the (sharded) train state, npz files for per-host state.

Layout under the workdir:

    checkpoints/<step>/...                 orbax CheckpointManager (state pytree)
    host_state/<step>/process_<i>.npz      memory banks etc. of process i at that step
    params_ema/{ema_params.msgpack, metadata.json}   the release's artifact format

The per-host state is written before the orbax save is committed, so a checkpoint
that orbax lists as finished always has its host files; restoring a step whose host
files are missing is an error, not a silent empty bank.

Elastic resume: a checkpoint restores onto another mesh, device count or process
count. orbax reads the saved global arrays into the shardings of the restoring
run's state. Each host file records how many processes wrote the step; a run with
the same count reads its own file, a run with another count gets an empty
`HostState` that can read any saved process's file (`HostState.read`), from which
the positive source rebuilds its banks (`train.data.BankSource.load_state_dict`).
The workdir must then be on storage every process sees, as orbax needs anyway.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from drifting_jax import errors, paths


class CheckpointError(errors.UsageError):
  """A checkpoint that is missing, incomplete or corrupt (the message names the step and the file)."""


# Keys of the metadata each host file carries beside the source's arrays.
_PROCESS_COUNT_KEY, _PROCESS_INDEX_KEY = "__process_count__", "__process_index__"


class HostState(dict):
  """The host state a resumed process loads: a dict of arrays, plus where it came from.

  With the process count the step was saved with, the dict is this process's own
  file. With another count it is empty: no process's file is "its own" then, and a
  source that keeps state must rebuild it from the saved files, `read(p)` for p in
  `range(saved_process_count)` (one at a time: each may hold gigabytes of banks).
  """

  def __init__(self, arrays: dict[str, np.ndarray], *, step: int, saved_process_count: int, reader):
    super().__init__(arrays)
    self.step = step
    self.saved_process_count = saved_process_count
    self._reader = reader

  @property
  def same_process_count(self) -> bool:
    return self.saved_process_count == jax.process_count()

  def read(self, process: int) -> dict[str, np.ndarray]:
    """The host state that saved process `process` wrote at this step."""
    if not 0 <= process < self.saved_process_count:
      raise ValueError(f"step {self.step} was saved by {self.saved_process_count} processes, "
                       f"there is no process {process}")
    return self._reader(process)


def _check_storage_client(workdir) -> None:
  """Orbax reaches gs:// through google-cloud-storage, which it does not install itself."""
  if not os.fspath(workdir).startswith("gs://"):
    return
  try:
    found = importlib.util.find_spec("google.cloud.storage") is not None
  except ImportError:  # no google.cloud package at all
    found = False
  if not found:
    raise CheckpointError(
        f"the workdir {os.fspath(workdir)} is in Google Cloud Storage, and orbax needs the "
        f"google-cloud-storage package to checkpoint there: pip install google-cloud-storage "
        f"(on every host; Cloud TPU VM images usually have it)")


def _serial_array_saves_on_cpu() -> None:
  """On the CPU platform, saves each array's shard from its first replica only.

  Orbax's replica-parallel saving splits every replicated array between its replicas,
  which runs one small slicing program per array shape: it pays on accelerators (the
  device-to-host copies are shared), but on the CPU the arrays are already in host
  memory and the compiles are all it adds (5 s for the toy trainer's 170 arrays, where
  the write takes 0.3 s). Orbax turns it off on GPUs for its own reasons (by
  JAX_PLATFORMS); the files are the same either way, and any mesh restores them.
  """
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """Saves and restores (train state, per-host numpy state) at a step."""

  def __init__(self, workdir: str | os.PathLike, *, keep_last: int = 2, keep_every: int = 0,
               async_save: bool = True):
    self.workdir = paths.as_path(workdir)  # a local folder or a bucket URL every host reads
    _check_storage_client(self.workdir)
    _serial_array_saves_on_cpu()
    self.directory = self.workdir / "checkpoints"
    self.host_directory = self.workdir / "host_state"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep_last)),
        keep_period=int(keep_every) if keep_every else None,
        enable_async_checkpointing=bool(async_save),
        create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def reload(self) -> None:
    """Re-reads the directory (for a watcher following another process's saves)."""
    self.manager.reload()

  def save(self, step: int, state: Any, host_state: dict[str, np.ndarray] | None = None,
           *, force: bool = True) -> None:
    if host_state is not None:
      self._write_host_state(step, host_state)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)
    self._prune_host_state()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, abstract_state: Any, step: int | None = None,
              *, with_host_state: bool = True) -> tuple[int, Any, HostState | None]:
    """Restores `step` (latest when None) into the shardings of `abstract_state`.

    The shardings may differ from the saved ones (another mesh, device or process
    count): orbax reads each device's part of the saved global arrays.
    """
    step = self._existing_step(step)
    restored = self._restore(step, ocp.args.StandardRestore(abstract_state))
    host_state = self._read_host_state(step) if with_host_state else None
    return step, restored, host_state

  def restore_subtree(self, abstract_subtree: dict[str, Any], step: int | None = None) -> tuple[int, dict[str, Any]]:
    """Restores only the named top-level fields of the saved state, e.g. {"ema_params": abstract params}.

    A partial restore: the other fields (optimizer moments, feature scales, rng) are
    never read, so their structure need not be known. Readers of a checkpoint (the
    sampler, the watcher) therefore need only the model, not the trainer.
    """
    step = self._existing_step(step)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
    return step, self._restore(step, ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args,
                                                              partial_restore=True))

  def _existing_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise CheckpointError(f"no checkpoint under {self.directory}")
    if step not in self.manager.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} under {self.directory}; "
                            f"available: {self.all_steps()}")
    return step

  def _restore(self, step: int, state_args: Any) -> Any:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(state=state_args))["state"]
    except Exception as e:  # orbax raises many kinds of errors for damaged files
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} could not be restored ({type(e).__name__}: {e}). "
          f"It may be corrupt or from an incompatible config: move that step's folder away to resume "
          f"from an earlier step, or start a new workdir.") from e

  # -- per-host state ------------------------------------------------------------

  def _host_file(self, step: int, process: int | None = None) -> epath.Path:
    process = jax.process_index() if process is None else process
    return self.host_directory / str(step) / f"process_{process}.npz"

  def _write_host_state(self, step: int, host_state: dict[str, np.ndarray]) -> None:
    paths.save_npz(self._host_file(step), {**host_state, _PROCESS_COUNT_KEY: np.int64(jax.process_count()),
                                           _PROCESS_INDEX_KEY: np.int64(jax.process_index())})

  def _read_host_state(self, step: int) -> HostState:
    saved = self._saved_process_count(step)
    reader = lambda process: self._read_host_file(step, process)  # noqa: E731
    if saved == jax.process_count():
      return HostState(reader(jax.process_index()), step=step, saved_process_count=saved, reader=reader)
    missing = [str(self._host_file(step, p)) for p in range(saved) if not self._host_file(step, p).exists()]
    if missing:
      raise CheckpointError(f"checkpoint step {step} was saved by {saved} processes but lacks the host state "
                            f"files (memory banks) {missing}; resuming on {jax.process_count()} processes needs "
                            f"all of them, on storage every process can read")
    return HostState({}, step=step, saved_process_count=saved, reader=reader)

  def _saved_process_count(self, step: int) -> int:
    """How many processes wrote the host state of `step` (from process 0's file; files
    written before the count was recorded: the number of process_<i>.npz files)."""
    first = self._host_file(step, 0)
    if first.exists():
      try:
        data = paths.load_npz(first)
        if _PROCESS_COUNT_KEY in data:
          return int(data[_PROCESS_COUNT_KEY])
      except Exception as e:
        raise CheckpointError(f"host state {first} is corrupt: {e}") from e
    folder = self.host_directory / str(step)
    found = sorted(int(f.stem.split("_")[1]) for f in folder.glob("process_*.npz")
                   if f.stem.split("_")[1].isdigit()) if folder.exists() else []
    if not found or found != list(range(len(found))):
      raise CheckpointError(f"checkpoint step {step} has no host state file {self._host_file(step)} (memory "
                            f"banks){'' if not found else f'; found only processes {found}'}: it is incomplete")
    return len(found)

  def _read_host_file(self, step: int, process: int) -> dict[str, np.ndarray]:
    path = self._host_file(step, process)
    if not path.exists():
      raise CheckpointError(f"checkpoint step {step} has no host state file {path} (memory banks); "
                            f"it is incomplete")
    try:
      data = paths.load_npz(path)
    except Exception as e:
      raise CheckpointError(f"host state {path} is corrupt: {e}") from e
    return {k: v for k, v in data.items() if k not in (_PROCESS_COUNT_KEY, _PROCESS_INDEX_KEY)}

  def _prune_host_state(self) -> None:
    """Drops this process's host files of steps orbax no longer keeps (the newest
    step may still be in flight, so only steps below the newest kept one go).
    Process 0 also drops the files of processes this run does not have (a step
    saved by more processes than resumed it)."""
    if not self.host_directory.exists():
      return
    keep = set(self.manager.all_steps())
    for child in self.host_directory.glob("*"):
      if child.name.isdigit() and int(child.name) not in keep and int(child.name) < max(keep | {0}):
        for f in child.glob("process_*.npz"):
          index = f.stem.split("_")[1]
          if index == str(jax.process_index()) or (
              jax.process_index() == 0 and index.isdigit() and int(index) >= jax.process_count()):
            f.unlink(missing_ok=True)
        try:
          child.rmdir()
        except Exception:  # other processes' files still there (a bucket's "folder" may refuse otherwise)
          pass


class PreemptionGuard:
  """Turns SIGTERM (preemption, scancel, Ctrl-C via SIGINT if asked) into a flag.

  The training loop polls `should_stop(step)`, saves a final checkpoint and exits.
  With several processes the flag is OR-ed across hosts so all of them stop at the
  same step and join the same checkpoint.
  """

  def __init__(self, signals=(signal.SIGTERM,), sync_every: int = 10):
    self._flag = threading.Event()
    self.sync_every = max(1, sync_every)
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    self._flag.set()

  def trigger(self) -> None:
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._flag.is_set()
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.array([self._flag.is_set()], np.int32))
    return bool(np.any(flags))

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
