"""Every private or undocumented surface of jax, jaxlib, libtpu and the CUDA plugin that the compile reports rely on.

`--mode=compile` (scale/compile_mode.py) reads compiled programs through things no
release promises to keep: a private jaxlib function (XLA's HLO cost analysis of a
module another backend optimized, also one instruction at a time for the breakdown
per component), the text format of optimized HLO (collective
lines, async -start tuples, libtpu's chained collectives, custom-call targets and the
cuBLAS/cuDNN calls' attributes, op_name metadata, array shapes, libtpu's per-kernel estimated cycles), keyword arguments
that `jax.experimental.topologies.get_topology_desc` hands to a PJRT plugin unchecked,
environment variables libtpu reads, a private module of the CUDA plugin, an XLA debug
option, the key names of the cost analysis and libtpu's cost-model quirks. An
upgrade of any of those packages can break them silently: a regular expression that
stops matching counts no collectives, it does not raise.

So they live here and only here (scale/analysis.py and scale/targets.py call into
this module), with `CHECKED_VERSIONS`, the versions they were written and checked
against, and `INTERNALS`, one entry per surface: the packages whose version it
depends on, what relies on it and how it is checked. `self_check()` exercises each on
real programs compiled on the CPU here (a jitted psum and all-gather over the host's
CPU devices, a LAPACK custom call; stored async-collective and cuBLAS/cuDNN modules
put through the installed XLA's HLO parser and printer and its cost analysis) and
returns one sentence per problem, naming the surface, the installed and the checked
versions and what broke; tests/test_xla_internals.py fails with those sentences.
What a CPU cannot exercise says so in `checks()` (status "skipped"): libtpu's output
needs `self_check(tpu=True)` (a two-second compile of a tiny program), the CUDA
plugin its installation, and libtpu's chained collectives and negative custom-call
costs appear only in large TPU programs (their formats are pinned by stored samples
in tests/test_scale.py). One registered surface is still read elsewhere: the text of
libtpu's refusals (out of HBM; a program over part of a v5e-256), matched by
scale/report_text.py and scale/compile_mode.py.

`python -m drifting_jax.scale.xla_internals [--tpu]` prints every check.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# The versions every surface below was written and checked against: requirements.txt's
# pins, and the CUDA plugin of docs/scaling.md ("GPU hosts, compiled without a GPU";
# not in requirements.txt, so not installed here).
CHECKED_VERSIONS = {
    "jax": "0.10.2",
    "jaxlib": "0.10.2",
    "libtpu": "0.0.52",
    "jax-cuda12-plugin": "0.10.2",
}

try:  # private: XLA's HLO cost analysis of a module another backend optimized (`hlo_module_cost_analysis`)
  from jax._src.lib import _jax as _jaxlib
  _JAXLIB_IMPORT_ERROR: Exception | None = None
except ImportError as _e:  # pragma: no cover  (moved in a later jax: GPU FLOPs from library calls only)
  _jaxlib = None
  _JAXLIB_IMPORT_ERROR = _e

try:  # undocumented: XLA's HLO parser, for self_check's round trips of stored modules
  from jaxlib import _hlo
  _HLO_IMPORT_ERROR: Exception | None = None
except ImportError as _e:  # pragma: no cover
  _hlo = None
  _HLO_IMPORT_ERROR = _e


@dataclasses.dataclass(frozen=True)
class Internal:
  """One private or undocumented surface: what it is, whose version it depends on, who relies on it."""
  name: str                   # how a problem names it
  packages: tuple[str, ...]   # the packages (keys of CHECKED_VERSIONS) whose version it depends on
  used_by: str                # what in drifting_jax relies on it
  checked_by: str             # how `checks()` exercises it


INTERNALS: dict[str, Internal] = {
    "hlo_module_cost_analysis": Internal(
        "jaxlib's private `jax._src.lib._jax.hlo_module_cost_analysis(cpu_client, module)`", ("jax", "jaxlib"),
        "the GPU reports' FLOPs and bytes (analysis.gpu_cost)",
        "run on the CPU program's optimized module and compared with the CPU compiler's own cost analysis"),
    "hlo_cost_of_custom_calls": Internal(
        "XLA's HLO cost analysis costing each custom call -1 FLOP", ("jaxlib",),
        "analysis.gpu_cost, which adds 1 FLOP and 1 byte back per custom call",
        "the cost analysis of a stored module of 5 cuBLAS/cuDNN calls"),
    "optimized_hlo_module": Internal(
        "the optimized module behind a compiled program (`Compiled.runtime_executable().hlo_modules()`)",
        ("jax", "jaxlib"), "analysis.gpu_cost", "taken from the CPU program"),
    "hlo_module_from_text": Internal(
        "jaxlib's HLO parser (`jaxlib._hlo.hlo_module_from_text`)", ("jaxlib",),
        "the breakdown's per-instruction modules (instruction_costs); self_check's round trips of stored modules",
        "parses the stored modules"),
    "instruction_costs": Internal(
        "XLA's HLO cost analysis of one instruction at a time: an optimized module's instruction cut out into a "
        "module of its own (its operands as parameters, the computations it calls), parsed and costed by the CPU "
        "client", ("jaxlib", "libtpu"), "the compile report's breakdown per component (breakdown.instructions)",
        "the CPU program's instructions, costed one by one, add up to the cost analysis of its whole module"),
    "hlo_text.estimated_cycles": Internal(
        "libtpu's per-kernel cost-model estimate in HLO text (`\"estimated_cycles\":\"N\"` in a kernel's "
        "backend_config)", ("libtpu",), "the breakdown's time view on TPU (breakdown.breakdown)",
        "self_check(tpu=True): the small libtpu program's kernels carry it"),
    "hlo_text.mosaic_cost_estimate": Internal(
        "a Pallas kernel's declared cost in its Mosaic custom call's backend_config "
        "(`\"cost_estimate\":{\"flops\":\"N\"`), which libtpu adds to the program's FLOPs", ("jax", "libtpu"),
        "the breakdown's FLOPs of Pallas kernels (breakdown.instructions), which XLA's cost analysis cannot see",
        "self_check(tpu=True): a small kernel's declared FLOPs are in its call's line and in libtpu's total"),
    "hlo_text.collectives": Internal(
        "the optimized HLO text's collective lines (`%x = <shape> all-reduce(...`)", ("jaxlib", "libtpu"),
        "the reports' collectives (analysis.collectives)", "the CPU program's psum and all-gather"),
    "hlo_text.async_collectives": Internal(
        "async collectives in HLO text (`all-gather-start` with an (operand, result, ...) tuple, then `-done`)",
        ("jaxlib", "libtpu"), "analysis.collectives (TPU and GPU programs overlap their collectives)",
        "a stored module of libtpu's form through the installed XLA's parser and printer"),
    "hlo_text.chains": Internal(
        "libtpu's chained collective fusions (copies sharing `channel_id=` and `frontend_attributes={chain_id=...}`)",
        ("libtpu",), "analysis.collectives (one collective, not one per copy: v5e programs)",
        "the printer keeps both on the line (stored module); libtpu's emission only in tests/test_scale.py's "
        "stored v5e lines"),
    "hlo_text.metadata": Internal(
        "op_name metadata in HLO text (`metadata={op_name=\"jit(f)/...\"}`)", ("jax", "jaxlib"),
        "analysis.collective_sources", "the CPU program's collectives name psum and all_gather"),
    "hlo_text.shapes": Internal(
        "array shapes and instruction lines in HLO text (`%name = bf16[8,128]{1,0} op(`)", ("jaxlib", "libtpu"),
        "the bytes of collectives and library calls (analysis.collectives, analysis.library_calls)",
        "every instruction line of the CPU program parses; its parameters' bytes"),
    "hlo_text.custom_calls": Internal(
        "custom calls in HLO text (`custom-call(...), custom_call_target=\"...\"`)",
        ("jaxlib", "libtpu", "jax-cuda12-plugin"), "analysis.custom_call_counts, analysis.library_calls",
        "the CPU program's LAPACK call"),
    "hlo_text.library_calls": Internal(
        "cuBLAS/cuDNN custom calls in HLO text (targets `__cublas$...`/`__cudnn$conv...`, "
        "`lhs_contracting_dimensions` in backend_config, `dim_labels=`, `window={size=.. stride=.. pad=..}`, a "
        "trailing s8/u8 scratch buffer)",
        ("jaxlib", "jax-cuda12-plugin"), "the GPU reports' library-call FLOPs and bytes (analysis.library_calls)",
        "a stored module of the GPU compiler's form through the installed XLA's parser and printer"),
    "cost_analysis_keys": Internal(
        "the cost analysis's key names (`flops`, `bytes accessed`, per-operand `...{}` keys)", ("jaxlib", "libtpu"),
        "every report's FLOPs and bytes (analysis.analyze, analysis.gpu_cost)", "the CPU program's cost analysis"),
    "memory_analysis_fields": Internal(
        "`Compiled.memory_analysis()`'s fields (`argument_size_in_bytes`, ...)", ("jaxlib", "libtpu"),
        "every report's memory and fit verdict (analysis.memory)", "the CPU program's memory analysis"),
    "libtpu_negative_cost_calls": Internal(
        "libtpu costing each ConcatBitcast/ZeroCrop custom call -1 s in `optimal_seconds`", ("libtpu",),
        "analysis.step_time_estimate's correction",
        "not exercised: only large TPU programs have such calls (docs/scaling.md's v6e reports)"),
    "tpu_topology_desc": Internal(
        "libtpu's options of `get_topology_desc(platform=\"tpu\", topology_name=..., chips_per_host_bounds=..., "
        "num_slices=...)`", ("jax", "libtpu"), "TPU targets' devices (targets.Target.devices)",
        "self_check(tpu=True): a v5e:2x2 slice described and a psum and all-gather compiled for it"),
    "libtpu_environment": Internal(
        "the environment variables libtpu reads to describe a slice with no TPU (TPU_SKIP_MDS_QUERY, "
        "ALLOW_MULTIPLE_LIBTPU_LOAD)", ("libtpu",),
        "targets.compile_environment", "self_check(tpu=True), which describes a slice with them set"),
    "libtpu_error_messages": Internal(
        "libtpu's refusals: out of HBM (`RESOURCE_EXHAUSTED: ... memory required for HLO temporaries (25.00G) "
        "exceeds available HBM (15.75G)`, or `Used 40.1G of 31.25G hbm`), and of a program over part of a v5e-256 "
        "(`On platforms with limited ICI routing ...`)", ("libtpu",),
        "the verdicts of programs libtpu refuses (report_text.out_of_memory_verdict; compile_mode's "
        "_LIMITED_ROUTING)",
        "not by self_check (the patterns are report_text's and compile_mode's): tests/test_compile_mode.py's e2e "
        "tests of a config that cannot fit and of a v5e-256's per-host program"),
    "cuda_topology_desc": Internal(
        "the CUDA plugin's options of `get_topology_desc(platform=\"cuda\", target_config=<GpuTargetConfigProto "
        "text>, topology=\"1x<hosts>x<GPUs>\")`", ("jax", "jax-cuda12-plugin"),
        "GPU targets' devices (targets.gpu_devices, targets.gpu_target_config)",
        "not by self_check (the config is targets.gpu_target_config's): tests/test_compile_gpu.py compiles for "
        "h100x8 when the plugin is installed"),
    "cuda_plugin_versions": Internal(
        "the CUDA plugin's private `jax_cuda12_plugin._versions` (`cuda_runtime_build_version`, "
        "`cudnn_build_version`)", ("jax-cuda12-plugin",), "targets.gpu_target_config's CUDA and cuDNN versions",
        "called when the plugin is installed"),
    "xla_gpu_enable_triton_gemm": Internal(
        "XLA's debug option `xla_gpu_enable_triton_gemm` as a compile option", ("jaxlib", "jax-cuda12-plugin"),
        "GPU compiles (targets.GPU_COMPILER_OPTIONS)",
        "passed to a CPU compile (XLA's debug options are one set for every backend)"),
}


# --------------------------------------------------------------------------- versions


def installed_version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def version_drift() -> dict[str, dict[str, str]]:
  """{package: {"installed", "checked"}} for each installed package of CHECKED_VERSIONS at another version.

  Empty when everything installed is what the surfaces were checked against. A
  package that is not installed (the CUDA plugin, usually) is not drift: the checks
  that need it are skipped and say so."""
  out = {}
  for package, checked in CHECKED_VERSIONS.items():
    installed = installed_version(package)
    if installed is not None and installed != checked:
      out[package] = {"installed": installed, "checked": checked}
  return out


def _versions_text(packages: tuple[str, ...], versions: Callable[[str], str | None]) -> str:
  return ", ".join(f"{p} {versions(p) or '(not installed)'}" for p in packages)


def problem(key: str, what_broke: str) -> str:
  """One sentence: which surface broke, how, with which versions, and where to fix it."""
  internal = INTERNALS[key]
  return (f"{internal.name}, relied on by {internal.used_by}: {what_broke}. Installed: "
          f"{_versions_text(internal.packages, installed_version)}; checked against: "
          f"{_versions_text(internal.packages, CHECKED_VERSIONS.get)}. Adapt drifting_jax/scale/xla_internals.py to "
          "the installed version (and update CHECKED_VERSIONS), or install the checked one.")


# --------------------------------------------------------------------------- HLO text

# HLO collective ops (async ones appear as -start/-done pairs; the -start carries the shape).
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
               "s4": 0.5, "u4": 0.5}
# An array shape: `bf16[8,128]` (the layout that follows, `{1,0}` or libtpu's `{1,0:T(8,128)(2,1)}`, is not read).
SHAPE = re.compile(r"\b(" + "|".join(map(re.escape, DTYPE_BYTES)) + r")\[([0-9,]*)\]")
# A collective's line: `= <shape or tuple of shapes> <op>[-start](`.
COLLECTIVE_LINE = re.compile(r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<op>" + "|".join(COLLECTIVES) +
                             r")(?P<start>-start)?\(")
CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
CHANNEL = re.compile(r"channel_id=(\d+)")
CHAIN = re.compile(r'chain_id="(\d+)"')
OP_NAME = re.compile(r'op_name="([^"]*)"')
# jax's op_name starts with the jitted function(s): `jit(train_step)/jvp()/...`.
JIT_PREFIX = re.compile(r"jit\([^)]*\)/")
# Any instruction line: `[ROOT] %name = <shape or tuple> opcode(`. A shape has no spaces
# but may hold parentheses (libtpu's tiled layouts, `u32[16]{0:T(128)S(1)}`); a tuple
# runs to the `)` that is followed by the opcode.
DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\(.*?\)|[^\s(][^\s]*)\s+"
                        r"(?P<op>[a-z][\w\-]*)\(")
ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
CONTRACTING = re.compile(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]')
DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
WINDOW = re.compile(r"window=\{([^}]*)\}")
_OPERAND_REF = re.compile(r"%?([\w.\-]+)\s*$")
# The printer's `/*index=5*/` before every fifth element of a long tuple or operand list
# (a combined all-reduce of many gradients): its "=" would end a shape's match.
COMMENT = re.compile(r"/\*.*?\*/")

# cuDNN convolution calls -> which of (result, operand 0, operand 1) is the convolution's
# input, kernel and output (the backward passes are convolutions too, with roles swapped).
CUDNN_CONV_ROLES = {
    "__cudnn$convForward": ("op0", "op1", "result"),
    "__cudnn$convBiasActivationForward": ("op0", "op1", "result"),
    "__cudnn$convBackwardInput": ("result", "op1", "op0"),
    "__cudnn$convBackwardFilter": ("op0", "result", "op1"),
}

CONCAT_BITCAST = "ConcatBitcast"
# Custom calls libtpu costs at -1 s each in optimal_seconds (ConcatBitcast: ours and the
# release's v6e steps; ZeroCrop: the release's small step, -8.996 s with 9 of them).
NEGATIVE_COST_CALLS = (CONCAT_BITCAST, "ZeroCrop")


def shape_bytes(shape_text: str) -> int:
  """Bytes of every array in a shape or tuple of shapes."""
  total = 0.0
  for dtype, dims in SHAPE.findall(shape_text):
    total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return int(total)


def tuple_elements(shape_text: str) -> list[str]:
  """The top-level elements of a tuple shape, "(a, (b, c))" -> ["a", "(b, c)"]; a non-tuple is its one element."""
  text = shape_text.strip()
  if not text.startswith("("):
    return [text]
  elements, depth, start = [], 0, 1
  for i, ch in enumerate(text):
    if ch in "([{":  # dims and layouts ("[8,128]", "{1,0:T(8,128)}") have commas too
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        elements.append(text[start:i])
        break
    elif ch == "," and depth == 1:
      elements.append(text[start:i])
      start = i + 1
  return [e.strip() for e in elements if e.strip()]


def collective_ops(hlo_text: str) -> Iterator[tuple[str, int, str]]:
  """(op, result bytes, op_name) of each collective of the program, once.

  libtpu (seen on v5e, not on v6e or v5p) splits one collective into a chain of async
  collective fusions, each holding a copy of the collective with the whole result's
  shape and the same `channel_id` and `chain_id`: a v5e-256 step's 175 such lines were
  37 all-gathers. Chained lines are keyed by (channel, chain); every other line is its
  own collective (a channel id alone is not unique: libtpu reuses it across its
  all-reduce-scatter computations).

  An async all-gather or collective-permute's -start has the shape (operands, results,
  [contexts]): only the results count, a tuple of them where XLA combined several
  collectives into one (its operands a tuple too).
  """
  seen = set()
  for index, line in enumerate(hlo_text.splitlines()):
    line = COMMENT.sub("", line)
    match = COLLECTIVE_LINE.search(line)
    if not match:
      continue
    op, shape = match.group("op"), match.group("shape")
    if match.group("start") and op in ("all-gather", "collective-permute") and shape.startswith("("):
      elements = tuple_elements(shape)
      nbytes = shape_bytes(elements[1] if len(elements) > 1 else elements[0])
    else:
      nbytes = shape_bytes(shape)
    channel, chain = CHANNEL.search(line), CHAIN.search(line)
    key = (op, "chain", channel.group(1), chain.group(1)) if channel and chain else ("line", index)
    if key in seen:
      continue
    seen.add(key)
    name = OP_NAME.search(line)
    yield op, nbytes, (name.group(1) if name else "")


def op_name_source(op_name: str) -> str:
  """An op_name without its `jit(...)/` prefixes: the function path and primitive."""
  return JIT_PREFIX.sub("", op_name)


def custom_call_targets(hlo_text: str) -> list[str]:
  """The target of each custom call of the program, in order."""
  return CUSTOM_CALL.findall(hlo_text)


def custom_call_target(line: str) -> str:
  found = CUSTOM_CALL.search(line)
  return found.group(1) if found else "?"


def definitions(hlo_text: str) -> Iterator[tuple[str, str, str, str]]:
  """(name, shape text, opcode, line) of each instruction line (the line without the printer's comments)."""
  for line in hlo_text.splitlines():
    line = COMMENT.sub("", line)
    match = DEFINITION.match(line)
    if match:
      yield match.group("name"), match.group("shape"), match.group("op"), line


def arrays(shape_text: str) -> list[tuple[str, list[int]]]:
  return [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in ARRAY.findall(shape_text)]


def array_bytes(dtype: str, dims: list[int]) -> float:
  return DTYPE_BYTES.get(dtype, 4) * math.prod(dims)


def operand_text(line: str, op: str) -> str:
  """The text between `op(` and its closing parenthesis."""
  start = line.index(op + "(") + len(op) + 1
  depth = 1
  for i in range(start, len(line)):
    depth += {"(": 1, ")": -1}.get(line[i], 0)
    if depth == 0:
      return line[start:i]
  return line[start:]


def operand_arrays(line: str, op: str, shapes: dict[str, str]) -> list[tuple[str, list[int]]]:
  """The (dtype, dims) of each operand of `op` on `line`: written inline, or the shape
  (`shapes`: name -> shape text) of the instruction it names; f32[] when neither."""
  operands = []
  for token in operand_text(line, op).split(","):
    ref = _OPERAND_REF.search(token.strip())
    inline = arrays(token)
    operands.append(inline[0] if inline else (arrays(shapes.get(ref.group(1), ""))[:1] or [("f32", [])])[0]
                    if ref else ("f32", []))
  return operands


def result_arrays(shape_text: str) -> list[tuple[str, list[int]]]:
  """A library call's results without its scratch buffer (a trailing 1-D s8/u8 tuple element)."""
  found = arrays(shape_text)
  if shape_text.startswith("(") and len(found) > 1 and found[-1][0] in ("s8", "u8") and len(found[-1][1]) == 1:
    found = found[:-1]
  return found


def gemm_contracting_dimensions(line: str) -> list[int] | None:
  """A cuBLAS call's lhs contracting dimensions (its backend_config), None if it names none."""
  contracting = CONTRACTING.search(line)
  if not contracting:
    return None
  return [int(d.strip().strip('"')) for d in contracting.group(1).split(",") if d.strip()]


def conv_dim_labels(line: str) -> tuple[str, str, str] | None:
  """A convolution's (input, kernel, output) dimension labels, e.g. ("b01f", "01io", "b01f")."""
  labels = DIM_LABELS.search(line)
  return (labels.group(1), labels.group(2), labels.group(3)) if labels else None


def conv_window(line: str) -> dict[str, list] | None:
  """A convolution's window per spatial dimension, e.g. `window={size=3x3 stride=2x2 pad=1_1x1_1}`
  -> {"size": [3, 3], "stride": [2, 2], "pad": [(1, 1), (1, 1)], "lhs_dilate": [1, 1],
  "rhs_dilate": [1, 1]} (absent fields at their defaults); None without a window."""
  found = WINDOW.search(line)
  if not found:
    return None
  fields = dict(part.split("=", 1) for part in found.group(1).split() if "=" in part)
  if "size" not in fields:
    return None
  size = [int(x) for x in fields["size"].split("x")]
  ints = lambda key: [int(x) for x in fields[key].split("x")] if key in fields else [1] * len(size)
  pads = ([tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields
          else [(0, 0)] * len(size))
  return {"size": size, "stride": ints("stride"), "pad": pads, "lhs_dilate": ints("lhs_dilate"),
          "rhs_dilate": ints("rhs_dilate")}


# --------------------------------------------------------------------------- compiled programs

# analysis.memory's parts -> the fields of `Compiled.memory_analysis()` (jaxlib's CompiledMemoryStats).
MEMORY_FIELDS = {
    "arguments": "argument_size_in_bytes",
    "outputs": "output_size_in_bytes",
    "aliased": "alias_size_in_bytes",
    "temporaries": "temp_size_in_bytes",
    "code": "generated_code_size_in_bytes",
}
# The cost analysis's totals; its other keys are per operand ("bytes accessed0{}",
# "bytes accessedout{}") or "utilization..." and are left out of totals by those marks.
COST_TOTALS = ("flops", "bytes accessed")
PER_OPERAND_MARK = "{"


def cost_numbers(compiled) -> dict[str, float]:
  """The compiler's cost analysis of a compiled program, numeric entries only ({} when it has none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return {k: float(v) for k, v in (cost or {}).items() if isinstance(v, (int, float, np.floating))}


def optimized_hlo_module(compiled):
  """The optimized HLO module behind a `jax.stages.Compiled` (jaxlib's HloModule).

  `runtime_executable()` is documented only as "an arbitrary object"; jaxlib's
  executables answer `hlo_modules()`."""
  return compiled.runtime_executable().hlo_modules()[0]


def hlo_module_cost_analysis(module) -> dict[str, float]:
  """XLA's generic HLO cost analysis of `module`, run by the CPU client; numeric entries only.

  jax 0.10.2 has no public way to run it on a module another backend optimized (the
  CUDA plugin's compile-only executable has no cost analysis): this is jaxlib's
  private `hlo_module_cost_analysis`. Raises if it is gone or fails."""
  if _jaxlib is None:
    raise RuntimeError(f"jax._src.lib._jax cannot be imported ({_JAXLIB_IMPORT_ERROR})")
  cost = _jaxlib.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  return {k: float(v) for k, v in cost.items() if isinstance(v, (int, float, np.floating))}


def cpu_hlo_cost_analysis(compiled) -> dict[str, float]:
  """`hlo_module_cost_analysis` of a compiled program's optimized module (a GPU program's, above all)."""
  return hlo_module_cost_analysis(optimized_hlo_module(compiled))


# --------------------------------------------------------------------------- one instruction at a time

# A computation's first line: `[ENTRY] %name (params...) -> result {` (shapes may hold
# parentheses: libtpu's layouts `{1,0:T(8,128)}`); no " = " before its parameter list.
_COMPUTATION_HEADER = re.compile(r"^\s*(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(\(.*)?\{\s*$")
# Attributes naming the computations an instruction calls (fusions, reductions, loops, async wrappers).
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
# Attributes that refer to instructions or frames outside a cut-out instruction's module.
_CONTROL_PREDECESSORS = re.compile(r",\s*control-predecessors=\{[^}]*\}")
_STACK_FRAME = re.compile(r"\s*stack_frame_id=\d+")
# libtpu's per-kernel cost-model estimate in each kernel's backend_config.
ESTIMATED_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
# A Pallas kernel's declared cost (`pl.CostEstimate`) in its Mosaic call's backend_config.
MOSAIC_COST_ESTIMATE = re.compile(r'"cost_estimate":\{"flops":"(\d+)"')
# Instructions that run no code of their own: control flow (its bodies' instructions are
# costed one by one, as XLA's cost analysis costs a loop body once), names for values.
_NOT_COSTED = ("parameter", "constant", "while", "call", "conditional")


def mosaic_declared_flops(line: str) -> float | None:
  """The FLOPs a Pallas kernel declared (`pl.CostEstimate`) from its custom call's line, if any."""
  found = MOSAIC_COST_ESTIMATE.search(line)
  return float(found.group(1)) if found else None


@dataclasses.dataclass(frozen=True)
class InstructionCost:
  """XLA's HLO cost analysis of one instruction of an optimized module (per device)."""
  computation: str
  name: str
  opcode: str
  shape: str                    # the result's shape text, with its layout
  operands: tuple[str, ...]     # the names of the instructions it reads
  operand_shapes: tuple[str, ...]  # their shapes' text, in the same order
  op_name: str                  # jax's op_name metadata ("" when none)
  flops: float
  bytes_accessed: float
  estimated_cycles: int | None  # libtpu's cost model's estimate for this kernel (TPU programs only)
  line: str


def computation_blocks(hlo_text: str) -> tuple[dict[str, str], str]:
  """{computation name: its text, header to closing brace}, and the entry computation's name."""
  blocks: dict[str, str] = {}
  entry, current, lines = "", None, []
  for line in hlo_text.splitlines():
    if current is None:
      header = _COMPUTATION_HEADER.match(line)
      if header and not line.lstrip().startswith("HloModule") and "=" not in line.split("(")[0]:
        current, lines = header.group("name"), [line]
        entry = current if header.group("entry") else entry
      continue
    lines.append(line)
    if line.strip() == "}":
      blocks[current] = "\n".join(lines)
      current = None
  return blocks, entry


_INSTRUCTION_START = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s")


def _instructions(block: str) -> Iterator[tuple[str, str, str, str]]:
  """`definitions` of a computation whose instructions may span lines: a Pallas/Mosaic
  kernel's custom call carries its `kernel_metadata` with newlines in its attributes;
  a line that starts no instruction continues the one before."""
  merged: list[str] = []
  for line in block.splitlines()[1:]:
    if merged and not _INSTRUCTION_START.match(line) and line.strip() != "}":
      merged[-1] += "\n" + line
    else:
      merged.append(line)
  for line in merged:
    match = DEFINITION.match(COMMENT.sub("", line.split("\n", 1)[0]))
    if match:
      yield match.group("name"), match.group("shape"), match.group("op"), COMMENT.sub("", line)


def _called(text: str) -> list[str]:
  names = _CALLED.findall(text)
  for group in _BRANCHES.findall(text):
    names += [b.strip().lstrip("%") for b in group.split(",") if b.strip()]
  return names


def _executed_computations(blocks: dict[str, str], entry: str) -> list[str]:
  """The entry and the computations its control flow runs (loop bodies and conditions,
  called computations, branches): those whose instructions are kernels. Fused and
  reduction computations are inside their instruction, not kernels of their own."""
  out, todo = [], [entry]
  while todo:
    name = todo.pop()
    if name in out or name not in blocks:
      continue
    out.append(name)
    for _, _, opcode, line in _instructions(blocks[name]):
      if opcode in ("while", "call", "conditional"):
        todo += _called(line)
  return out


def _callee_closure(names: list[str], blocks: dict[str, str]) -> list[str]:
  """`names` and every computation they call, callees before their callers."""
  order, seen, todo = [], set(), list(names)
  while todo:
    name = todo.pop()
    if name in seen or name not in blocks:
      continue
    seen.add(name)
    order.append(name)
    todo += _called(blocks[name])
  return order[::-1]


def instruction_module(line: str, opcode: str, shape: str, operand_shapes: list[str], blocks: dict[str, str],
                       then: tuple[str, str] | None = None) -> str:
  """One instruction of an optimized module as a module of its own: its operands become
  parameters of the same shapes (and layouts), the computations it calls come along.

  `then` = (line, result shape) of an instruction that reads this one's result only
  and becomes the root: an async `-done` after its `-start` (XLA's parser takes a
  `-done` of the async form only with its `-start` as operand)."""
  body = _STACK_FRAME.sub("", _CONTROL_PREDECESSORS.sub("", line))
  # The operand list in place (not the text's first match: `%f.2 = ... fusion(%f)` names its operand first).
  start = body.index(opcode + "(") + len(opcode) + 1
  body = (body[:start] + ", ".join(f"%p{i}" for i in range(len(operand_shapes)))
          + body[start + len(operand_text(body, opcode)):])
  body = re.sub(r"^\s*(ROOT\s+)?", "  ROOT " if then is None else "  ", body)
  if then is not None:
    body += "\n" + re.sub(r"^\s*(ROOT\s+)?", "  ROOT ", _STACK_FRAME.sub("", _CONTROL_PREDECESSORS.sub("", then[0])))
    shape = then[1]
  called = _called(line) + (_called(then[0]) if then else [])
  callees = "\n\n".join(_STACK_FRAME.sub("", blocks[name]) for name in _callee_closure(called, blocks))
  signature = ", ".join(f"p{i}: {s}" for i, s in enumerate(operand_shapes))
  params = "".join(f"  %p{i} = {s} parameter({i})\n" for i, s in enumerate(operand_shapes))
  return f"HloModule instruction\n\n{callees}\n\nENTRY %instruction ({signature}) -> {shape} {{\n{params}{body}\n}}\n"


def _operand_names(line: str, opcode: str) -> list[str]:
  refs = [_OPERAND_REF.search(token.strip()) for token in operand_text(line, opcode).split(",") if token.strip()]
  return [r.group(1) for r in refs if r]


def module_cost_analysis(hlo_text: str) -> dict[str, float]:
  """XLA's HLO cost analysis of a module given as text (any backend's optimized module)."""
  return hlo_module_cost_analysis(_parse_hlo_module(hlo_text))

def _instruction_cost(line: str, opcode: str, shape: str, operands: list[str], shapes: dict[str, str],
                      costed: dict[str, tuple[str, str, float, float]], blocks: dict[str, str]) -> dict[str, float]:
  """XLA's cost analysis of one instruction cut out of its module. An async `-done` of
  the generic form (libtpu's `slice-done` after `slice-start`) parses only after its
  `-start`: it is costed as the pair less the `-start`'s own cost."""
  try:
    return hlo_module_cost_analysis(_parse_hlo_module(
        instruction_module(line, opcode, shape, [shapes[n] for n in operands], blocks)))
  except Exception:
    start = costed.get(operands[0]) if opcode.endswith("-done") and len(operands) == 1 else None
    if start is None or not start[0].endswith("-start"):
      raise
  start_opcode, start_line, start_flops, start_bytes = start
  pair = hlo_module_cost_analysis(_parse_hlo_module(instruction_module(
      start_line, start_opcode, shapes[operands[0]], [shapes[n] for n in _operand_names(start_line, start_opcode)],
      blocks, then=(line, shape))))
  return {"flops": pair.get("flops", 0.0) - start_flops, "bytes accessed": pair.get("bytes accessed", 0.0) - start_bytes}


def instruction_costs(hlo_text: str) -> tuple[list[InstructionCost], list[str]]:
  """XLA's HLO cost analysis of every instruction that runs, one at a time, and the
  instructions it could not cost (one line each).

  The cost analysis of a module is a sum over its instructions (a loop body counted
  once), so these parts add up to it: each instruction is cut out into a module of
  its own (`instruction_module`) and costed by the CPU client's XLA
  (`hlo_module_cost_analysis`), whatever backend optimized it. Custom calls come back
  as XLA costs them, -1 FLOP and -1 byte ("unknown"); the caller decides what they
  cost."""
  blocks, entry = computation_blocks(hlo_text)
  costs, failures = [], []
  for computation in _executed_computations(blocks, entry):
    shapes: dict[str, str] = {}
    instructions: dict[str, tuple[str, str, float, float]] = {}  # name -> (opcode, line, FLOPs, bytes)
    for name, shape, opcode, line in _instructions(blocks[computation]):
      shapes[name] = shape
      if opcode in _NOT_COSTED:
        continue
      operands = _operand_names(line, opcode)
      try:
        cost = _instruction_cost(line, opcode, shape, operands, shapes, instructions, blocks)
      except Exception as e:  # noqa: BLE001  (one instruction the parser refuses does not stop the rest)
        failures.append(f"{computation}/{name} ({opcode}): {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        continue
      instructions[name] = (opcode, line, cost.get("flops", 0.0), cost.get("bytes accessed", 0.0))
      op_name = OP_NAME.search(line)
      cycles = ESTIMATED_CYCLES.search(line)
      costs.append(InstructionCost(computation, name, opcode, shape, tuple(operands),
                                   tuple(shapes[n] for n in operands), op_name.group(1) if op_name else "",
                                   cost.get("flops", 0.0), cost.get("bytes accessed", 0.0),
                                   int(cycles.group(1)) if cycles else None, line))
  return costs, failures


# --------------------------------------------------------------------------- plugins

# What libtpu reads to describe a slice on a machine without TPUs and without asking the network.
# TPU_SKIP_MDS_QUERY: never query a cloud metadata server for the VM's TPU.
# ALLOW_MULTIPLE_LIBTPU_LOAD: skip libtpu's one-process-per-machine lock, which
# protects real chips; with none present it would only stop two compiles side by side.
LIBTPU_COMPILE_ENVIRONMENT = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def libtpu_compile_environment() -> None:
  """Sets LIBTPU_COMPILE_ENVIRONMENT (where not set already); before libtpu is first loaded."""
  for name, value in LIBTPU_COMPILE_ENVIRONMENT.items():
    os.environ.setdefault(name, value)


def describe_tpu_topology(topology_name: str, chips_per_host_bounds: tuple[int, int, int], num_slices: int = 1):
  """libtpu's description of a TPU slice ("v6e:8x8"), with no TPU present.

  `chips_per_host_bounds` and `num_slices` are libtpu's options: jax hands
  `get_topology_desc`'s keyword arguments to the plugin unchecked."""
  libtpu_compile_environment()  # libtpu is loaded by the first description asked for
  return topologies.get_topology_desc(topology_name=topology_name, platform="tpu",
                                      chips_per_host_bounds=chips_per_host_bounds, num_slices=num_slices)


def describe_cuda_topology(target_config: str, topology: str):
  """The CUDA plugin's description of GPUs it cannot see: `topology` is "1x<hosts>x<GPUs per host>",
  `target_config` an XLA GpuTargetConfigProto in text format (targets.gpu_target_config)."""
  return topologies.get_topology_desc(platform="cuda", target_config=target_config, topology=topology)


# jax 0.10.2's plugin was built against CUDA 12.9 and cuDNN 9.8 (as _versions reports them).
CUDA_BUILD_VERSION_FALLBACK, CUDNN_BUILD_VERSION_FALLBACK = 12090, 90800


def _cuda_plugin_build_versions() -> tuple[int, int]:
  """(CUDA runtime, cuDNN) build versions from the plugin's private `_versions`, as it encodes them (12090, 90800)."""
  from jax_cuda12_plugin import _versions  # pylint: disable=import-outside-toplevel
  return int(_versions.cuda_runtime_build_version()), int(_versions.cudnn_build_version())


def cuda_library_versions() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """(CUDA runtime, cuDNN) versions the CUDA plugin was built against, as (major, minor, patch).

  XLA picks library calls (cuDNN fusions, cuBLASLt epilogues) by these versions; the
  plugin's own build versions are the oldest it runs with, so the compiled program is
  one it would also produce on the GPU host. Without the plugin's private module,
  jax 0.10.2's plugin's versions."""
  try:
    cuda, cudnn = _cuda_plugin_build_versions()
  except Exception:  # noqa: BLE001  (private module; self_check says when it broke)
    cuda, cudnn = CUDA_BUILD_VERSION_FALLBACK, CUDNN_BUILD_VERSION_FALLBACK
  return (cuda // 1000, cuda % 1000 // 10, 0), (cudnn // 10000, cudnn % 10000 // 100, cudnn % 100)


# XLA's debug option that turns Triton GEMMs off (targets.GPU_COMPILER_OPTIONS says why).
TRITON_GEMM_OPTION = "xla_gpu_enable_triton_gemm"


# --------------------------------------------------------------------------- self check

# Stored modules in the forms the checked versions print, put through the installed
# XLA's HLO parser and printer: async collectives as libtpu 0.0.52 writes them (the
# CPU compiler writes none), two chained copies of one all-gather (counted once), a
# combined async all-gather and a 7-operand all-reduce (the printer's `/*index=5*/`),
# and cuBLAS/cuDNN calls as the GPU compiler of jax-cuda12-plugin 0.10.2 writes them.
ASYNC_COLLECTIVES_MODULE = """HloModule async_collectives

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b)
}

ENTRY %main (p: bf16[128,768], c: f32[256], q: f32[64], k0: bf16[3,3,64,256], k1: bf16[3,3,64,256], a: f32[8], b: f32[16]) -> (bf16[1024,768], f32[256], f32[64], bf16[3,3,256,256], bf16[3,3,256,256], (f32[64], f32[128]), (f32[8], f32[16], f32[8], f32[16], f32[8], f32[16], f32[8])) {
  %p = bf16[128,768]{1,0} parameter(0)
  %c = f32[256]{0} parameter(1)
  %q = f32[64]{0} parameter(2)
  %k0 = bf16[3,3,64,256]{3,2,1,0} parameter(3)
  %k1 = bf16[3,3,64,256]{3,2,1,0} parameter(4)
  %a = f32[8]{0} parameter(5)
  %b = f32[16]{0} parameter(6)
  %combined-start = ((f32[8]{0}, f32[16]{0}), (f32[64]{0}, f32[128]{0})) all-gather-start(%a, %b), channel_id=5, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %combined-done = (f32[64]{0}, f32[128]{0}) all-gather-done(%combined-start)
  %seven = (f32[8]{0}, f32[16]{0}, f32[8]{0}, f32[16]{0}, f32[8]{0}, f32[16]{0}, f32[8]{0}) all-reduce(%a, %b, %a, %b, %a, %b, %a), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%sum
  %ags = (bf16[128,768]{1,0}, bf16[1024,768]{1,0}) all-gather-start(%p), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(step)/all_gather"}
  %agd = bf16[1024,768]{1,0} all-gather-done(%ags)
  %ars = f32[256]{0} all-reduce-start(%c), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%sum, metadata={op_name="jit(step)/psum"}
  %ard = f32[256]{0} all-reduce-done(%ars)
  %cps = (f32[64]{0}, f32[64]{0}, u32[], u32[]) collective-permute-start(%q), channel_id=3, source_target_pairs={{0,1},{1,0}}, metadata={op_name="jit(step)/ppermute"}
  %cpd = f32[64]{0} collective-permute-done(%cps)
  %chained.0 = bf16[3,3,256,256]{3,2,1,0} all-gather(%k0), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={2}, frontend_attributes={chain_id="24"}, metadata={op_name="kernel"}
  %chained.1 = bf16[3,3,256,256]{3,2,1,0} all-gather(%k1), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={2}, frontend_attributes={chain_id="24"}, metadata={op_name="kernel"}
  ROOT %t = (bf16[1024,768]{1,0}, f32[256]{0}, f32[64]{0}, bf16[3,3,256,256]{3,2,1,0}, bf16[3,3,256,256]{3,2,1,0}, (f32[64]{0}, f32[128]{0}), (f32[8]{0}, f32[16]{0}, f32[8]{0}, f32[16]{0}, f32[8]{0}, f32[16]{0}, f32[8]{0})) tuple(%agd, %ard, %cpd, %chained.0, %chained.1, %combined-done, %seven)
}
"""
ASYNC_COLLECTIVES_EXPECTED = {"all-gather": {"count": 3, "bytes": 1024 * 768 * 2 + 3 * 3 * 256 * 256 * 2 + (64 + 128) * 4},
                              "all-reduce": {"count": 2, "bytes": 256 * 4 + (4 * 8 + 3 * 16) * 4},
                              "collective-permute": {"count": 1, "bytes": 64 * 4}}

LIBRARY_CALLS_MODULE = """HloModule library_calls

ENTRY %main (p0: bf16[64,256], p1: bf16[256,512], x: f32[8,16,16,32], w: f32[3,3,32,64], dy: f32[8,16,16,64]) -> (bf16[64,512], f32[8,16,16,64], f32[8,16,16,32], f32[3,3,32,64], f32[8]) {
  %p0 = bf16[64,256]{1,0} parameter(0)
  %p1 = bf16[256,512]{1,0} parameter(1)
  %x = f32[8,16,16,32]{3,2,1,0} parameter(2)
  %w = f32[3,3,32,64]{3,2,1,0} parameter(3)
  %dy = f32[8,16,16,64]{3,2,1,0} parameter(4)
  %gemm = (bf16[64,512]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %fwd = (f32[8,16,16,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  %bwd = (f32[8,16,16,32]{3,2,1,0}, u8[0]{0}) custom-call(%dy, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardInput"
  %dw = (f32[3,3,32,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %dy), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter"
  %other = f32[8]{0} custom-call(%p0), custom_call_target="SomethingElse"
  %g0 = bf16[64,512]{1,0} get-tuple-element(%gemm), index=0
  %f0 = f32[8,16,16,64]{3,2,1,0} get-tuple-element(%fwd), index=0
  %b0 = f32[8,16,16,32]{3,2,1,0} get-tuple-element(%bwd), index=0
  %d0 = f32[3,3,32,64]{3,2,1,0} get-tuple-element(%dw), index=0
  ROOT %t = (bf16[64,512]{1,0}, f32[8,16,16,64]{3,2,1,0}, f32[8,16,16,32]{3,2,1,0}, f32[3,3,32,64]{3,2,1,0}, f32[8]{0}) tuple(%g0, %f0, %b0, %d0, %other)
}
"""
# What the parsers read from each library call of LIBRARY_CALLS_MODULE: target, operand
# and result arrays (the scratch buffer dropped), contracting dimensions, dimension labels.
_CONV_LABELS = ("b01f", "01io", "b01f")
LIBRARY_CALLS_EXPECTED = [
    ("__cublas$lt$matmul", [("bf16", [64, 256]), ("bf16", [256, 512])], [("bf16", [64, 512])], [1], None),
    ("__cudnn$convForward", [("f32", [8, 16, 16, 32]), ("f32", [3, 3, 32, 64])], [("f32", [8, 16, 16, 64])], None,
     _CONV_LABELS),
    ("__cudnn$convBackwardInput", [("f32", [8, 16, 16, 64]), ("f32", [3, 3, 32, 64])], [("f32", [8, 16, 16, 32])],
     None, _CONV_LABELS),
    ("__cudnn$convBackwardFilter", [("f32", [8, 16, 16, 32]), ("f32", [8, 16, 16, 64])], [("f32", [3, 3, 32, 64])],
     None, _CONV_LABELS),
    ("SomethingElse", [("bf16", [64, 256])], [("f32", [8])], None, None),
]

# The CPU program's per-device shapes (8 devices): psum of f32[1,16], all-gather of
# f32[8,4] pieces into f32[64,4] (f32: XLA's CPU compiler gathers bf16 as f32), and a
# replicated f32[4,4] Cholesky factorization (a LAPACK custom call).
_CPU_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Check:
  key: str      # INTERNALS key, or "self_check" for the check's own program
  status: str   # "ok", "problem" or "skipped"
  detail: str   # for a problem the sentence `problem` writes; for a skip, why


def _program_text(compiled) -> str:
  """The optimized HLO text of a compiled program, as analysis.analyze reads it (a seam for tests)."""
  return compiled.as_text() or ""


def _parse_hlo_module(text: str):
  """The installed XLA's parse of an HLO module's text (a seam for tests)."""
  if _hlo is None:
    raise RuntimeError(f"jaxlib._hlo cannot be imported ({_HLO_IMPORT_ERROR})")
  return _hlo.hlo_module_from_text(text)


def _collective_totals(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the collectives present, as analysis.collectives sums `collective_ops`."""
  out: dict[str, dict[str, int]] = {}
  for op, nbytes, _ in collective_ops(hlo_text):
    total = out.setdefault(op, {"count": 0, "bytes": 0})
    total["count"] += 1
    total["bytes"] += nbytes
  return out


def _library_call_parts(hlo_text: str) -> list[tuple]:
  """(target, operand arrays, result arrays, contracting dimensions, dimension labels) of each custom call,
  as analysis.library_calls reads them."""
  shapes: dict[str, str] = {}
  calls = []
  for name, shape, op, line in definitions(hlo_text):
    shapes[name] = shape
    if op == "custom-call":
      calls.append((line, shape))
  return [(custom_call_target(line), operand_arrays(line, "custom-call", shapes), result_arrays(shape),
           gemm_contracting_dimensions(line), conv_dim_labels(line)) for line, shape in calls]


def _collecting_program(devices, shapes):
  """A jitted psum (of the first argument) and tiled all-gather (of the second) over `devices`."""
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  collect = jax.shard_map(lambda a, b: (jax.lax.psum(a, "x"), jax.lax.all_gather(b, "x", tiled=True)),
                          mesh=mesh, in_specs=(P("x"), P("x")), out_specs=(P(), P()), check_vma=False)
  sharded = NamedSharding(mesh, P("x"))
  return collect, [jax.ShapeDtypeStruct(shape, dtype, sharding=sharded) for shape, dtype in shapes]


def _cpu_program():
  """The CPU program: a jitted psum and all-gather over 8 CPU devices, and a Cholesky factorization."""
  collect, (a, b) = _collecting_program(jax.devices("cpu")[:_CPU_DEVICES],
                                        [((8, 16), jnp.float32), ((64, 4), jnp.float32)])

  def program(a, b, m):
    total, gathered = collect(a, b)
    return total, gathered, jnp.linalg.cholesky(m)

  return jax.jit(program).lower(a, b, jax.ShapeDtypeStruct((4, 4), jnp.float32)).compile()


class _Checks:
  """Collects the outcome of each check; `run(key, fn)` turns an exception of `fn` into that key's problem."""

  def __init__(self):
    self.results: list[Check] = []

  def ok(self, key: str, detail: str = "") -> None:
    self.results.append(Check(key, "ok", detail))

  def fail(self, key: str, what_broke: str) -> None:
    self.results.append(Check(key, "problem", problem(key, what_broke)))

  def skip(self, key: str, why: str) -> None:
    self.results.append(Check(key, "skipped", why))

  def failed(self, key: str) -> bool:
    return any(r.key == key and r.status == "problem" for r in self.results)

  def expect(self, key: str, condition: bool, what_broke: str) -> bool:
    (self.ok(key) if condition else self.fail(key, what_broke))
    return condition

  def run(self, key: str, fn: Callable[[], Any]) -> Any:
    try:
      return fn()
    except Exception as e:  # noqa: BLE001  (each check reports, none stops the others)
      self.fail(key, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
      return None


_CPU_KEYS = ("optimized_hlo_module", "hlo_module_cost_analysis", "instruction_costs", "cost_analysis_keys",
             "memory_analysis_fields",
             "hlo_text.collectives", "hlo_text.metadata", "hlo_text.shapes", "hlo_text.custom_calls")


def _check_cpu_program(c: _Checks) -> None:
  if len(jax.devices("cpu")) < _CPU_DEVICES:
    for key in _CPU_KEYS:
      c.skip(key, f"the CPU program needs {_CPU_DEVICES} CPU devices, there are {len(jax.devices('cpu'))}: set "
             f"XLA_FLAGS=--xla_force_host_platform_device_count={_CPU_DEVICES} before jax starts")
    return
  try:
    compiled = _cpu_program()
  except Exception as e:  # noqa: BLE001
    error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for key in _CPU_KEYS:
      c.skip(key, f"self_check's CPU program did not compile: {error}")
    c.results.append(Check("self_check", "problem", (
        f"self_check's CPU program (a jitted psum and all-gather over {_CPU_DEVICES} CPU devices) did not compile "
        f"with jax {installed_version('jax')} (checked against {CHECKED_VERSIONS['jax']}): {error}; fix "
        "_cpu_program in drifting_jax/scale/xla_internals.py.")))
    return
  text = _program_text(compiled)

  # The optimized module and jaxlib's cost analysis of it, against the CPU compiler's own.
  compiler = c.run("cost_analysis_keys", lambda: cost_numbers(compiled))
  if compiler is not None:
    missing = [k for k in COST_TOTALS if k not in compiler]
    per_operand = [k for k in compiler if PER_OPERAND_MARK in k]
    c.expect("cost_analysis_keys", not missing and per_operand,
             f"the CPU program's cost analysis has keys {sorted(compiler)}: "
             + (f"no {missing}" if missing else f"no per-operand key marked {PER_OPERAND_MARK!r}"))
  module = c.run("optimized_hlo_module", lambda: optimized_hlo_module(compiled))
  if module is not None:
    c.expect("optimized_hlo_module", callable(getattr(module, "to_string", None)),
             f"gave a {type(module).__name__}, not an HloModule")
    # (Not again when the function is missing: `checks` has said so.)
    raw = None if c.failed("hlo_module_cost_analysis") else c.run(
        "hlo_module_cost_analysis", lambda: hlo_module_cost_analysis(module))
    if raw is not None:
      flops = (compiler or {}).get("flops")
      c.expect("hlo_module_cost_analysis",
               raw.get("flops", 0) > 0 and flops is not None and math.isclose(raw["flops"], flops, rel_tol=1e-6),
               f"gave flops {raw.get('flops')} for the CPU program, whose compiler counts {flops}")
  parts = c.run("instruction_costs", lambda: instruction_costs(text))
  whole = None if parts is None else c.run("instruction_costs", lambda: module_cost_analysis(text))
  if parts is not None and whole is not None:
    costs, failures = parts
    summed = {"flops": sum(i.flops for i in costs), "bytes accessed": sum(i.bytes_accessed for i in costs)}
    c.expect("instruction_costs",
             not failures and costs and all(math.isclose(summed[k], whole.get(k, -1.0), rel_tol=1e-4) for k in summed),
             f"the CPU program's {len(costs)} instructions, costed one by one, add up to {summed}, its whole module "
             f"to {({k: whole.get(k) for k in summed})}" + (f"; not costed: {failures[:2]}" if failures else ""))
  stats = c.run("memory_analysis_fields", compiled.memory_analysis)
  if stats is not None:
    missing = [f for f in MEMORY_FIELDS.values() if not isinstance(getattr(stats, f, None), (int, np.integer))]
    c.expect("memory_analysis_fields", not missing, f"{type(stats).__name__} has no integer field {missing}")

  # The HLO text: collectives, their op_names, every instruction's shape, the custom call.
  found = c.run("hlo_text.collectives", lambda: _collective_totals(text))
  if found is not None:
    expected = {"all-reduce": {"count": 1, "bytes": 16 * 4}, "all-gather": {"count": 1, "bytes": 64 * 4 * 4}}
    c.expect("hlo_text.collectives", found == expected,
             f"found {found} in the CPU program's HLO where it has {expected}; its collective lines: "
             f"{[line.strip()[:160] for line in text.splitlines() if any(op in line for op in COLLECTIVES)][:4]}")
  sources = c.run("hlo_text.metadata", lambda: {op: op_name_source(name) for op, _, name in collective_ops(text)})
  if sources is not None:
    c.expect("hlo_text.metadata",
             sources.get("all-reduce", "").endswith("psum") and sources.get("all-gather", "").endswith("all_gather")
             and not any(s.startswith("jit(") for s in sources.values()),
             f"the CPU program's collectives come from {sources}, not from psum and all_gather without jit(...)/")
  entry = text[text.find("\nENTRY"):] if "\nENTRY" in text else ""
  instruction = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = ")
  lines = [line for line in entry.splitlines() if instruction.match(line)]
  parsed = {line for *_, line in definitions(entry)}
  unparsed = [line.strip()[:160] for line in lines if COMMENT.sub("", line) not in parsed]
  params = sum(shape_bytes(shape) for _, shape, op, _ in definitions(entry) if op == "parameter")
  expected_params = (16 + 8 * 4 + 4 * 4) * 4  # f32[1,16], f32[8,4], f32[4,4]
  c.expect("hlo_text.shapes", lines and not unparsed and params == expected_params,
           (f"{len(unparsed)} of the CPU program's {len(lines)} entry instructions did not parse "
            f"({unparsed[:2]})" if unparsed or not lines else
            f"the CPU program's parameters came to {params} bytes, not {expected_params}"))
  calls = c.run("hlo_text.custom_calls", lambda: _library_call_parts(text))
  if calls is not None:
    targets = custom_call_targets(text)
    c.expect("hlo_text.custom_calls",
             calls and len(targets) == len(calls) and all(t != "?" and operands and results
                                                          for t, operands, results, *_ in calls),
             f"the CPU program's Cholesky gave {len(calls)} custom-call lines and the targets {targets}; read "
             f"as {calls}")


def _check_stored_modules(c: _Checks) -> None:
  module = c.run("hlo_module_from_text", lambda: _parse_hlo_module(ASYNC_COLLECTIVES_MODULE))
  if module is None:
    for key in ("hlo_text.async_collectives", "hlo_text.chains", "hlo_text.library_calls",
                "hlo_cost_of_custom_calls"):
      c.skip(key, "the installed XLA's HLO parser is not reachable (see hlo_module_from_text)")
    return
  c.ok("hlo_module_from_text")
  printed = module.to_string()
  stored, reprinted = _collective_totals(ASYNC_COLLECTIVES_MODULE), _collective_totals(printed)
  c.expect("hlo_text.async_collectives",
           stored == ASYNC_COLLECTIVES_EXPECTED and reprinted == ASYNC_COLLECTIVES_EXPECTED,
           f"the stored async module counts {stored}, and as the installed XLA prints it {reprinted}; expected "
           f"{ASYNC_COLLECTIVES_EXPECTED}")
  chained = [line.strip()[:200] for line in printed.splitlines() if "chained." in line and "all-gather(" in line]
  c.expect("hlo_text.chains", len(chained) == 2 and all(CHANNEL.search(l) and CHAIN.search(l) for l in chained),
           f"the installed XLA prints the chained all-gathers as {chained}, without channel_id and chain_id "
           "on their lines")

  calls = c.run("hlo_text.library_calls", lambda: _parse_hlo_module(LIBRARY_CALLS_MODULE))
  if calls is None:
    c.skip("hlo_cost_of_custom_calls", "the stored library-call module did not parse")
    return
  stored, reprinted = _library_call_parts(LIBRARY_CALLS_MODULE), _library_call_parts(calls.to_string())
  c.expect("hlo_text.library_calls", stored == LIBRARY_CALLS_EXPECTED and reprinted == LIBRARY_CALLS_EXPECTED,
           f"the stored cuBLAS/cuDNN module's calls, as the installed XLA prints them, read as {reprinted} "
           f"(as stored: {stored}); expected {LIBRARY_CALLS_EXPECTED}")
  cost = c.run("hlo_cost_of_custom_calls", lambda: hlo_module_cost_analysis(calls))
  if cost is not None:
    n = len(custom_call_targets(LIBRARY_CALLS_MODULE))
    c.expect("hlo_cost_of_custom_calls", cost.get("flops") == -n,
             f"XLA's cost analysis of a module of {n} custom calls and nothing else that costs FLOPs gave "
             f"{cost.get('flops')} FLOPs, not {-n} (-1 each), so analysis.gpu_cost's correction is wrong")


def _check_compile_option(c: _Checks) -> None:
  compiled = c.run("xla_gpu_enable_triton_gemm", lambda: jax.jit(lambda x: x + 1).lower(jnp.zeros(3)).compile(
      compiler_options={TRITON_GEMM_OPTION: False}))
  if compiled is not None:
    c.ok("xla_gpu_enable_triton_gemm")


def _check_cuda_plugin(c: _Checks) -> None:
  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    c.skip("cuda_plugin_versions", "jax-cuda12-plugin is not installed (not in requirements.txt; GPU targets need it)")
  else:
    versions = c.run("cuda_plugin_versions", _cuda_plugin_build_versions)
    if versions is not None:
      cuda, cudnn = versions
      c.expect("cuda_plugin_versions", 12000 <= cuda < 13000 and 80000 <= cudnn < 200000,
               f"reports CUDA {cuda} and cuDNN {cudnn}, not numbers in the form 12090 and 90800")
  c.skip("cuda_topology_desc", INTERNALS["cuda_topology_desc"].checked_by)


def _check_libtpu(c: _Checks, tpu: bool) -> None:
  keys = ("tpu_topology_desc", "libtpu_environment", "hlo_text.estimated_cycles", "hlo_text.mosaic_cost_estimate")
  if not tpu or importlib.util.find_spec("libtpu") is None:
    why = "libtpu is not installed" if tpu else "self_check(tpu=True) compiles a small program with libtpu"
    for key in keys:
      c.skip(key, why)
    return
  # A v5e:2x2 slice as targets.parse("v5e-4") describes it, and a psum and all-gather over it.
  topology = c.run("tpu_topology_desc", lambda: describe_tpu_topology("v5e:2x2", (2, 2, 1)))
  if topology is None:
    for key in keys[1:]:
      c.skip(key, "no slice described (see tpu_topology_desc)")
    return
  c.expect("libtpu_environment", all(os.environ.get(k) for k in LIBTPU_COMPILE_ENVIRONMENT),
           f"{sorted(LIBTPU_COMPILE_ENVIRONMENT)} are not all set")
  if not c.expect("tpu_topology_desc", len(topology.devices) == 4,
                  f"describes {len(topology.devices)} devices for v5e:2x2, not 4"):
    for key in keys[2:]:
      c.skip(key, "no program compiled (see tpu_topology_desc)")
    return
  collect, args = _collecting_program(topology.devices, [((8, 1024), jnp.float32), ((64, 1024), jnp.bfloat16)])
  compiled = c.run("tpu_topology_desc", lambda: jax.jit(collect).lower(*args).compile())
  if compiled is None:
    for key in keys[2:]:
      c.skip(key, "no program compiled (see tpu_topology_desc)")
    return
  found = _collective_totals(_program_text(compiled))
  expected = {"all-reduce": {"count": 1, "bytes": 2 * 1024 * 4}, "all-gather": {"count": 1, "bytes": 64 * 1024 * 2}}
  c.expect("hlo_text.collectives", found == expected, f"found {found} in libtpu's program where it has {expected}")
  # A matmul on one chip: its kernel carries the cost model's estimate (the collectives' do not).
  one_chip = jax.sharding.SingleDeviceSharding(topology.devices[0])
  matmul = c.run("hlo_text.estimated_cycles", lambda: jax.jit(lambda a, b: a @ b).lower(
      *[jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=one_chip)] * 2).compile())
  if matmul is not None:
    cycles = ESTIMATED_CYCLES.findall(_program_text(matmul))
    c.expect("hlo_text.estimated_cycles", bool(cycles) and all(int(n) > 0 for n in cycles),
             "libtpu's matmul has no kernel with a positive \"estimated_cycles\" in its backend_config")
  kernel = c.run("hlo_text.mosaic_cost_estimate", lambda: _declared_cost_kernel(one_chip))
  if kernel is not None:
    line = next((l for l in _program_text(kernel).splitlines() if "tpu_custom_call" in l), "")
    declared = mosaic_declared_flops(line)
    total = cost_numbers(kernel).get("flops", 0.0)
    c.expect("hlo_text.mosaic_cost_estimate", declared == _DECLARED_FLOPS and total >= _DECLARED_FLOPS,
             f"a kernel declaring {_DECLARED_FLOPS} FLOPs reads as {declared} in its call's line and libtpu "
             f"counts {total} FLOPs for its program")
  cost = cost_numbers(compiled)
  c.expect("cost_analysis_keys", all(k in cost for k in COST_TOTALS) and cost.get("optimal_seconds", 0) > 0,
           f"libtpu's cost analysis has keys {sorted(cost)}, not {list(COST_TOTALS)} and a positive "
           "optimal_seconds")


_DECLARED_FLOPS = 123_456_789.0


def _declared_cost_kernel(sharding):
  """A Pallas copy kernel declaring `_DECLARED_FLOPS`, compiled for one described TPU chip."""
  def copy(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  call = lambda x: pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  cost_estimate=pl.CostEstimate(flops=int(_DECLARED_FLOPS), transcendentals=0,
                                                                bytes_accessed=2 * 8 * 128 * 4))(x)
  return jax.jit(call).lower(jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=sharding)).compile()


def checks(tpu: bool = False) -> list[Check]:
  """Every check, ok, problem or skipped (with why); `tpu` adds a small libtpu compile (seconds)."""
  c = _Checks()
  if _jaxlib is None or not callable(getattr(_jaxlib, "hlo_module_cost_analysis", None)):
    c.fail("hlo_module_cost_analysis", f"cannot be imported ({_JAXLIB_IMPORT_ERROR or 'no such function'})")
  _check_cpu_program(c)
  _check_stored_modules(c)
  _check_compile_option(c)
  _check_cuda_plugin(c)
  _check_libtpu(c, tpu)
  for key in ("libtpu_negative_cost_calls", "libtpu_error_messages"):
    c.skip(key, INTERNALS[key].checked_by)
  return c.results


def self_check(tpu: bool = False) -> list[str]:
  """One clear sentence per private surface the installed versions break; empty when all work."""
  return [r.detail for r in checks(tpu) if r.status == "problem"]


def main(argv: list[str] | None = None) -> int:
  """Prints every check and the versions; exit status 1 when a check found a problem."""
  argv = sys.argv[1:] if argv is None else argv
  results = checks(tpu="--tpu" in argv)
  for r in results:
    print(f"{r.status:8s} {r.key}" + (f": {r.detail}" if r.detail else ""))
  drift = version_drift()
  for package, checked in CHECKED_VERSIONS.items():
    installed = installed_version(package)
    state = "not installed" if installed is None else ("as checked" if package not in drift else "DIFFERS")
    print(f"version  {package}: installed {installed or '-'}, checked {checked} ({state})")
  return 1 if any(r.status == "problem" for r in results) else 0


if __name__ == "__main__":
  raise SystemExit(main())
