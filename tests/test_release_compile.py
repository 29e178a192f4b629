"""scripts/compare_release.py's table and scripts/release_compile.py's helpers, on fake reports.

Nothing here compiles or needs the release's source, except the last test, which reads
the release's configs when a checkout is at $RELEASE_SRC (default /work/release_src)
and is skipped otherwise.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scripts import compare_release, release_compile

GIB = 2**30
RELEASE_SRC = pathlib.Path(os.environ.get("RELEASE_SRC", "/work/release_src"))


def _program(total_gib, raw, customs, flops=16.4e12, analytical=None):
  return {
      "memory": {"arguments_bytes": 2 * GIB, "outputs_bytes": GIB, "aliased_bytes": 0,
                 "temporaries_bytes": int((total_gib - 3.1) * GIB), "code_bytes": int(0.1 * GIB),
                 "total_bytes": int(total_gib * GIB), "capacity_bytes": 32 * GIB, "fits": total_gib <= 32,
                 "verdict": "fits"},
      "flops_per_device": flops, "bytes_accessed_per_device": 203e9,
      "time": {"optimal_seconds_raw": raw, "roofline_seconds": 0.1, "roofline_compute_seconds": 0.018,
               "roofline_memory_seconds": 0.1, "bound": "memory",
               "seconds": raw if raw and raw > 0 else 0.1, "source": "compiler optimal_seconds"},
      "collectives": {"all-gather": {"count": 10, "bytes": GIB}, "all-reduce": {"count": 2, "bytes": 0}},
      "custom_calls": customs,
      "flops": {"compiler_per_device": flops, "analytical_per_device": analytical},
      "batch": {"classes_per_step": 64, "gen_per_class": 64, "pos_per_class": 64, "neg_per_class": 16,
                "generated_per_step": 4096},
      "generator_params": 133e6, "feature_params": 431e6, "feature_param_bytes": 862e6,
      "compile_seconds": 600.0,
  }


def _reports():
  target = {"name": "v6e-64", "devices": 64, "hosts": 16}
  ours = {"target": target, "mesh": {"data": 8, "fsdp": 8}, "jax": "0.10.2", "libtpu": "0.0.42.1",
          "config": {"model": "DiT-B/2", "loss": "log_kde", "kernel": "laplace"},
          "programs": {"train": _program(12.0, 0.15, {"AllocateBuffer": 18}, analytical=15e12)}}
  release_program = _program(16.7, -511.86, {"ConcatBitcast": 512, "AllocateBuffer": 18})
  release_program["placement"] = {"feature_params": {"bytes_per_device": 0.43e9, "dtypes": {"float32": 431e6},
                                                     "replication": 8.0}}
  release = {"target": target, "mesh": {"data": 8, "fsdp": 8}, "jax": "0.10.2", "flax": "0.12.8",
             "libtpu": "0.0.42.1",
             "release": {"repo": "lambertae/drifting", "commit": "accd0cf09c33", "config": "configs/gen/x.yaml"},
             "patches": [{"what": "stub dataset.dataset", "why": "torch"}],
             "programs": {"train": release_program}}
  return ours, release


def test_rows_pair_the_same_quantities_for_both_sides():
  ours, release = _reports()
  rows = {label.strip(): (a, b) for label, a, b in compare_release.comparison_rows(ours, release)}
  for label in ("memory total per chip", "arguments", "temporaries", "FLOPs per chip (compiler)",
                "bytes accessed per chip (compiler)", "step time estimate", "collectives total"):
    assert rows[label][0] != "—" and rows[label][1] != "—", label
  assert rows["memory total per chip"] == ("12.00 GiB of 32 (fits)", "16.70 GiB of 32 (fits)")
  assert rows["FLOPs per chip (compiler)"] == ("16.4 T", "16.4 T")
  assert rows["FLOPs per chip (analytical matmul/conv)"] == ("15 T", "—")
  # Only the release's report says where the MAE's params live.
  assert rows["MAE params per chip"][0] == "—" and rows["MAE params per chip"][1].startswith("0.430 GB (float32")
  assert rows["collectives total"] == ("12, 1.000 GiB", "12, 1.000 GiB")


def test_step_time_is_recomputed_from_each_reports_cost_numbers():
  ours, release = _reports()
  # The release's report: an old estimate (45 s, +1 s for every custom call) beside its cost numbers.
  r = release["programs"]["train"]
  r["time"].update(seconds=45.14, source="old")
  r["cost_analysis"] = {"flops": 16.5e12, "bytes accessed": 248.4e9, "optimal_seconds": -438.86}
  r["custom_calls"] = {"ConcatBitcast": 439, "AllocateBuffer": 12, "AssumeGatherIndicesInBound": 33}
  t = compare_release.step_time(release)
  assert t["seconds"] == pytest.approx(0.14, abs=1e-6) and "439" in t["source"]
  # Without cost numbers the report's own estimate stands.
  assert compare_release.step_time(ours) is ours["programs"]["train"]["time"]
  rows = {label: (a, b) for label, a, b in compare_release.comparison_rows(ours, release)}
  assert rows["step time estimate"][1].startswith("140.0 ms [compiler optimal_seconds -438.9 s")
  assert rows["generated images/s (by that estimate)"][1] == f"{4096 / 0.14:,.0f}"


def test_markdown_is_one_table_with_the_patches_listed():
  ours, release = _reports()
  text = compare_release.markdown(ours, release)
  table = [line for line in text.splitlines() if line.startswith("|")]
  assert table[0] == "| | ours | release |"
  assert len(table) == 2 + len(compare_release.comparison_rows(ours, release))
  assert all(line.count("|") == 4 for line in table)
  assert "1. stub dataset.dataset: torch" in text
  assert "NOT THE SAME COMPILER" not in text
  release["libtpu"] = "0.0.52"
  assert ("NOT THE SAME COMPILER: ours by libtpu 0.0.42.1, the release's by libtpu 0.0.52"
          in compare_release.markdown(ours, release))
  merged = compare_release.merge(ours, release)
  assert merged["ours"] is ours and len(merged["rows"]) == len(table) - 2


def test_our_side_is_compiled_at_the_release_reports_target_batch_and_fsdp():
  _, release = _reports()
  release = copy.deepcopy(release)
  release["programs"]["train"]["batch"].update(classes_per_step=32, neg_per_class=8)
  release["mesh"] = {"data": 4, "fsdp": 8}
  release["target"]["name"] = "v5p-64"
  args = compare_release.argparse.Namespace(ours_config=None, config="latent_ablation", small=True,
                                            ours_override=["loss.objective=release"])
  cmd = compare_release.ours_command(args, release, pathlib.Path("/tmp/x"))
  assert "--config=configs/imagenet_latent_ablation.py:compile_smoke" in cmd
  for flag in ("--config.compile.target=v5p-64", "--config.train.classes_per_step=32",
               "--config.train.neg_per_class=8", "--config.train.gen_per_class=64", "--config.mesh.fsdp=8",
               "--config.compile.loss_share=False", "--config.loss.objective=release"):
    assert flag in cmd, flag
  args.config = "latent_sota_B"
  with pytest.raises(SystemExit, match="--ours-config"):
    compare_release.ours_command(args, release, pathlib.Path("/tmp/x"))


def test_abstract_jit_gives_shapes_with_the_requested_shardings():
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("fsdp",))
  shardings = {"w": NamedSharding(mesh, P(None, "fsdp")), "b": NamedSharding(mesh, P())}
  init = release_compile._abstract_jit(jax)(lambda: {"w": jnp.zeros((3, 4)), "b": jnp.zeros(())},
                                            out_shardings=shardings)
  out = init()
  assert isinstance(out["w"], jax.ShapeDtypeStruct) and out["w"].shape == (3, 4)
  assert out["w"].sharding == shardings["w"] and out["b"].sharding == shardings["b"]
  assert release_compile._per_device_bytes(out) == 3 * 2 * 4 + 4


def test_a_view_replaces_only_what_it_names():
  view = release_compile._View(jax, device_count=lambda backend=None: 64)
  assert view.device_count() == 64 and view.numpy is jnp and view.tree.map is jax.tree.map


@pytest.mark.skipif(not (RELEASE_SRC / "configs" / "gen" / "latent_ablation.yaml").is_file(),
                    reason=f"no checkout of lambertae/drifting at {RELEASE_SRC} (set RELEASE_SRC)")
def test_the_releases_configs_are_read_with_its_loader():
  spec = importlib.util.spec_from_file_location("_release_utils_misc", RELEASE_SRC / "utils" / "misc.py")
  misc = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(misc)
  config, mae, mae_file = release_compile.load_configs(RELEASE_SRC, "latent_ablation", misc, False, None, None)
  t = config.train
  assert (t.train_batch_size, t.forward_dict.gen_per_label, t.pos_per_sample, t.neg_per_sample) == (64, 64, 64, 16)
  assert config.hsdp_dim == 8 and mae_file.endswith("latent_ablation_256.yaml") and mae.model.base_channels == 256
  # --small: our compile_smoke's sizes, in the release's terms; --classes still wins.
  s = release_compile.small_settings()
  small, mae, _ = release_compile.load_configs(RELEASE_SRC, "latent_ablation", misc, True, 16, None)
  assert small.train.train_batch_size == 16 and small.hsdp_dim == s["hsdp_dim"]
  assert {k: small.model[k] for k in s["model"]} == s["model"] and small.model.input_size == 32
  assert small.train.forward_dict.gen_per_label == s["gen_per_label"] and small.train.loss_kwargs.R_list == s["R_list"]
  assert mae.model.base_channels == s["mae_model"]["base_channels"] and mae.model.patch_size == 2


def test_small_settings_are_our_compile_smoke():
  s = release_compile.small_settings()
  assert s["target"] == "v5p-8" and s["train"]["train_batch_size"] == 8 and s["mae_model"]["base_channels"] == 32
  assert s["model"]["hidden_size"] == 128 and set(s["model"]) == set(release_compile._SMALL_MODEL_KEYS)
