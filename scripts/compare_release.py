r"""Our training step beside the release's, compiled for the same slice and batch: one table.

    python -m scripts.compare_release --release-src /work/release_src --target v6e-64 \
        --config latent_ablation --out runs/compare/ablation_v6e64 [--classes N] [--small] \
        [--lock /tmp/drifting_big_compile.lock] [--ours-override loss.objective=release ...] \
        [--ours-report PATH] [--release-report PATH] [--reuse]

Runs, one after the other and each in its own process:

1. the release's step: `scripts.release_compile` (its code from --release-src, its
   mesh and shardings) -> OUT/release/release_compile_report.json;
2. ours: `python -m drifting_jax.main --mode=compile` with our config for the same
   release config (latent_ablation -> configs/imagenet_latent_ablation.py; --small ->
   its compile_smoke), only the train program, no loss-share recompile, and the batch
   and fsdp width set to the release's (classes per step, generated per class,
   positives, negatives; fsdp = its hsdp_dim) -> OUT/ours/compile_report.json.

Both are read by the same `drifting_jax.scale.analysis.analyze`. Prints a markdown
table (per-chip memory by kind, FLOPs, bytes accessed, estimated step time with its
source, collectives) and writes it to OUT/comparison.md, with both reports merged in
OUT/comparison.json. `--ours-report` / `--release-report` take existing reports
instead of compiling; `--reuse` takes those already under OUT.

Full-size compiles (DiT-B/2 with the 431M-parameter MAE on 64 chips) take 10-25 min
and up to 13 GB of RAM each: pass `--lock /tmp/drifting_big_compile.lock` to run each
compile under that lock (shared with other users of this machine), or run the whole
command under `flock` (then do not also pass --lock).

Step time: both columns are recomputed from each report's stored cost numbers
(`cost_analysis`: FLOPs, bytes accessed, the compiler's optimal_seconds; and the
custom-call counts) by today's `analysis.step_time_estimate`, so two reports written
by different versions of that function are still read the same way. It adds 1 s per
`ConcatBitcast` / `ZeroCrop` custom call to a negative optimal_seconds (libtpu costs
each at -1 s: the release's small step, -8.996 s with 9 ZeroCrop calls; its v6e-64
step under libtpu 0.0.42, -511.86 s with 512 ConcatBitcast calls), and
`AllocateBuffer` / `AssumeGatherIndicesInBound` calls do not move it (ours, with only
those, gets positive estimates). The roofline (FLOPs / peak, bytes accessed / HBM
bandwidth) is shown beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import pathlib
import subprocess
import sys
from typing import Any

GIB = 2**30
OUR_CONFIGS = {"latent_ablation": "configs/imagenet_latent_ablation.py"}
SMALL_VARIANT = "compile_smoke"
OURS_REPORT, RELEASE_REPORT = "compile_report.json", "release_compile_report.json"


# --------------------------------------------------------------------------- numbers from a report


def train_program(report: dict[str, Any]) -> dict[str, Any]:
  return report["programs"]["train"]


def step_time(report: dict[str, Any]) -> dict[str, Any]:
  """The train step's time estimate by today's analysis.step_time_estimate, from the report's cost numbers."""
  r = train_program(report)
  cost = r.get("cost_analysis")
  if not cost:  # a report without its cost numbers: its own estimate
    return r["time"]
  from drifting_jax.scale import analysis, targets
  return analysis.step_time_estimate(cost, targets.parse(report["target"]["name"]), r.get("custom_calls", {}))


def _gib(x) -> str:
  return "—" if x is None else f"{x / GIB:.2f} GiB"


def _ms(x) -> str:
  return "—" if x is None else f"{x * 1e3:.1f} ms"


def _tflops(x) -> str:
  return "—" if not x else f"{x / 1e12:.3g} T"


def _params_cell(count, nbytes) -> str:
  if not count:
    return "—"
  cell = f"{count / 1e6:.1f} M"
  if nbytes:
    cell += f" ({nbytes / 1e9:.2f} GB, {nbytes / count:.1f} B/param)"
  return cell


def _collectives(c: dict[str, dict[str, int]]) -> list[tuple[str, str]]:
  rows = []
  for op, v in c.items():
    rows.append((f"{op} (count, bytes per chip)", f"{v['count']}, {v['bytes'] / GIB:.3f} GiB"))
  total_n = sum(v["count"] for v in c.values())
  total_b = sum(v["bytes"] for v in c.values())
  rows.append(("collectives total", f"{total_n}, {total_b / GIB:.3f} GiB"))
  return rows


