"""Elastic resume: a checkpoint saved on one mesh continues the same run on another.

End to end (marked slow): a straight run on mesh A (1 process x 8 CPU devices,
data=8 x fsdp=1) trains 6 steps of mnist_tiny's smoke config with memory banks,
saving every 2 steps. Its checkpoints resume

* on data=2 x fsdp=4 over the same 8 devices (in this process): the split changes;
* on 2 processes x 2 devices, data=2 x fsdp=2 (subprocesses joined on 127.0.0.1),
  preempted at step 4; that 2-process checkpoint then resumes here, on 1 process x
  8 devices, data=2 x fsdp=4: device count 8 -> 4 -> 8, process count 1 -> 2 -> 1.

Every resume must start at the saved step with the saved train state (bit for bit,
in the new shardings) and banks (bit for bit), draw the very batches the straight
run drew at the same steps, and end where the straight run ended, up to the order
of the reductions (`_TOLERANCE`).

The rest checks the pieces without training: the host files a step's processes
write, read by another number of processes; the banks' re-distribution
(`memory_bank.BankDealer`); the positive source's three ways of loading them.
"""

from __future__ import annotations

import collections
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import elastic_worker
from drifting_jax import checkpointing
from drifting_jax.train import data as train_data, memory_bank as mb

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Parameters, EMA, Adam moments and feature scales after a resume on another mesh
# agree with the straight run's to float32 rounding, not bit for bit: the batch, the
# gradients and the means over classes are summed in another order (per device,
# then across devices or processes), and the 2-process leg compiles at XLA's -O0.
# Each such sum differs in its last bits (~1e-7 relative); a few steps of Adam carry
# that along without amplifying it much here (observed at most: 3e-8 on parameters,
# 1.2e-7 on EMA parameters, 1.9e-6 on the feature scales of ~17). The tolerance,
# 5e-6 + 5e-6 |x|, is 40 times the worst of these. One step's update is ~1e-4 on
# every parameter (Adam's step is about the learning rate), and `_assert_moved`
# checks that the compared steps move the parameters by more than the tolerance, so
# a resume that lost the step, the banks or the data position fails.
_TOLERANCE = dict(rtol=5e-6, atol=5e-6)


def _state(record: dict, prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix) + 1:]: v for k, v in record.items() if k.startswith(prefix + "/")}


def _assert_states(actual: dict, expected: dict, exact: bool) -> None:
  assert actual.keys() == expected.keys() and actual
  for name in expected:
    if exact:
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    elif np.issubdtype(expected[name].dtype, np.floating):
      np.testing.assert_allclose(actual[name], expected[name], err_msg=name, **_TOLERANCE)
    else:  # step, rng key, top-k counters
      np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def _assert_moved(later: dict, earlier: dict) -> None:
  """The steps between two states change the parameters beyond the tolerance (the
  comparisons after them can fail)."""
  moved = [not np.allclose(later[k], earlier[k], **_TOLERANCE) for k in earlier if k.startswith("params/")]
  assert np.mean(moved) > 0.5, f"only {sum(moved)} of {len(moved)} parameters moved"


def _host_file(workdir, step: int, process: int) -> dict[str, np.ndarray]:
  with np.load(pathlib.Path(workdir) / "host_state" / str(step) / f"process_{process}.npz") as f:
    return {k: f[k] for k in f.files if not k.startswith("__")}


def _truncated_copy(source, target, step: int) -> pathlib.Path:
  """A copy of a run's workdir as it was when `step` was its latest checkpoint."""
  shutil.copytree(source, target)
  for folder in ("checkpoints", "host_state"):
    for child in (pathlib.Path(target) / folder).iterdir():
      if child.name.isdigit() and int(child.name) > step:
        shutil.rmtree(child)
  return pathlib.Path(target)


def _draws(records: list[dict], step: int) -> dict[str, np.ndarray]:
  """The global batch of `step`: the processes' rows in process order."""
  return {name: np.concatenate([r[f"draw/{step}/{name}"] for r in records])
          for name in ("labels", "positives", "negatives")}


