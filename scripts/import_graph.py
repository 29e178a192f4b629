r"""The import graph of drifting_jax, its cycles, the imports between two subpackages, and the layering rules.

    python -m scripts.import_graph [ROOT] [--from drifting_jax.eval --to drifting_jax.train]

The layering rules are data (`LAYERS`, `FUNCTION_LEVEL_IMPORTS`) and
`rule_violations` checks a tree against them; tests/test_layering.py fails the
suite on any violation, naming the offending import.

Reads the sources with `ast` (nothing is imported). Edges are import statements,
module-level or inside functions, and string constants that spell a module of the
package ("drifting_jax.x.y"): registrations resolved later by `importlib` hide a
dependency as well as a function-level import does. Prints the import statements
from one subpackage into another (both directions), the cycles between modules
(strongly connected components of more than one module) and the dependencies
between subpackages.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import re

PACKAGE = "drifting_jax"
_MODULE_PATH = re.compile(rf"{PACKAGE}(\.\w+)+")


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """{dotted module name: file} of every module of the package under `root`."""
  modules = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    modules[name.removesuffix(".__init__")] = path
  return modules


def _owner(target: str, modules: dict[str, pathlib.Path]) -> str | None:
  """The package module that `target` (a module or a name inside one) belongs to."""
  while target and target not in modules:
    target = target.rpartition(".")[0]
  return target or None


def _targets(node: ast.AST, modules: dict[str, pathlib.Path]) -> list[str]:
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if isinstance(node, ast.ImportFrom) and node.module:
    # `from a.b import c` imports module a.b.c when there is one, else a name of a.b.
    return [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
            for alias in node.names]
  if isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PATH.fullmatch(node.value):
    return [node.value]
  return []


def import_graph(root: pathlib.Path) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
  """(edges {module: modules it depends on}, import statements as (module, imported module, line))."""
  modules = module_files(root)
  edges: dict[str, set[str]] = {name: set() for name in modules}
  statements = []
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      for target in _targets(node, modules):
        owner = _owner(target, modules) if target.startswith(PACKAGE) else None
        if owner is None or owner == name:
          continue
        edges[name].add(owner)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          statements.append((name, owner, node.lineno))
  return edges, statements


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []
  for start in edges:
    if start in index:
      continue
    work = [(start, iter(sorted(edges[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, successors = work[-1]
      for successor in successors:
        if successor not in index:
          index[successor] = low[successor] = len(index)
          stack.append(successor)
          on_stack.add(successor)
          work.append((successor, iter(sorted(edges[successor]))))
          break
        if successor in on_stack:
          low[node] = min(low[node], index[successor])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          component = []
          while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
              break
          if len(component) > 1:
            components.append(sorted(component))
  return components


def subpackage(module: str) -> str:
  return ".".join(module.split(".")[:2])


# The layers: each top-level part of the package (subpackage or module) and the
# parts it may import. Everything else is a violation. Read upwards: errors and the
# loss library stand on nothing; models on errors; data, checkpoints and meshes on
# those; training and evaluation side by side on all of it (never on each other);
# the modes table, main, the demo and the benchmarks on top.
_BASE = ("errors", "config_defaults", "paths", "writers", "checkpointing", "partitioning", "data", "models")
LAYERS: dict[str, tuple[str, ...]] = {
    "drifting_jax": ("platforms",),  # the package's __init__: picks JAX's backends, nothing else
    "errors": (),
    "config_defaults": (),           # fills a config's missing fields from configs/default.py
    "losses": (),                    # pure JAX; reports bad values as ValueError (errors.as_usage_error)
    "paths": (),                     # local folders and bucket URLs (etils.epath), for every writer
    "writers": ("paths",),
    "host_memory": (),               # glibc settings the entry points apply before JAX starts
    "platforms": (),                 # which JAX backends start (the package's __init__ applies it)
    "partitioning": ("errors",),
    "checkpointing": ("errors", "paths"),
    "models": ("errors", "partitioning", "paths"),
    "data": ("errors", "config_defaults", "models", "paths"),    # the latent cache is built with the SD-VAE
    "eval": _BASE,
    "train": (*_BASE, "losses"),
    "scale": (*_BASE, "train", "eval", "losses"),  # TPU slices: compile the run's programs, report
    "modes": ("errors", "config_defaults", "data", "eval", "train", "scale"),
    "main": ("errors", "host_memory", "modes"),
    "demo": (*_BASE, "eval", "train", "losses", "host_memory"),
    "bench": (*_BASE, "eval", "train", "losses", "host_memory"),
}

# Third-party packages a function may import (heavy or optional: imported on first
# use so a job that does not need them does not pay for them). Any other import
# inside a function is a violation, package modules included.
FUNCTION_LEVEL_IMPORTS = ("tensorflow", "tensorflow_datasets", "huggingface_hub", "diffusers", "safetensors", "ott",
                          "torch", "matplotlib", "jax_cuda12_plugin")


def _part(module: str) -> str:
  return module.split(".")[1] if module.count(".") else module


def rule_violations(root: pathlib.Path) -> list[str]:
  """Every import of the tree under `root` that breaks LAYERS, FUNCTION_LEVEL_IMPORTS or makes a cycle."""
  problems = []
  modules = {name: path.relative_to(root) for name, path in module_files(root).items()}
  edges, statements = import_graph(root)
  for module, imported, line in statements:
    source, target = _part(module), _part(imported)
    if source not in LAYERS:
      problems.append(f"{modules[module]}: part {source!r} is not in LAYERS (scripts/import_graph.py)")
    elif source != target and target not in LAYERS[source]:
      problems.append(f"{modules[module]}:{line}: {module} imports {imported}; {source} may import only "
                      f"{', '.join(LAYERS[source]) or 'nothing of the package'}")
  for module, path in modules.items():
    tree = ast.parse((root / path).read_text())
    for function in ast.walk(tree):
      if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(function):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or "."] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
          if name.split(".")[0] not in FUNCTION_LEVEL_IMPORTS:
            problems.append(f"{path}:{node.lineno}: function {function.name} imports {name} (module level, "
                            f"or add it to FUNCTION_LEVEL_IMPORTS if it is a heavy optional dependency)")
  problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
  return sorted(set(problems))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("root", nargs="?", default=".", help="the folder holding drifting_jax/")
  parser.add_argument("--from", dest="source", default=f"{PACKAGE}.eval")
  parser.add_argument("--to", dest="target", default=f"{PACKAGE}.train")
  args = parser.parse_args()
  edges, statements = import_graph(pathlib.Path(args.root))
  for source, target in ((args.source, args.target), (args.target, args.source)):
    lines = sorted({(m, line) for m, imported, line in statements
                    if subpackage(m) == source and subpackage(imported) == target})
    print(f"import statements {source} -> {target}: {len(lines)}")
    for module, line in lines:
      print(f"  {module}:{line}")
  print("import cycles:", cycles(edges) or "none")
  between: dict[str, set[str]] = {}
  for module, imported in edges.items():
    for other in imported:
      if subpackage(module) != subpackage(other):
        between.setdefault(subpackage(module), set()).add(subpackage(other))
  both_ways = sorted({tuple(sorted((a, b))) for a in between for b in between[a] if a in between.get(b, ())})
  print("subpackages importing each other:", both_ways or "none")
  for package in sorted(between):
    print(f"  {package} -> {', '.join(sorted(between[package]))}")
  problems = rule_violations(pathlib.Path(args.root))
  print(f"layering rule violations: {len(problems)}")
  for problem in problems:
    print(f"  {problem}")


if __name__ == "__main__":
  main()
