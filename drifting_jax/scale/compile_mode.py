"""`--mode=compile`: the run's programs compiled for a TPU slice or GPU hosts, with no TPU, GPU, data or weights.

    python -m drifting_jax.main --mode=compile --config=configs/imagenet_latent_ablation.py \\
        --config.compile.target=v6e-64 --workdir=runs/compile/ablation_v6e64

Each program comes from the builder its run uses (`train.program.build_train_program`,
`train.mae_pretrain.build_program`, `eval.sampling.build_sample_program`), over a
mesh of the slice's devices as libtpu describes them (or the GPUs' as the CUDA
plugin does: `--config.compile.target=h100x8`, scale/targets.py), with the frozen
feature network built from its architecture alone: what is compiled here is what
`train` runs. The TPU (or GPU) compiler then reports, per device, what the program
needs (memory: `analysis`) and does (FLOPs: `flops` beside the compiler's count;
bytes, collectives), and `report_text` words it.

The report (`compile_report.json` and a printed table) labels every time as the
compiler's estimate or a roofline: nothing here is measured on a chip.

Programs (`compile.programs`):
  train   the generator's training step (and, with `compile.loss_share`, the same step
          with the objective replaced by a trivial one: the loss's share of the step);
  sample  the evaluation's sampling step (EMA generator on `eval.batch_size` labels);
  mae     the MAE pretraining step (`config.mae`, configs/imagenet_mae_latent_256.py).
"""

from __future__ import annotations

import gzip
import json
import pathlib
from importlib import metadata as importlib_metadata
import time
from typing import Any, Optional

import jax
import ml_collections
from absl import logging

from drifting_jax import config_defaults, errors, partitioning
from drifting_jax.eval import sampling
from drifting_jax.scale import analysis, flops as flops_lib, report_text, targets as targets_lib
from drifting_jax.train import mae_pretrain, program as program_lib, train_step as train_step_lib, trainer

GIB = 2**30
PROGRAMS = ("train", "sample", "mae")


def make_mesh(config: ml_collections.ConfigDict, target: targets_lib.Target) -> jax.sharding.Mesh:
  devices = target.devices()
  try:
    return partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
  except ValueError as e:
    raise errors.UsageError(f"mesh data={config.mesh.data} x fsdp={config.mesh.fsdp} does not fit "
                            f"{target.name} ({len(devices)} devices): {e}") from None


# The run's pre-flight raises the same error, with the same kind of one-line verdict.
DoesNotFit = program_lib.DoesNotFit


def _compile(program, what: str, target: targets_lib.Target) -> tuple[Any, float]:
  """`program.compile()` for the target; the compiler's out-of-memory refusal as a one-line `DoesNotFit`."""
  start = time.perf_counter()
  logging.info("compile: lowering and compiling %s", what)
  try:
    compiled = program.compile(compiler_options=targets_lib.compiler_options(target))
  except Exception as e:  # noqa: BLE001  (XlaRuntimeError; its type moves between jax versions)
    if not report_text.is_out_of_memory(str(e)):
      raise
    raise DoesNotFit(report_text.out_of_memory_verdict(str(e), what, target)) from None
  seconds = time.perf_counter() - start
  logging.info("compile: %s compiled in %.1f s", what, seconds)
  return compiled, seconds


# --------------------------------------------------------------------------- the three programs


def train_program(config: ml_collections.ConfigDict, mesh, objective=None) -> program_lib.TrainProgram:
  """The training program this mode compiles: the run's builder, the feature network abstract."""
  return program_lib.build_train_program(config, mesh, abstract_features=True, objective=objective)


def _analyze_and_save(compiled, target: targets_lib.Target, hlo_dir: Optional[pathlib.Path], name: str) -> dict:
  """`analysis.analyze`, and the optimized HLO text gzipped beside the report
  (`python -m drifting_jax.scale.breakdown` re-reads it without another compile, which
  takes tens of minutes at full size); the text is taken from the executable once."""
  hlo = compiled.as_text() or ""
  report = analysis.analyze(compiled, target, hlo)
  report["optimized_hlo"] = None
  if hlo_dir is not None:
    path = hlo_dir / f"{name}.optimized_hlo.txt.gz"
    with gzip.open(path, "wt", compresslevel=6) as f:
      f.write(hlo)
    report["optimized_hlo"] = path.name
  return report


