"""The scaffold every training run shares: resume or init_from, writers, NaN stop, preemption save.

The generator trainer (`trainer.train_and_evaluate`) and the MAE pretraining
(`mae_pretrain.train_mae`) differ in their state, step and data; around the steps
they do the same things, which live here once:

  * `restore_or_init`: the latest checkpoint of the run's folder (and the data
    source's host state), else the parameters of an artifact (`init_from`), else
    the fresh state; the checkpoint may come from another mesh, device count or
    process count (elastic resume, `checkpointing`);
  * `record` and `fetch_checked`: losses are fetched only where the host waits for
    the device anyway (log and checkpoint steps), and the first non-finite one
    stops the run, naming the last good checkpoint;
  * `save`: a checkpoint, after the pending losses are checked;
  * `preempted`: SIGTERM becomes a final save at a step all hosts agree on;
  * leaving the `with` block waits for async saves, flushes the writer and
    restores the signal handlers.

`HostTime` keeps the loop's host-time bookkeeping (the logged `host_fraction`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from clu import metric_writers

from drifting_jax import checkpointing, errors
from drifting_jax.models import artifacts


class NonFiniteLossError(errors.UsageError):
  """The loss went NaN or infinite: the run stopped at its last good checkpoint (the message says what to try)."""


class Run:
  """One training run's checkpoints, writer and stop conditions (a context manager)."""

  def __init__(self, ckpt: checkpointing.Checkpointer, writer: metric_writers.MetricWriter, *, name: str,
               loss_name: str, hint: str):
    self.ckpt, self.writer = ckpt, writer
    # Words of the log and error messages: what is trained, what its loss is called,
    # and what to try when the loss is not finite.
    self.name, self.loss_name, self.hint = name, loss_name, hint
    self.guard = checkpointing.PreemptionGuard()
    self.last_saved = 0
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []

  def __enter__(self) -> "Run":
    return self

  def __exit__(self, *exc_info) -> None:
    self.ckpt.wait()
    self.writer.flush()
    self.guard.restore_handlers()

  def restore_or_init(self, state: Any, params_shardings: Any, *, init_from: str, kind: str,
                      load_host_state: Optional[Callable[[checkpointing.HostState], None]] = None) -> tuple[int, Any]:
    """(first step, state): resumed from the latest checkpoint, else `init_from`'s params, else `state`."""
    start_step = 0
    if self.ckpt.latest_step() is not None:
      start_step, state, host_state = self.ckpt.restore(state, with_host_state=load_host_state is not None)
      if load_host_state is not None:
        try:
          load_host_state(host_state)
        except checkpointing.CheckpointError:
          raise
        except ValueError as e:  # the banks' shapes or keys do not match this run's
          raise checkpointing.CheckpointError(
              f"the host state (memory banks) of checkpoint step {start_step} in {self.ckpt.directory} does not "
              f"fit this run: {e}") from e
      if host_state is not None and not host_state.same_process_count:
        logging.warning("%s resumed from step %d, saved by %d processes, on %d: host state re-distributed",
                        self.name, start_step, host_state.saved_process_count, jax.process_count())
      logging.info("%s resumed from step %d", self.name, start_step)
    elif init_from:
      _, init_params, _ = artifacts.load(init_from, kind=kind)
      params = jax.device_put(init_params, params_shardings)
      state = state.replace(params=params, ema_params=params)
      logging.info("%s initialized from %s", self.name, init_from)
    self.last_saved = start_step
    return start_step, state

  def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Keeps a step's (not yet computed) metrics for the next finiteness check."""
    self._pending.append((step, metrics))

  def check_finite(self) -> None:
    """Fetches the recorded losses; stops on the first non-finite one."""
    for step, metrics in self._pending:
      loss = float(jax.device_get(metrics["loss"]))
      if not np.isfinite(loss):
        raise NonFiniteLossError(
            f"{self.loss_name} is {loss} at step {step}; stopping. The last good checkpoint (step "
            f"{self.last_saved}) in {self.ckpt.directory} is intact. {self.hint}")
    self._pending = []

  def fetch_checked(self, metrics: dict[str, jax.Array]) -> dict[str, float]:
    """The means of `metrics` (waiting for their step), after checking the recorded losses."""
    latest = jax.device_get(metrics)
    self.check_finite()
    return {k: float(np.mean(v)) for k, v in latest.items()}

  def save(self, step: int, state: Any, host_state: Optional[dict[str, np.ndarray]] = None) -> None:
    self.check_finite()
    self.ckpt.save(step, state, host_state)
    self.last_saved = step

  def preempted(self, step: int, save: Callable[[int], None]) -> bool:
    """True when the run must stop at `step` (SIGTERM on some host), after saving it with `save`."""
    if not self.guard.should_stop(step):
      return False
    logging.warning("preemption signal: saving %s step %d and stopping", self.name, step)
    if self.last_saved != step:
      save(step)
    return True


class HostTime:
  """Seconds of host work proper within a logging window, and their share of its wall time."""

  def __init__(self):
    self.seconds, self.window_start = 0.0, time.perf_counter()

  @contextlib.contextmanager
  def measure(self) -> Iterator[None]:
    start = time.perf_counter()
    yield
    self.seconds += time.perf_counter() - start

  def end_window(self) -> float:
    """The window's host fraction; a new window starts."""
    fraction = self.seconds / max(time.perf_counter() - self.window_start, 1e-9)
    self.seconds, self.window_start = 0.0, time.perf_counter()
    return fraction
