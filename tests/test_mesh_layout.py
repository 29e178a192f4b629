"""How `partitioning.device_grid` lays devices out: plain on CPU, topology-aware on TPU and
GPU, and never a silent fallback (fake device lists stand in for slices we do not have)."""

import dataclasses
import logging

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from drifting_jax import errors, partitioning


@dataclasses.dataclass(eq=False)
class FakeDevice:
  """The attributes mesh_utils reads of a jax device."""
  id: int
  platform: str = "tpu"
  device_kind: str = "TPU v6 lite"
  coords: tuple | None = (0, 0, 0)
  core_on_chip: int = 0
  process_index: int = 0
  slice_index: int = 0


def tpu_slice(x: int, y: int, z: int = 1, kind: str = "TPU v6 lite", cores: int = 1) -> list[FakeDevice]:
  """A whole slice of x*y*z chips, `cores` devices each, in jax's x-minor order."""
  chips = [(i, j, k) for k in range(z) for j in range(y) for i in range(x)]
  return [FakeDevice(id=n, device_kind=kind, coords=chip, core_on_chip=core)
          for n, (chip, core) in enumerate((chip, core) for chip in chips for core in range(cores))]


def gpus(n: int) -> list[FakeDevice]:
  return [FakeDevice(id=i, platform="gpu", device_kind="NVIDIA H100 80GB HBM3", coords=None) for i in range(n)]


def logged(caplog) -> list[str]:
  """What was logged through absl (where partitioning logs), or at WARNING and above anywhere;
  jax's own debug lines (backend start-up) are not ours."""
  return [r.getMessage() for r in caplog.records if r.name == "absl" or r.levelno >= logging.WARNING]


def ids(grid: np.ndarray) -> list[list[int]]:
  return [[d.id for d in row] for row in grid]


def test_cpu_devices_are_a_plain_grid_and_log_nothing(monkeypatch, caplog):
  calls = []
  monkeypatch.setattr(mesh_utils, "create_device_mesh", lambda *a, **k: calls.append(a))
  devices = [FakeDevice(id=i, platform="cpu", device_kind="cpu", coords=None) for i in range(8)]
  with caplog.at_level(logging.DEBUG):
    grid = partitioning.device_grid(4, 2, devices)
  assert ids(grid) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert all(a is b for a, b in zip(grid.flat, devices))
  assert calls == [] and logged(caplog) == []


def test_make_mesh_on_the_real_cpu_devices_is_still_data_4_x_fsdp_2(caplog):
  with caplog.at_level(logging.DEBUG):
    mesh = partitioning.make_mesh(data=-1, fsdp=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  assert list(mesh.devices.flat) == jax.devices()
  assert logged(caplog) == []
  # The count checks before any layout keep their messages.
  with pytest.raises(errors.UsageError, match="fsdp=3 must divide the device count 8"):
    partitioning.make_mesh(data=-1, fsdp=3)
  with pytest.raises(ValueError, match=r"data=3 x fsdp=2 != 8 devices"):
    partitioning.make_mesh(data=3, fsdp=2)


def test_a_tpu_slice_mesh_utils_cannot_lay_out_is_an_error_naming_the_cause():
  """Six chips of a 4x4 slice are no cuboid: mesh_utils (unpatched) refuses them whatever the split."""
  devices = tpu_slice(4, 4)[:6]
  with pytest.raises(errors.UsageError) as caught:
    partitioning.device_grid(3, 2, devices)
  message = str(caught.value)
  assert "\n" not in message
  for words in ("data=3 x fsdp=2", "6 tpu devices", "TPU v6 lite", "chips spanning 4x2x1",
                "6 chips do not fill that box", "AssertionError", "pass all the devices of one slice"):
    assert words in message, (words, message)


@pytest.mark.parametrize("devices", [tpu_slice(2, 2), gpus(4)], ids=["tpu", "gpu"])
def test_a_refused_layout_carries_the_underlying_error_and_the_splits_that_fit(monkeypatch, devices):
  def refuse_fsdp_2(shape, devices, **kwargs):
    if shape[1] == 2:
      raise ValueError("ICI link 3 is down")
    return np.asarray(devices, dtype=object).reshape(shape)
  monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse_fsdp_2)
  with pytest.raises(errors.UsageError) as caught:
    partitioning.device_grid(2, 2, devices)
  message = str(caught.value)
  platform, kind = devices[0].platform, devices[0].device_kind
  for words in ("data=2 x fsdp=2", f"4 {platform} devices", kind, "mesh_utils.create_device_mesh raised ValueError: "
                "ICI link 3 is down", "set mesh.fsdp to a split this topology allows: one of 1, 4"):
    assert words in message, (words, message)