def _check_resume(records: list[dict], straight: dict, start: int, saved_state: dict, saved_host: dict) -> None:
  """A resumed run (one record per process) continued `straight` from `start`."""
  for process, record in enumerate(records):
    assert int(record["start_step"]) == start
    _assert_states(_state(record, "restored"), saved_state, exact=True)
    loaded = _state(record, "loaded")
    assert loaded.keys() == saved_host.keys()
    for key, value in saved_host.items():
      if key.endswith("rng_state") and process > 0:
        continue  # a process new to the run keeps its own generator (not drawn from: replicated data)
      np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  for step in range(start, elastic_worker.TOTAL_STEPS):
    if f"draw/{step}/labels" in records[0]:
      for name, batch in _draws(records, step).items():
        np.testing.assert_array_equal(batch, straight[f"draw/{step}/{name}"], err_msg=f"step {step} {name}")
  assert f"draw/{start}/labels" in records[0] and f"draw/{start - 1}/labels" not in records[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """(workdir, record) of the straight run on mesh A."""
  workdir = tmp_path_factory.mktemp("elastic") / "straight"
  with pytest.MonkeyPatch.context() as patch:
    record = elastic_worker.run(workdir, 8, 1, setattr=patch.setattr)
  assert int(record["start_step"]) == 0 and int(record["final/step"]) == elastic_worker.TOTAL_STEPS
  return workdir, record


@pytest.mark.e2e
@pytest.mark.slow
def test_resume_on_another_data_fsdp_split(straight, tmp_path, monkeypatch):
  workdir, a = straight
  resumed = _truncated_copy(workdir, tmp_path / "resumed", 4)
  b = elastic_worker.run(resumed, 2, 4, setattr=monkeypatch.setattr)
  assert int(b["fsdp_sharded"]) > 0  # the noise embeddings (and their moments) are split 4 ways now
  _check_resume([b], a, 4, _state(a, "saved/4"), _host_file(workdir, 4, 0))
  _assert_moved(_state(a, "final"), _state(a, "saved/4"))
  _assert_states(_state(b, "final"), _state(a, "final"), exact=False)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(workdir, out_dir, data: int, fsdp: int, stop_at: int, processes: int, devices: int) -> list[dict]:
  # XLA's cheaper code generation halves the compile time of these processes; it
  # changes results in the last bits only, and theirs are compared to the tolerance.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}
  address = f"127.0.0.1:{_free_port()}"
  commands = [[sys.executable, str(ROOT / "tests" / "elastic_worker.py"), str(workdir), str(out_dir), str(data),
               str(fsdp), str(stop_at), "--coordinator", address, "--num_processes", str(processes),
               "--process_id", str(i)] for i in range(processes)]
  running = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
  try:
    outputs = [p.communicate(timeout=400)[0] for p in running]
  finally:
    for p in running:
      if p.poll() is None:
        p.kill()
  for i, (p, output) in enumerate(zip(running, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{output[-3000:]}"
  records = []
  for i in range(processes):
    with np.load(pathlib.Path(out_dir) / f"process_{i}.npz") as f:
      records.append({k: f[k] for k in f.files})
  return records


@pytest.mark.e2e
@pytest.mark.slow
def test_resume_on_another_process_and_device_count(straight, tmp_path, monkeypatch):
  workdir, a = straight
  # 1 process x 8 devices -> 2 processes x 2 devices, preempted at step 4.
  two = _truncated_copy(workdir, tmp_path / "two", 2)
  b = _run_processes(two, tmp_path / "two_out", 2, 2, stop_at=4, processes=2, devices=2)
  _check_resume(b, a, 2, _state(a, "saved/2"), _host_file(workdir, 2, 0))
  _assert_moved(_state(a, "saved/4"), _state(a, "saved/2"))
  _assert_states(_state(b[0], "saved/4"), _state(a, "saved/4"), exact=False)
  # Both processes saved their banks; with replicated data they hold the same samples.
  host_0, host_1 = _host_file(two, 4, 0), _host_file(two, 4, 1)
  for key in host_0:
    if not key.endswith("rng_state"):
      np.testing.assert_array_equal(host_0[key], host_1[key], err_msg=key)

  # Evaluation on 2 processes: each host samples its share of one label list from the
  # (global) params, and the shares are the list as one process draws it: the right
  # labels on each host, and each sample's noise independent of the split.
  whole = b[0]["eval/whole"]
  np.testing.assert_array_equal(b[1]["eval/whole"], whole)
  np.testing.assert_array_equal(np.concatenate([b[0]["eval/share"], b[1]["eval/share"]]), whole)
  assert len(b[0]["eval/share"]) == 12 and np.ptp(whole, axis=0).max() > 0  # samples differ
  assert all(bool(r["eval/refuses_global_params"]) for r in b)
  # The same shares from one program over both hosts' devices (the global layout),
  # each host's labels on its own rows: 12 and 11 rows, so host 1 pads its last call.
  np.testing.assert_array_equal(np.concatenate([b[0]["eval/global_share"], b[1]["eval/global_share"]]), whole)

  # 2 processes x 2 devices -> 1 process x 8 devices, to the end.
  c = elastic_worker.run(two, 2, 4, setattr=monkeypatch.setattr)
  _check_resume([c], a, 4, _state(b[0], "saved/4"), host_0)
  _assert_states(_state(c, "final"), _state(a, "final"), exact=False)


# --------------------------------------------------------------------------- the pieces


def _saved_bank(process: int, pushes=(7, 3, 0, 4), slots: int = 4) -> mb.MemoryBank:
  """A bank whose samples name themselves: 1000 * process + 100 * class + push number."""
  bank = mb.MemoryBank(len(pushes), slots, (1,), seed=process)
  for c, n in enumerate(pushes):
    for i in range(n):
      bank.push(np.array([[1000 * process + 100 * c + i]], np.float32), np.array([c]))
  return bank


def _expected_deal(pushes, slots, saved: int, index: int, processes: int):
  """The dealing rule, sample by sample: (buffer rows per class oldest first, count)."""
  rows = []
  for c, n in enumerate(pushes):
    dealt = []
    for p in range(saved):
      for i in range(max(0, n - slots), n):  # the samples a bank of `slots` still holds
        g = (n - 1 - i) * saved + p  # age rank, newest first, interleaving the processes
        if g % processes == index:
          dealt.append((g, 1000 * p + 100 * c + i))
    rows.append([value for _, value in sorted(dealt)[:slots]][::-1])
  return rows


@pytest.mark.parametrize("saved,processes", [(2, 1), (2, 2), (2, 3), (2, 4), (3, 2), (1, 3), (4, 2)])
def test_bank_dealer_deals_the_saved_samples(saved, processes):
  pushes, slots = (7, 3, 0, 4), 4
  held = {c: set() for c in range(len(pushes))}
  for index in range(processes):
    bank = mb.MemoryBank(len(pushes), slots, (1,))
    dealer = mb.BankDealer(bank, saved_processes=saved, index=index, processes=processes)
    for p in reversed(range(saved)):  # any order
      dealer.add(p, _saved_bank(p, pushes, slots).state_dict())
    state = dealer.state_dict()
    for c, expected in enumerate(_expected_deal(pushes, slots, saved, index, processes)):
      assert state["count"][c] == len(expected) and state["ptr"][c] == len(expected) % slots
      np.testing.assert_array_equal(state["buffer"][c, :len(expected), 0], expected)
      assert not held[c] & set(expected)  # no sample goes to two processes
      held[c] |= set(expected)
    bank.load_state_dict({**state, "rng_state": bank.state_dict()["rng_state"]})
    if state["count"][0] == slots:  # a full class: the next push replaces its oldest sample
      oldest = bank.buffer[0, 0, 0]
      bank.push(np.array([[-1.0]], np.float32), np.array([0]))
      assert oldest not in bank.buffer[0, :, 0] and -1.0 in bank.buffer[0, :, 0]
  saved_samples = {c: {1000 * p + 100 * c + i for p in range(saved) for i in range(max(0, n - slots), n)}
                   for c, n in enumerate(pushes)}
  for c in held:
    assert held[c] <= saved_samples[c]
    if processes >= saved:  # room for all of them: none is lost
      assert held[c] == saved_samples[c]


def test_bank_dealer_refuses_a_bank_of_another_shape():
  dealer = mb.BankDealer(mb.MemoryBank(3, 4, (1,)), saved_processes=1, index=0, processes=2)
  with pytest.raises(ValueError, match="did num_classes, slots or the sample shape change"):
    dealer.add(0, _saved_bank(0).state_dict())
  with pytest.raises(ValueError, match=r"saved processes \[0\] were not added"):
    dealer.state_dict()


def test_bfloat16_banks_survive_the_npz_round_trip(tmp_path):
  bank = mb.MemoryBank(2, 3, (2,), dtype=jax.numpy.bfloat16)
  bank.push(np.array([[1.5, -2.0], [0.25, 3.0]], np.float32), np.array([0, 1]))
  np.savez(tmp_path / "bank.npz", **bank.state_dict())
  with np.load(tmp_path / "bank.npz") as f:
    state = {k: f[k] for k in f.files}
  assert state["buffer"].dtype.kind == "V"  # how np.load returns bfloat16
  restored = mb.MemoryBank(2, 3, (2,), dtype=jax.numpy.bfloat16)
  restored.load_state_dict(state)
  np.testing.assert_array_equal(restored.buffer.astype(np.float32), bank.buffer.astype(np.float32))


def _as_process(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def _train_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(bank_dtype="float32", positive_bank_size=4, negative_bank_size=6,
                                        pos_per_class=2, neg_per_class=2, push_per_step=8, classes_per_step=2))


def _data(replicated: bool, process: int, processes: int) -> train_data.TrainingData:
  """12 samples of 3 classes, named by their index; sharded: every `processes`-th one."""
  rows = np.arange(12) if replicated else np.arange(process, 12, processes)
  return train_data.TrainingData(rows.astype(np.float32).reshape(-1, 1, 1, 1), (rows % 3).astype(np.int32), 3,
                                 seed=0, process_index=process, replicated=replicated)


def _save_sources(monkeypatch, ckpt, replicated: bool, processes: int, step: int = 5) -> list[dict]:
  """The host files of `step` as `processes` processes write them (after a few draws)."""
  states = []
  for p in range(processes):
    _as_process(monkeypatch, p, processes)
    source = train_data.BankSource(_data(replicated, p, processes), _train_config())
    for s in range(step):
      source.draw(s)
    states.append(source.state_dict())
    ckpt._write_host_state(step, states[-1])
  return states


@pytest.mark.parametrize("replicated", [True, False], ids=["replicated", "sharded"])
@pytest.mark.parametrize("saved,processes", [(2, 1), (1, 2), (2, 2), (2, 3)])
def test_bank_source_loads_banks_saved_by_another_process_count(tmp_path, monkeypatch, replicated, saved, processes):
  ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
  saved_states = _save_sources(monkeypatch, ckpt, replicated, saved)
  if replicated:  # every process pushes the global stream: the same banks
    for state in saved_states[1:]:
      np.testing.assert_array_equal(state["pos/buffer"], saved_states[0]["pos/buffer"])
  held = collections.Counter()
  for index in range(processes):
    _as_process(monkeypatch, index, processes)
    host_state = ckpt._read_host_state(5)
    assert host_state.saved_process_count == saved
    assert host_state.same_process_count == (saved == processes)
    assert (not host_state) == (saved != processes)  # another count: nothing is "its own" file
    source = train_data.BankSource(_data(replicated, index, processes), _train_config())
    fresh = source.state_dict()
    source.load_state_dict(host_state)
    loaded = {k: v.copy() for k, v in source.state_dict().items()}
    own = saved_states[index] if index < saved else None
    for prefix in ("pos", "neg"):  # a process keeps its saved generator, a new one its own
      np.testing.assert_array_equal(loaded[f"{prefix}/rng_state"], (own or fresh)[f"{prefix}/rng_state"])
    if replicated or saved == processes:  # the saved banks as they were
      for key in ("pos/buffer", "pos/ptr", "pos/count", "neg/buffer", "neg/ptr", "neg/count"):
        np.testing.assert_array_equal(loaded[key], (own or saved_states[0])[key], err_msg=key)
    else:
      held.update(_bank_samples(loaded))
    if 2 % processes == 0:  # classes_per_step divides: the loaded banks serve the next step
      assert source.draw(5)["positives"].shape == (2 // processes, 2, 1, 1, 1)
  if held:  # dealt: every saved sample to at most one process; to one where there is room
    saved_held = sum((_bank_samples(state) for state in saved_states), collections.Counter())
    assert not held - saved_held
    if processes >= saved:
      assert held == saved_held


def _bank_samples(state: dict) -> collections.Counter:
  """(class, sample) of every sample a positive bank holds, with multiplicity."""
  count = state["pos/count"]
  return collections.Counter((c, float(v)) for c in range(len(count)) for v in state["pos/buffer"][c, :count[c]].ravel())


def test_host_state_files_across_process_counts(tmp_path, monkeypatch):
  ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
  for p in range(3):
    _as_process(monkeypatch, p, 3)
    ckpt._write_host_state(4, {"x": np.full(2, p)})
  _as_process(monkeypatch, 1, 3)  # the same count: this process's own file, without metadata
  same = ckpt._read_host_state(4)
  assert same.same_process_count and same.keys() == {"x"} and same["x"].tolist() == [1, 1]
  _as_process(monkeypatch, 0, 2)  # another count: every saved file, on demand
  other = ckpt._read_host_state(4)
  assert other == {} and other.saved_process_count == 3
  assert [other.read(p)["x"][0] for p in range(3)] == [0, 1, 2]
  with pytest.raises(ValueError, match="saved by 3 processes, there is no process 3"):
    other.read(3)
  # Files written before the count was recorded: counted.
  (tmp_path / "host_state" / "7").mkdir()
  for p in range(2):
    np.savez(tmp_path / "host_state" / "7" / f"process_{p}.npz", x=np.full(2, p))
  assert ckpt._read_host_state(7).saved_process_count == 2
  # A missing file of another process: an error naming it, when another count must read it.
  (tmp_path / "host_state" / "4" / "process_2.npz").unlink()
  with pytest.raises(checkpointing.CheckpointError, match=r"saved by 3 processes but lacks .*process_2\.npz"):
    ckpt._read_host_state(4)
  _as_process(monkeypatch, 0, 1)
  (tmp_path / "host_state" / "7" / "process_0.npz").unlink()
  with pytest.raises(checkpointing.CheckpointError, match=r"found only processes \[1\]"):
    ckpt._read_host_state(7)


def test_pruning_drops_the_files_of_processes_a_resumed_run_lacks(tmp_path, monkeypatch):
  ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
  for p in range(3):  # step 2 saved by 3 processes, then resumed by 2 that saved step 6
    _as_process(monkeypatch, p, 3)
    ckpt._write_host_state(2, {"x": np.zeros(1)})
  monkeypatch.setattr(ckpt.manager, "all_steps", lambda: [6])
  _as_process(monkeypatch, 1, 2)
  ckpt._prune_host_state()
  assert sorted(f.name for f in (tmp_path / "host_state" / "2").iterdir()) == ["process_0.npz", "process_2.npz"]
  _as_process(monkeypatch, 0, 2)  # process 0 also drops the file of process 2, which no longer runs
  ckpt._prune_host_state()
  assert not (tmp_path / "host_state" / "2").exists()


def test_banks_that_do_not_fit_the_run_are_a_checkpoint_error(tmp_path, monkeypatch):
  from drifting_jax.train import run as run_lib  # (imports clu's writers, and with them TensorFlow)
  _as_process(monkeypatch, 0, 1)
  saved = train_data.BankSource(_data(True, 0, 1), _train_config())
  saved.draw(0)
  smaller = _train_config()
  smaller.positive_bank_size = 3

  class Saved:  # a checkpoint of step 5 holding `saved`'s banks
    directory = tmp_path

    def latest_step(self):
      return 5

    def restore(self, state, with_host_state):
      return 5, state, checkpointing.HostState(saved.state_dict(), step=5, saved_process_count=1, reader=None)

  run = run_lib.Run(Saved(), None, name="generator", loss_name="loss", hint="")
  try:
    with pytest.raises(checkpointing.CheckpointError, match=r"step 5 .* does not fit this run: .*slots"):
      run.restore_or_init({}, None, init_from="", kind="gen",
                          load_host_state=train_data.BankSource(_data(True, 0, 1), smaller).load_state_dict)
  finally:
    run.guard.restore_handlers()
