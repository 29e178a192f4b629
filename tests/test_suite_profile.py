"""scripts/suite_profile: the compile-time profile of a test run, per test file."""
import json
import os
import pathlib
import subprocess
import sys

from scripts.suite_profile import report

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = """
import jax.numpy as jnp
x = jnp.arange(7.0)
float((x * 3.0).sum())
"""


def test_a_process_records_its_compiles_under_the_running_test(tmp_path, capsys):
  # Started as a test would start a process: the test's id is inherited through the
  # environment. JAX_PLATFORMS is set in the environment before jax's import, as the
  # hook must not import jax itself (the child would otherwise probe for a TPU).
  env = {**os.environ, "PYTHONPATH": f"{ROOT / 'scripts' / 'suite_profile'}{os.pathsep}{ROOT}",
         "SUITE_PROFILE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu",
         "PYTEST_CURRENT_TEST": "tests/test_made_up.py::test_x (call)"}
  subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, timeout=120)
  [path] = tmp_path.glob("*.jsonl")
  records = [json.loads(line) for line in path.read_text().splitlines()]
  compiles = [r for r in records if r.get("event") == report.COMPILE]
  # arange, multiply and the sum: each a compiled program of its own in an eager call.
  assert len(compiles) >= 3 and all(r["test"].startswith("tests/test_made_up.py::") for r in compiles)
  assert all(r["seconds"] > 0 and r["function"].startswith("jit(") for r in compiles)
  [exit_record] = [r for r in records if r.get("exit")]
  assert exit_record["cpu"] > 0 and exit_record["tensorflow"] is False

  sys.argv = ["report", str(tmp_path)]
  report.main()
  table = capsys.readouterr().out
  row = next(line for line in table.splitlines() if line.startswith("tests/test_made_up.py"))
  columns = row.split()
  assert int(columns[2]) == len(compiles)  # the compiles column
  assert columns[-2:] == ["1", "0"]  # one process started by the test, without TensorFlow


def test_without_the_variable_nothing_is_recorded(tmp_path):
  env = {**os.environ, "PYTHONPATH": f"{ROOT / 'scripts' / 'suite_profile'}{os.pathsep}{ROOT}",
         "JAX_PLATFORMS": "cpu"}
  env.pop("SUITE_PROFILE_DIR", None)
  subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, timeout=120, cwd=tmp_path)
  assert not list(tmp_path.glob("*.jsonl"))