@pytest.mark.parametrize("devices", [tpu_slice(2, 2), gpus(4)], ids=["tpu", "gpu"])
def test_a_layout_mesh_utils_makes_is_used_as_returned(monkeypatch, caplog, devices):
  known = np.asarray(devices[::-1], dtype=object).reshape(2, 2)
  calls = []
  def lay_out(shape, devices, **kwargs):
    calls.append((tuple(shape), list(devices)))
    return known
  monkeypatch.setattr(mesh_utils, "create_device_mesh", lay_out)
  with caplog.at_level(logging.DEBUG):
    grid = partitioning.device_grid(2, 2, devices)
  assert grid is known and calls == [((2, 2), devices)] and logged(caplog) == []


def test_mixed_platforms_are_an_error():
  devices = tpu_slice(2, 1) + [FakeDevice(id=i, platform="cpu", device_kind="cpu", coords=None) for i in (8, 9)]
  with pytest.raises(errors.UsageError, match="one platform, got cpu, tpu"):
    partitioning.device_grid(2, 2, devices)


def test_an_fsdp_along_the_torus_axes_is_laid_out_without_a_word(caplog):
  """4x4 v6e chips, fsdp=4: mesh_utils (unpatched) gives each fsdp group a whole ring of chips."""
  with caplog.at_level(logging.DEBUG):
    grid = partitioning.device_grid(4, 4, tpu_slice(4, 4))
  for row in grid:
    assert len({d.coords[1] for d in row}) == 1 and sorted(d.coords[0] for d in row) == [0, 1, 2, 3]
  assert logged(caplog) == []


def test_an_fsdp_across_the_torus_axes_splits_one_with_a_warning_saying_what_is_lost(caplog):
  """4x4 v6e chips, fsdp=2: no subset of the physical axes (4, 4, 1) has 2 chips, so an axis is
  split (still one ICI hop per pair), and the log says so and which sizes fit."""
  devices = tpu_slice(4, 4)
  with caplog.at_level(logging.WARNING):
    grid = partitioning.device_grid(8, 2, devices)
  assert grid.shape == (8, 2) and sorted(d.id for d in grid.flat) == list(range(16))
  for a, b in grid:
    assert sum(abs(p - q) for p, q in zip(a.coords, b.coords)) == 1  # neighbours on the torus
  [record] = caplog.records
  assert record.levelno == logging.WARNING and record.name == "absl"
  message = record.getMessage()
  for words in ("data=8 x fsdp=2", "16 tpu devices", "splitting a physical axis", "wraparound link",
                "values that follow the axes: 1, 4, 16"):
    assert words in message, (words, message)


@pytest.mark.parametrize("data,fsdp", [(4, 2), (1, 8), (8, 1)])
def test_tpu_v4_described_by_core_is_laid_out_by_chip(caplog, data, fsdp):
  """libtpu describes a v4 chip as two devices, which mesh_utils refuses: the chips are laid
  out by mesh_utils, and a chip's two cores sit side by side on fsdp (on data when fsdp=1)."""
  devices = tpu_slice(2, 2, kind="TPU v4", cores=2)
  with pytest.raises(AssertionError, match="one device per chip"):
    mesh_utils.create_device_mesh((data, fsdp), devices=devices)  # why the by-chip layout exists
  with caplog.at_level(logging.DEBUG):
    grid = partitioning.device_grid(data, fsdp, devices)
  assert grid.shape == (data, fsdp) and sorted(d.id for d in grid.flat) == list(range(8))
  pairs = grid.reshape(-1, 2) if fsdp > 1 else grid.T.reshape(-1, 2)
  for a, b in pairs:
    assert a.coords == b.coords and (a.core_on_chip, b.core_on_chip) == (0, 1)
  assert logged(caplog) == []