def column(report: dict[str, Any]) -> dict[str, str]:
  """{row label: cell} for one report (ours or the release's)."""
  r = train_program(report)
  mem, tm, fl = r["memory"], r["time"], r.get("flops", {})
  batch = r.get("batch", {})
  cells: dict[str, str] = {
      "target": f"{report['target']['name']} ({report['target']['devices']} devices, "
                f"{report['target']['hosts']} hosts)",
      "mesh": " x ".join(f"{k} {v}" for k, v in report["mesh"].items()),
      "batch": (f"{batch.get('classes_per_step')} classes x {batch.get('gen_per_class')} generated, "
                f"{batch.get('pos_per_class')} pos, {batch.get('neg_per_class')} neg"),
      "generator params": _params_cell(r.get("generator_params"), None),
      "MAE params": _params_cell(r.get("feature_params"), r.get("feature_param_bytes")),
  }
  placement = r.get("placement", {}).get("feature_params")
  cells["MAE params per chip"] = (
      f"{placement['bytes_per_device'] / 1e9:.3f} GB ({', '.join(placement['dtypes'])}; "
      f"{placement['replication']:.0f}x replicated)" if placement else "—")
  cells.update({
      "memory total per chip": f"{_gib(mem['total_bytes'])} of {mem['capacity_bytes'] / GIB:.0f}"
                               + (" (fits)" if mem["fits"] else " (DOES NOT FIT)"),
      "  arguments": _gib(mem["arguments_bytes"]),
      "  outputs": _gib(mem["outputs_bytes"]),
      "  aliased (donated)": _gib(mem["aliased_bytes"]),
      "  temporaries": _gib(mem["temporaries_bytes"]),
      "  code": _gib(mem["code_bytes"]),
      "FLOPs per chip (compiler)": _tflops(r["flops_per_device"]),
      "FLOPs per chip (analytical matmul/conv)": _tflops(fl.get("analytical_per_device")),
      "bytes accessed per chip (compiler)": f"{r['bytes_accessed_per_device'] / 1e9:.1f} GB",
      "compiler optimal_seconds (raw)": ("—" if tm.get("optimal_seconds_raw") is None
                                         else f"{tm['optimal_seconds_raw']:.4g} s"),
      "roofline (compute, memory)": (f"{_ms(tm['roofline_seconds'])} ({_ms(tm.get('roofline_compute_seconds'))}, "
                                     f"{_ms(tm.get('roofline_memory_seconds'))})"),
  })
  estimate = step_time(report)
  cells["step time estimate"] = f"{_ms(estimate['seconds'])} [{estimate['source']}]"
  gen = batch.get("generated_per_step")
  cells["generated images/s (by that estimate)"] = (f"{gen / estimate['seconds']:,.0f}"
                                                    if gen and estimate["seconds"] else "—")
  cells.update(_collectives(r["collectives"]))
  cells["custom calls"] = ", ".join(f"{k} {v}" for k, v in sorted(r.get("custom_calls", {}).items())) or "none"
  if r.get("compile_seconds") is not None:
    cells["compile time on this machine"] = f"{r['compile_seconds'] / 60:.1f} min"
  return cells


def comparison_rows(ours: dict[str, Any], release: dict[str, Any]) -> list[tuple[str, str, str]]:
  """(label, ours, release) rows, labels in ours' order then any only the release has."""
  a, b = column(ours), column(release)
  labels = list(a) + [k for k in b if k not in a]
  return [(k, a.get(k, "—"), b.get(k, "—")) for k in labels]


def markdown(ours: dict[str, Any], release: dict[str, Any], note: str = "") -> str:
  rows = comparison_rows(ours, release)
  cfg = ours.get("config", {})
  rel = release.get("release", {})
  lines = [
      f"Ours ({cfg.get('model', '?')}, objective {cfg.get('loss', '?')}"
      + (f" {cfg.get('kernel')}" if cfg.get("kernel") else "")
      + f") beside the release ({rel.get('repo', '?')}@{str(rel.get('commit', '?'))[:10]}, "
      f"{rel.get('config', '?')}, drift loss), compiled for {ours['target']['name']} by jax {ours.get('jax')}, "
      f"libtpu {ours.get('libtpu')}. Every number is per chip and the TPU compiler's (or a roofline's), "
      "not a measurement.",
  ]
  for key in ("jax", "libtpu"):
    if ours.get(key) != release.get(key):
      lines.append(f"NOT THE SAME COMPILER: ours by {key} {ours.get(key)}, the release's by {key} "
                   f"{release.get(key)}.")
  lines += [
      "",
      "| | ours | release |",
      "|---|---|---|",
  ]
  for label, x, y in rows:
    name = label.strip()
    if label.startswith("  "):
      name = "&nbsp;&nbsp;" + name
    lines.append(f"| {name} | {x} | {y} |")
  if note:
    lines += ["", note]
  patches = release.get("patches", [])
  if patches:
    lines += ["", f"The release under jax {release.get('jax')} / flax {release.get('flax')}: {len(patches)} "
              "run-time patches (scripts/release_compile.py):", ""]
    lines += [f"{i}. {p['what']}: {p['why']}" for i, p in enumerate(patches, 1)]
  return "\n".join(lines) + "\n"