def compile_train(config: ml_collections.ConfigDict, target: targets_lib.Target, mesh,
                  hlo_dir: Optional[pathlib.Path] = None) -> dict[str, Any]:
  t = config.train
  start = time.perf_counter()
  # train.microbatches="auto" picks the smallest count that fits, as the run's pre-flight does.
  program, compiled, choice = program_lib.compile_fitting(
      config, mesh, capacity=(target.chip.device_hbm_bytes, report_text.device_name(target)),
      build=lambda c: train_program(c, mesh), compile_program=lambda p: _compile(p, "the training step", target)[0])
  seconds = time.perf_counter() - start
  if choice:
    print(choice, flush=True)
  report = _analyze_and_save(compiled, target, hlo_dir, "train")
  compiler_flops = report["flops_per_device"]
  report["flops"] = flops_lib.train_section(program, mesh.size, compiler_flops)
  analytical = report["flops"]["analytical_per_device"]
  seconds_per_step = report["time"]["seconds"]
  images = t.classes_per_step * t.gen_per_class
  report["projection"] = {
      "label": report_text.estimate_label(target),
      "step_seconds": seconds_per_step,
      "generated_images_per_second": images / seconds_per_step if seconds_per_step else None,
      "total_steps": int(t.total_steps),
      "run_hours": seconds_per_step * t.total_steps / 3600.0,
      "mfu": (analytical / (target.chip.device_peak_flops * seconds_per_step)) if seconds_per_step else None,
  }
  feature_shapes = jax.tree.leaves(program.abstract_feature_params)
  report.update(compile_seconds=seconds, generator_params=program.generator_params,
                feature_params=int(sum(x.size for x in feature_shapes)),
                feature_param_bytes=int(sum(x.size * x.dtype.itemsize for x in feature_shapes)),
                mae_architecture=None if config.feature.kind == "pixels" else program.features.source,
                microbatches=int(program.config.train.microbatches), microbatches_choice=choice,
                microbatch_features=train_step_lib.microbatch_features_mode(program.config.train),
                generator_computed_as={"attention_impl": program.generator.attention_impl,
                                       "remat_policy": program.generator.remat_policy},
                loss_computed_as={"kde_impl": train_step_lib.objective_from_config(
                    config.loss, mesh).options.get("implementation")},
                batch={"classes_per_step": int(t.classes_per_step), "gen_per_class": int(t.gen_per_class),
                       "pos_per_class": int(t.pos_per_class), "neg_per_class": int(t.neg_per_class),
                       "generated_per_step": images})
  if int(program.config.train.microbatches) > 1:
    # XLA's HLO cost analysis costs a while loop's body once (its trip count is not
    # always static): the scans over chunks are undercounted (a smoke step on h100x8
    # with 2 chunks: compiler/analytical 0.59; the ablation on h100x1 with 16: 0.075,
    # which made an "MFU" of 166%). No projection is made from such a time.
    report["microbatch_caveat"] = (
        f"{program.config.train.microbatches} microbatches: the compiler's cost analysis counts each chunk loop's "
        "body once, so its FLOPs, bytes and the step time built on them are low (no projection is made); the "
        "analytical FLOPs count every chunk (and the extra forward pass of generator and MAE that chunking costs)")
    report["projection"] = {"label": "not estimated: a chunked step's time is undercounted (microbatch_caveat)",
                            "step_seconds": None, "generated_images_per_second": None,
                            "total_steps": int(t.total_steps), "run_hours": None, "mfu": None}
  del compiled
  if config.compile.loss_share:
    trivial = train_program(program.config, mesh, objective=train_step_lib.trivial_objective)
    compiled, trivial_seconds = _compile(trivial, "the step with a trivial objective", target)
    trivial_report = analysis.analyze(compiled, target)
    without = trivial_report["time"]["seconds"]
    report["loss_share"] = {
        "label": report_text.estimate_label(target),
        "step_seconds_trivial_objective": without,
        "time_trivial_objective": trivial_report["time"],
        "share": (seconds_per_step - without) / seconds_per_step if seconds_per_step else None,
        "flops_share": ((compiler_flops - trivial_report["flops_per_device"]) / compiler_flops
                        if compiler_flops else None),
        "memory_total_bytes_trivial_objective": trivial_report["memory"]["total_bytes"],
        "compile_seconds": trivial_seconds,
    }
  return report


def compile_sample(config: ml_collections.ConfigDict, target: targets_lib.Target, mesh,
                   hlo_dir: Optional[pathlib.Path] = None) -> dict[str, Any]:
  """The evaluation's sampling step, laid out as evaluation lays it out (`sampling.build_sample_program`)."""
  program = sampling.build_sample_program(config, mesh, target.hosts)
  compiled, seconds = _compile(program, "the sampling step", target)
  report = _analyze_and_save(compiled, target, hlo_dir, "sample")
  report["flops"] = flops_lib.whole_program_section(program.fn, program.args, program.devices_per_program,
                                                    report["flops_per_device"])
  analytical = report["flops"]["analytical_per_device"]
  s = report["time"]["seconds"]
  n = program.samples_per_call
  report["projection"] = {"label": report_text.estimate_label(target), "step_seconds": s,
                          "generated_images_per_second": program.samplers * n / s if s else None,
                          "mfu": analytical / (target.chip.device_peak_flops * s) if s else None}
  report.update(compile_seconds=seconds, batch={"samples_per_step": n}, layout=program.description,
                devices_per_program=program.devices_per_program)
  return report


