"""Checkpoints: orbax for the (sharded) train state, npz files for per-host state.

Layout under the workdir:

    checkpoints/<step>/...                 orbax CheckpointManager (state pytree)
    host_state/<step>/process_<i>.npz      memory banks etc. of process i at that step
    params_ema/{ema_params.msgpack, metadata.json}   the release's artifact format

The per-host state is written before the orbax save is committed, so a checkpoint
that orbax lists as finished always has its host files; restoring a step whose host
files are missing is an error, not a silent empty bank.
"""

from __future__ import annotations

import os
import pathlib
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from drifting_jax import errors


class CheckpointError(errors.UsageError):
  """A checkpoint that is missing, incomplete or corrupt (the message names the step and the file)."""


class Checkpointer:
  """Saves and restores (train state, per-host numpy state) at a step."""

  def __init__(self, workdir: str | os.PathLike, *, keep_last: int = 2, keep_every: int = 0,
               async_save: bool = True):
    self.workdir = pathlib.Path(workdir).absolute()
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
              *, with_host_state: bool = True) -> tuple[int, Any, dict[str, np.ndarray] | None]:
    """Restores `step` (latest when None) into the shardings of `abstract_state`."""
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

  def _host_file(self, step: int) -> pathlib.Path:
    return self.host_directory / str(step) / f"process_{jax.process_index()}.npz"

  def _write_host_state(self, step: int, host_state: dict[str, np.ndarray]) -> None:
    path = self._host_file(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **host_state)
    os.replace(tmp, path)

  def _read_host_state(self, step: int) -> dict[str, np.ndarray]:
    path = self._host_file(step)
    if not path.exists():
      raise CheckpointError(f"checkpoint step {step} has no host state file {path} (memory banks); "
                            f"it was written by a different number of processes or is incomplete")
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
    except Exception as e:
      raise CheckpointError(f"host state {path} is corrupt: {e}") from e

  def _prune_host_state(self) -> None:
    """Drops this process's host files of steps orbax no longer keeps (the newest
    step may still be in flight, so only steps below the newest kept one go)."""
    if not self.host_directory.exists():
      return
    keep = set(self.manager.all_steps())
    for child in self.host_directory.glob("*"):
      if child.name.isdigit() and int(child.name) not in keep and int(child.name) < max(keep | {0}):
        for f in child.glob(f"process_{jax.process_index()}.npz"):
          f.unlink(missing_ok=True)
        try:
          child.rmdir()
        except OSError:
          pass  # other processes' files still there


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