def merge(ours: dict[str, Any], release: dict[str, Any]) -> dict[str, Any]:
  return {"ours": ours, "release": release, "rows": [list(r) for r in comparison_rows(ours, release)]}


# --------------------------------------------------------------------------- running the two compiles


@contextlib.contextmanager
def _locked(path: str | None):
  if not path:
    yield
    return
  with open(path, "a+") as f:
    print(f"compare_release: waiting for {path}", flush=True)
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], log: pathlib.Path, lock: str | None) -> None:
  print("compare_release: " + " ".join(cmd), flush=True)
  log.parent.mkdir(parents=True, exist_ok=True)
  with _locked(lock), log.open("w") as f:
    done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
  if done.returncode:
    tail = "\n".join(log.read_text().splitlines()[-30:])
    raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


def release_command(args, out: pathlib.Path) -> list[str]:
  cmd = [sys.executable, "-m", "scripts.release_compile", "--release-src", args.release_src,
         "--config", args.config, "--out", str(out)]
  if args.target:
    cmd += ["--target", args.target]
  if args.classes:
    cmd += ["--classes", str(args.classes)]
  if args.small:
    cmd += ["--small"]
  return cmd


def ours_command(args, release: dict[str, Any], out: pathlib.Path) -> list[str]:
  """Our compile mode at the release report's target, batch and fsdp width."""
  config = args.ours_config or OUR_CONFIGS.get(args.config)
  if not config:
    raise SystemExit(f"no config of ours known for the release's {args.config!r}: pass --ours-config")
  if args.small and ":" not in config:
    config += f":{SMALL_VARIANT}"
  batch = train_program(release)["batch"]
  fsdp = release["mesh"].get("fsdp", 1)
  cmd = [sys.executable, "-m", "drifting_jax.main", "--mode=compile", f"--config={config}",
         f"--workdir={out}", f"--config.compile.target={release['target']['name']}",
         "--config.compile.programs=('train',)", "--config.compile.loss_share=False",
         f"--config.train.classes_per_step={batch['classes_per_step']}",
         f"--config.train.gen_per_class={batch['gen_per_class']}",
         f"--config.train.pos_per_class={batch['pos_per_class']}",
         f"--config.train.neg_per_class={batch['neg_per_class']}",
         f"--config.mesh.fsdp={fsdp}"]
  cmd += [f"--config.{o}" for o in args.ours_override]
  return cmd


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--release-src", default="/work/release_src", help="checkout of lambertae/drifting")
  p.add_argument("--target", default=None, help="TPU slice (default v6e-64; v5p-8 with --small)")
  p.add_argument("--config", default="latent_ablation", help="release config (configs/gen/<NAME>.yaml)")
  p.add_argument("--ours-config", default=None, help="our config file (default: the one for --config)")
  p.add_argument("--classes", type=int, default=None, help="classes per step, both sides")
  p.add_argument("--small", action="store_true", help="tiny models and batch on both sides (a quick check)")
  p.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                 help="extra --config.KEY=VALUE for our side, e.g. loss.objective=release")
  p.add_argument("--ours-report", default=None, help="an existing compile_report.json of ours (no compile)")
  p.add_argument("--release-report", default=None, help="an existing release_compile_report.json (no compile)")
  p.add_argument("--reuse", action="store_true", help="take the reports already under --out")
  p.add_argument("--lock", default=None, help="run each compile under this flock file")
  p.add_argument("--out", required=True, help="folder for both reports, comparison.md and comparison.json")
  p.add_argument("--markdown", default=None, help="also write the table here")
  p.add_argument("--note", default="", help="a line printed under the table (e.g. which commit compiled ours)")
  args = p.parse_args(argv)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  release_path = pathlib.Path(args.release_report or out / "release" / RELEASE_REPORT)
  if not args.release_report and not (args.reuse and release_path.is_file()):
    _run(release_command(args, release_path.parent), out / "release.log", args.lock)
  release = json.loads(release_path.read_text())
  ours_path = pathlib.Path(args.ours_report or out / "ours" / OURS_REPORT)
  if not args.ours_report and not (args.reuse and ours_path.is_file()):
    _run(ours_command(args, release, ours_path.parent), out / "ours.log", args.lock)
  ours = json.loads(ours_path.read_text())

  if ours["target"]["name"] != release["target"]["name"]:
    print(f"compare_release: warning: targets differ ({ours['target']['name']} vs {release['target']['name']})")
  text = markdown(ours, release, args.note)
  (out / "comparison.md").write_text(text)
  (out / "comparison.json").write_text(json.dumps(merge(ours, release), indent=2, default=float))
  if args.markdown:
    pathlib.Path(args.markdown).write_text(text)
  print(text, flush=True)
  return merge(ours, release)


if __name__ == "__main__":
  main()
