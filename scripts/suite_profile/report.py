"""Sums a profiled test run's compile time per test file (see sitecustomize.py here).

    SUITE_PROFILE_DIR=/tmp/prof PYTHONPATH=scripts/suite_profile \
        .venv/bin/python -m pytest -q -n 2 --dist loadfile tests
    .venv/bin/python -m scripts.suite_profile.report /tmp/prof [--file test_losses]

Seconds are wall-clock seconds of each event in its process; with two workers on two
cores nearly all of them are CPU seconds too (a compile is single-threaded but for
parts of LLVM's code generation).
"""
import argparse
import collections
import json
import pathlib

COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def read(folder):
  events, exits = [], []
  for path in sorted(pathlib.Path(folder).glob("*.jsonl")):
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a process killed mid-line
        continue
      (exits if record.get("exit") else events).append(record)
  return events, exits


def test_file(test):
  return test.split("::")[0] if test else "(outside a test)"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("folder")
  parser.add_argument("--file", help="per function within the test files whose name contains this")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  events, exits = read(args.folder)

  if args.file:
    seconds, count = collections.Counter(), collections.Counter()
    for e in events:
      if e["event"] == COMPILE and args.file in e["test"]:
        key = (e["test"].split("::")[-1].split(" ")[0], e["function"])
        seconds[key] += e["seconds"]
        count[key] += 1
    for (test, function), s in seconds.most_common(args.top):
      print(f"{s:8.1f} s {count[test, function]:5d}x  {function:30s} {test}")
    return

  table = collections.defaultdict(lambda: collections.Counter())
  for e in events:
    row = table[test_file(e["test"])]
    if e["event"] == COMPILE:
      row["compile_s"] += e["seconds"]
      row["compiles"] += 1
    elif e["event"] == TRACE:
      row["trace_s"] += e["seconds"]
    elif e["event"] == LOWER:
      row["lower_s"] += e["seconds"]
    elif e["event"].endswith("/cache_hits"):
      row["cache_hits"] += 1
  for x in exits:
    if x["test"]:  # started by a test (it inherited the test's id); not pytest or a worker
      row = table[test_file(x["test"])]
      row["processes"] += 1
      row["tensorflow"] += bool(x["tensorflow"])
  total = collections.Counter()
  print(f"{'test file':42s} {'compile_s':>9s} {'compiles':>8s} {'hits':>5s} {'trace_s':>8s} {'lower_s':>8s} {'procs':>5s} {'tf':>3s}")
  for name, row in sorted(table.items(), key=lambda kv: -kv[1]["compile_s"]):
    total.update(row)
    print(f"{name:42s} {row['compile_s']:9.1f} {row['compiles']:8d} {row['cache_hits']:5d} "
          f"{row['trace_s']:8.1f} {row['lower_s']:8.1f} {row['processes']:5d} {row['tensorflow']:3d}")
  print(f"{'total':42s} {total['compile_s']:9.1f} {total['compiles']:8d} {total['cache_hits']:5d} "
        f"{total['trace_s']:8.1f} {total['lower_s']:8.1f} {total['processes']:5d} {total['tensorflow']:3d}")
  print(f"CPU seconds of the processes that exited: {sum(x['cpu'] for x in exits):.0f} ({len(exits)} processes)")


if __name__ == "__main__":
  main()
