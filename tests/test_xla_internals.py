"""The private and undocumented surfaces the compile reports rely on (scale/xla_internals.py) still work.

`self_check` exercises each on small programs compiled on the CPU (the 8 host
devices conftest.py forces): a test here fails with its sentences, which name the
surface, the installed and the checked versions and what broke, when an upgrade of
jax, jaxlib or libtpu breaks one. The other tests check that a breakage is reported
so, and that no other module of drifting_jax/scale/ uses such a surface itself.
"""

import ast
import pathlib
import re
import subprocess
import sys
import types
import warnings

import pytest

from drifting_jax.scale import xla_internals

SCALE = pathlib.Path(xla_internals.__file__).parent
ROOT = SCALE.parent.parent

# The checks of the CPU program: never skipped under conftest.py's 8 devices.
CPU_KEYS = {"optimized_hlo_module", "hlo_module_cost_analysis", "instruction_costs", "cost_analysis_keys",
            "memory_analysis_fields",
            "hlo_text.collectives", "hlo_text.metadata", "hlo_text.shapes", "hlo_text.custom_calls",
            "hlo_module_from_text", "hlo_text.async_collectives", "hlo_text.chains", "hlo_text.library_calls",
            "hlo_cost_of_custom_calls", "xla_gpu_enable_triton_gemm"}


def test_the_internals_work_with_the_installed_versions():
  results = xla_internals.checks()
  problems = [r.detail for r in results if r.status == "problem"]
  if problems:
    pytest.fail("\n".join(problems))
  ok = {r.key for r in results if r.status == "ok"}
  assert CPU_KEYS <= ok, {r.key: r.detail for r in results if r.key in CPU_KEYS - ok}
  assert set(xla_internals.INTERNALS) == {r.key for r in results}  # every surface has a check, or says why not
  drift = xla_internals.version_drift()
  if drift:  # not a failure: the checks above are what says whether the surfaces still work
    warnings.warn(f"installed versions differ from those the compile reports were checked against: {drift}")


