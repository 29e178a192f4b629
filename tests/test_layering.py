"""The package's layering rules (scripts/import_graph.py: LAYERS, FUNCTION_LEVEL_IMPORTS), enforced."""

from __future__ import annotations

import pathlib
import shutil

from scripts import import_graph

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_package_keeps_its_layering_rules():
  problems = import_graph.rule_violations(ROOT)
  assert not problems, "layering rules broken:\n" + "\n".join(problems)


def test_every_part_of_the_package_has_a_rule():
  parts = {import_graph._part(m) for m in import_graph.module_files(ROOT)}
  assert parts == set(import_graph.LAYERS)  # the package's __init__ included
  for allowed in import_graph.LAYERS.values():
    assert set(allowed) <= set(import_graph.LAYERS)


def _copy_package(tmp_path: pathlib.Path) -> pathlib.Path:
  shutil.copytree(ROOT / import_graph.PACKAGE, tmp_path / import_graph.PACKAGE,
                  ignore=shutil.ignore_patterns("__pycache__"))
  return tmp_path


def test_a_broken_rule_fails_with_the_offending_import_named(tmp_path):
  root = _copy_package(tmp_path)
  # Evaluation importing the trainer, the loss library importing the package, a cycle,
  # and a function-level import of a light dependency.
  evaluation = root / "drifting_jax/eval/evaluation.py"
  evaluation.write_text(evaluation.read_text() + "\nfrom drifting_jax.train import optim  # noqa\n")
  kernels = root / "drifting_jax/losses/kernels.py"
  kernels.write_text(kernels.read_text() + "\nfrom drifting_jax import errors  # noqa\n")
  optim_file = root / "drifting_jax/train/optim.py"
  optim_file.write_text(optim_file.read_text() + "\n\ndef _late():\n  import numpy\n  return numpy\n")
  models_init = root / "drifting_jax/errors.py"
  models_init.write_text(models_init.read_text() + "\nfrom drifting_jax import partitioning  # noqa\n")
  problems = "\n".join(import_graph.rule_violations(root))
  assert "drifting_jax.eval.evaluation imports drifting_jax.train.optim; eval may import only" in problems
  assert "drifting_jax.losses.kernels imports drifting_jax.errors; losses may import only nothing" in problems
  assert "optim.py:" in problems and "function _late imports numpy" in problems
  assert "import cycle: drifting_jax.errors <-> drifting_jax.partitioning" in problems