def compile_mae(config: ml_collections.ConfigDict, target: targets_lib.Target, mesh,
                hlo_dir: Optional[pathlib.Path] = None) -> dict[str, Any]:
  """The MAE pretraining step of `config.mae` (only MAE configs have that section)."""
  if "mae" not in config:
    raise errors.UsageError("compile.programs names 'mae' but the config has no `mae` section "
                            "(use configs/imagenet_mae_latent_256.py)")
  program = mae_pretrain.build_program(config, mesh)
  m, b = config.mae, int(config.mae.batch_size)
  compiled, seconds = _compile(program, "the MAE pretraining step", target)
  report = _analyze_and_save(compiled, target, hlo_dir, "mae")
  report["flops"] = flops_lib.whole_program_section(program.step, program.args(), mesh.size,
                                                    report["flops_per_device"])
  analytical = report["flops"]["analytical_per_device"]
  s = report["time"]["seconds"]
  report["projection"] = {"label": report_text.estimate_label(target), "step_seconds": s,
                          "images_per_second": b / s if s else None, "total_steps": int(m.total_steps),
                          "run_hours": s * m.total_steps / 3600.0,
                          "mfu": analytical / (target.chip.device_peak_flops * s) if s else None}
  report.update(compile_seconds=seconds, mae_params=int(sum(x.size for x in jax.tree.leaves(program.abstract_state.params))),
                batch={"batch_size": b})
  return report


COMPILERS = {"train": compile_train, "sample": compile_sample, "mae": compile_mae}


# --------------------------------------------------------------------------- report


def validate(config: ml_collections.ConfigDict, target: targets_lib.Target) -> None:
  config_defaults.complete(config)
  programs = tuple(config.compile.programs)
  unknown = [p for p in programs if p not in PROGRAMS]
  if unknown or not programs:
    raise errors.UsageError(f"compile.programs must name some of {PROGRAMS}, got {programs}")
  if "train" in programs:
    trainer.validate_config(config)  # the train mode's own checks (process count: below, for the slice)
    if config.train.classes_per_step % target.hosts:
      raise errors.UsageError(f"train.classes_per_step={config.train.classes_per_step} must divide among the "
                              f"{target.hosts} hosts of {target.name}")


# libtpu's refusal of a program over part of a slice (found compiling the ablation's
# per-host sampling step for v5e-256; v5e-16, v6e and v5p slices accept it).
_LIMITED_ROUTING = "On platforms with limited ICI routing device assignment should include all slice devices"


def compile_mode(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Compiles `compile.programs` for `compile.target`; writes <workdir>/compile_report.json, prints a table."""
  target = targets_lib.parse(config.compile.target)
  validate(config, target)
  mesh = make_mesh(config, target)
  report: dict[str, Any] = {
      "target": target.to_dict(), "mesh": dict(mesh.shape), "jax": jax.__version__,
      "libtpu": _package_version("libtpu"), "config": {"model": config.model.name, "loss": config.loss.objective,
                                             "kernel": config.loss.kernel, "remat": bool(config.model.remat),
                                             "remat_policy": config.model.remat_policy,
                                             "attention_impl": config.model.attention_impl,
                                             "feature_remat_policy": config.feature.remat_policy},
      "label": "every time and rate is the compiler's estimate or a roofline, not a measurement",
      "programs": {},
  }
  if target.chip.platform == "cuda":
    report["jax_cuda12_plugin"] = _package_version("jax-cuda12-plugin")
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  refused = {}
  for name in config.compile.programs:
    try:
      report["programs"][name] = COMPILERS[name](config, target, mesh, hlo_dir=out)
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError; its type moves between jax versions)
      if _LIMITED_ROUTING not in str(e):
        raise
      # The other programs' reports stand; this one cannot run as laid out on this slice.
      refused[name] = (f"the compiler refuses this program's device assignment on {target.name}: "
                       f"{_LIMITED_ROUTING} (a program over a subset of the slice's chips, as "
                       "evaluation's per-host sampling is; eval.sampling_layout='global' or 'auto' "
                       "samples in one program over every chip)")
      report["refused"] = refused
    (out / "compile_report.json").write_text(json.dumps(report, indent=2, default=float))
  lines = [report_text.header_line(target, dict(mesh.shape), mesh.size, report)]
  for name, r in report["programs"].items():
    lines += report_text.program_lines(name, r)
  lines += [f"{name}: not compiled: {why}" for name, why in refused.items()]
  print("\n".join(lines), flush=True)
  too_big = [f"{name}: {r['memory']['verdict']}" for name, r in report["programs"].items() if not r["memory"]["fits"]]
  if too_big:  # the report is written; the exit status tells a launch script not to rent the slice
    raise DoesNotFit("; ".join(too_big) + f" (report: {out / 'compile_report.json'})")
  if refused:
    raise errors.UsageError("; ".join(f"{name}: {why}" for name, why in refused.items())
                            + f" (the other programs' report: {out / 'compile_report.json'})")
  return report


def _package_version(name: str) -> str:
  try:
    return importlib_metadata.version(name)
  except importlib_metadata.PackageNotFoundError:
    return "not installed"


def _libtpu_version() -> str:  # scripts/release_compile.py
  return _package_version("libtpu")