def test_the_checked_versions_are_the_pinned_ones():
  pins = dict(re.findall(r"^([\w\-]+)==([\w.]+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE))
  for package in ("jax", "jaxlib", "libtpu"):
    assert xla_internals.CHECKED_VERSIONS[package] == pins[package], package


def test_version_drift_names_installed_packages_at_other_versions(monkeypatch):
  installed = {"jax": "0.11.2", "jaxlib": "0.10.2", "libtpu": "0.0.52", "jax-cuda12-plugin": None}
  monkeypatch.setattr(xla_internals, "installed_version", installed.get)
  assert xla_internals.version_drift() == {"jax": {"installed": "0.11.2", "checked": "0.10.2"}}


def test_a_broken_private_function_is_named_with_both_versions(monkeypatch):
  """As if a jaxlib upgrade had removed `hlo_module_cost_analysis` from the private `_jax`."""
  monkeypatch.setattr(xla_internals, "_jaxlib", types.SimpleNamespace())
  later = {"jax": "0.11.2", "jaxlib": "0.11.2"}
  monkeypatch.setattr(xla_internals, "installed_version", later.get)
  name = xla_internals.INTERNALS["hlo_module_cost_analysis"].name
  problems = [p for p in xla_internals.self_check() if p.startswith(name)]
  assert problems, "a missing hlo_module_cost_analysis went unreported"
  for p in problems:
    assert "Installed: jax 0.11.2, jaxlib 0.11.2; checked against: jax 0.10.2, jaxlib 0.10.2." in p, p
    assert "analysis.gpu_cost" in p and "xla_internals.py" in p and "\n" not in p, p


def test_an_unexpected_hlo_text_format_is_named(monkeypatch):
  """As if XLA printed shapes another way: the collectives' bytes can no longer be read."""
  real = xla_internals._program_text
  as_tensors = lambda text: re.sub(r"\b([a-z]+\d*)\[([0-9,]*)\](\{[^}]*\})?",  # noqa: E731
                                   lambda m: f"tensor<{m.group(2).replace(',', 'x')}x{m.group(1)}>", text)
  monkeypatch.setattr(xla_internals, "_program_text", lambda compiled: as_tensors(real(compiled)))
  problems = xla_internals.self_check()
  collectives = [p for p in problems if p.startswith("the optimized HLO text's collective lines")]
  shapes = [p for p in problems if p.startswith("array shapes and instruction lines in HLO text")]
  assert collectives and shapes, problems
  assert "analysis.collectives" in collectives[0] and "tensor<" in collectives[0]
  assert "checked against: jaxlib 0.10.2, libtpu 0.0.52" in collectives[0]


def test_a_printer_that_writes_async_collectives_otherwise_is_named(monkeypatch):
  """As if the installed XLA printed async all-gathers in a generic async form."""
  real = xla_internals._parse_hlo_module

  def parse(text):
    module = real(text)
    printed = module.to_string().replace("all-gather-start(", "async-start(")
    return types.SimpleNamespace(to_string=lambda: printed)

  monkeypatch.setattr(xla_internals, "_parse_hlo_module", parse)
  problems = [p for p in xla_internals.self_check() if p.startswith("async collectives in HLO text")]
  assert len(problems) == 1 and "as the installed XLA prints it" in problems[0], problems


# What only xla_internals may use: private modules and names of jax, jaxlib and the
# plugins, the private or undocumented functions it wraps, and the HLO text and
# option names it parses or passes.
_PRIVATE_PACKAGES = ("jax", "jaxlib", "libtpu", "jax_cuda12_plugin", "jax_plugins")
_WRAPPED_CALLS = {"get_topology_desc", "hlo_modules", "hlo_module_cost_analysis", "runtime_executable",
                  "hlo_module_from_text"}
_FORMAT_STRINGS = ("custom_call_target", "channel_id", "chain_id", "op_name=", "lhs_contracting_dimensions",
                   "dim_labels", "TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD", "xla_gpu_")


def _private_uses(path: pathlib.Path) -> list[str]:
  tree = ast.parse(path.read_text())
  docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
      names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
      for module in modules:
        parts = module.split(".")
        if parts[0] in _PRIVATE_PACKAGES and (any(p.startswith("_") for p in parts)
                                              or any(n.startswith("_") for n in names)):
          found.append(f"line {node.lineno}: imports {module} {names}")
    elif isinstance(node, ast.Attribute) and node.attr in _WRAPPED_CALLS:
      found.append(f"line {node.lineno}: .{node.attr}")
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
      found += [f"line {node.lineno}: {s!r}" for s in _FORMAT_STRINGS if s in node.value]
  return found


def test_no_other_scale_module_uses_private_internals():
  offenders = {path.name: uses for path in sorted(SCALE.glob("*.py"))
               if path.name != "xla_internals.py" and (uses := _private_uses(path))}
  assert not offenders, f"move these into drifting_jax/scale/xla_internals.py (and register them): {offenders}"


def test_the_scan_finds_what_it_looks_for(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text('"""Docstrings may name custom_call_target."""\n'
                    "from jax._src.lib import _jax\n"
                    "from jax_cuda12_plugin import _versions\n"
                    "def f(compiled):\n"
                    "  return compiled.runtime_executable(), 'custom_call_target=\"x\"'\n")
  uses = _private_uses(sample)
  assert len(uses) == 4 and not any("Docstrings" in u for u in uses), uses


@pytest.mark.slow
def test_libtpu_internals_work_with_the_installed_libtpu():
  """A small libtpu compile (a psum and all-gather over a v5e:2x2), in a process of its own
  so that libtpu is never loaded into the test's."""
  pytest.importorskip("libtpu", reason="the compile mode's TPU targets need libtpu (requirements.txt)")
  proc = subprocess.run([sys.executable, "-m", "drifting_jax.scale.xla_internals", "--tpu"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  problems = [line for line in proc.stdout.splitlines() if line.startswith("problem")]
  if proc.returncode or problems:
    pytest.fail("\n".join(problems) or proc.stderr[-3000:])
  for key in ("tpu_topology_desc", "libtpu_environment"):
    assert re.search(rf"^ok\s+{re.escape(key)}$", proc.stdout, re.MULTILINE), proc.stdout
