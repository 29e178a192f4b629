r"""Recounts the analytical FLOPs of a compile report, without compiling again.

    python -m scripts.recount_flops --report=docs/compile/ours_ablation_v6e-64.json \
        --config=configs/imagenet_latent_ablation.py [--config.mesh.fsdp=8 ...]

A full-size compile takes 20-40 minutes here; the analytical count is only a trace of
the same programs (`drifting_jax.scale.flops`), a minute. When the counting rule
changes (session 6: a convolution's taps on padding are no longer counted, as XLA's
cost analysis does not count them), this brings a stored report up to date: the
training step's and the MAE step's analytical FLOPs, their ratio to the compiler's
count (which is kept: it is the compiled program's), and the projected MFU. Pass the
config and overrides the report was compiled with; the target is the report's.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The configuration the report was compiled with.")
flags.DEFINE_string("report", None, "compile_report.json to update in place.")
flags.mark_flags_as_required(["config", "report"])


def recount(report: dict, config) -> dict:
  from drifting_jax.scale import compile_mode, flops, targets
  from drifting_jax.train import mae_pretrain

  target = targets.parse(report["target"]["name"])
  config.compile.target = target.name
  mesh = compile_mode.make_mesh(config, target)
  if dict(mesh.shape) != report["mesh"]:
    raise SystemExit(f"the config gives mesh {dict(mesh.shape)}, the report was compiled on {report['mesh']}: "
                     "pass the overrides it was compiled with")
  peak = target.chip.device_peak_flops
  for name, program in report["programs"].items():
    compiler = program["flops"]["compiler_per_device"]
    if name == "train":
      program["flops"] = flops.train_section(compile_mode.train_program(config, mesh), mesh.size, compiler)
    elif name == "mae":
      mae = mae_pretrain.build_program(config, mesh)
      program["flops"] = flops.whole_program_section(mae.step, mae.args(), mesh.size, compiler)
    else:  # the sampling step has no padded convolution (the DiT's patch embedding is unpadded)
      continue
    seconds = program["projection"]["step_seconds"]
    program["projection"]["mfu"] = program["flops"]["analytical_per_device"] / (peak * seconds)
    program["flops"]["recounted"] = "analytical count redone by scripts/recount_flops.py (padding taps excluded)"
  return report


def main(argv):
  del argv
  path = pathlib.Path(FLAGS.report)
  text = path.read_text()
  report = recount(json.loads(text), FLAGS.config)
  indent = len(text.split("\n", 2)[1]) - len(text.split("\n", 2)[1].lstrip()) or 2  # keep the file's layout
  path.write_text(json.dumps(report, indent=indent, default=float) + ("\n" if text.endswith("\n") else ""))
  for name, program in report["programs"].items():
    f = program["flops"]
    print(f"{name}: compiler {f['compiler_per_device'] / 1e12:.3f} T, analytical "
          f"{f['analytical_per_device'] / 1e12:.3f} T per device (ratio {f['compiler_over_analytical']:.3f})")


if __name__ == "__main__":
  app.run(main)
