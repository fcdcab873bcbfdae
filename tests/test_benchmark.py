"""experiments/benchmark.py measures the real training program (smoke test, tiny model).

Timings are printed by the benchmark, never asserted here; this checks that what it
reports is computed from the programs it claims to time.
"""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import benchmark
from experiments import common
from invjax import build as build_lib
from invjax import describe
from invjax import models
from tests import helpers


def test_convolutions_are_counted_and_told_apart_by_shape():
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def f(x, k3, k1):
    y = conv(x, k3)  # 3x3, 3 -> 4 channels
    return conv(conv(y, k1), k1)  # twice the same 1x1, 4 -> 4

  text = jax.jit(f).lower(np.zeros((2, 8, 8, 3), np.float32),
                          np.zeros((3, 3, 3, 4), np.float32),
                          np.zeros((1, 1, 4, 4), np.float32)).as_text()
  assert common.convolutions(text) == (3, 2)
  grad = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(1, 2))).lower(
      np.zeros((2, 8, 8, 3), np.float32), np.zeros((3, 3, 3, 4), np.float32),
      np.zeros((1, 1, 4, 4), np.float32)).as_text()
  total, distinct = common.convolutions(grad)
  assert total > 3 and 2 < distinct < total  # the backward's convolutions too


def test_a_part_timed_alone_runs_every_call_of_its_program():
  """`_looped` makes the calls of one timed program: each runs (none hoisted or skipped
  as dead), with its own i, and the program returns the last call's output."""
  seen = []

  def fn(i, x):
    jax.debug.callback(lambda j: seen.append(int(j)), i)
    return x * (i + 1)

  x = np.arange(3.0, dtype=np.float32)
  out = benchmark._looped(fn, 4)(x)
  jax.effects_barrier()
  assert sorted(seen) == [0, 1, 2, 3]
  np.testing.assert_array_equal(out, x * 4)
  np.testing.assert_array_equal(benchmark._looped(fn, 1)(x), x)


@pytest.mark.slow  # ~16 s of compiling; the benchmark is a script, not the library
def test_benchmark_rows_come_from_the_compiled_programs():
  config = helpers.tiny_config("unused", "batchaug", num_epochs=1.0, lr_boundaries=())
  config.image_shape, config.num_classes = (16, 16, 3), 4
  data = benchmark.synthetic_data(config, n_train=64, n_test=20)
  variant = benchmark.TrainingVariant(config.copy_and_resolve_references(), data,
                                      {"measure_inv": False}, steps_per_dispatch=2)
  assert not any(k.startswith("inv_loss") for k in variant.metrics)
  row = benchmark.time_training({"same batch": variant}, repeats=2)["same batch"]
  assert row["steps_timed"] == 4 and variant.step == 8 and row["loss_finite"]
  assert row["step_ms"] > 0 and row["compile_s"] > 0
  assert row["images_per_s"] == 16 / (row["step_ms"] / 1e3)
  assert row["flops_per_step"] > 0 and row["memory_plan_bytes"] > 0
  # Analytic FLOPs: every tap, 2 per MAC, x 3 for forward and backward, 16 images.
  model = build_lib.create_model(config, 4)
  assert row["analytic_flops_per_step"] == 6 * 16 * describe.dense_macs(model, (16, 16, 3))
  stacked = benchmark.StackedVariant(config.copy_and_resolve_references(), data, runs=2,
                                     steps_per_dispatch=2)
  srow = benchmark.time_training({"stacked": stacked}, repeats=1)["stacked"]
  assert srow["runs"] == 2 and srow["loss_finite"] and srow["steps_timed"] == 2
  assert srow["images_per_s"] == 2 * 16 / (srow["step_ms"] / 1e3)
  assert srow["analytic_flops_per_step"] == 2 * row["analytic_flops_per_step"]
  # Two runs, one program: each its own augmentation key, so their weights part.
  w = jax.tree.leaves(stacked.state.params)[0]
  assert w.shape[0] == 2 and not np.allclose(w[0], w[1])
  alone = benchmark.time_loss_alone(config.copy_and_resolve_references(), repeats=1,
                                    calls=2)
  assert alone["calls_per_program"] == 2 and alone["bytes_accessed"] > 0
  assert alone["layers"] == len(helpers.TINY_SOWN) and alone["step_ms"] > 0
  assert alone["activation_bytes"] == 16 * 4 * sum(
      math.prod(v) for v in models.layer_shapes(model, (16, 16, 3)).values())
  aug = benchmark.time_augmentation(config, data, repeats=1, calls=2)
  assert aug["calls_per_program"] == 2 and aug["step_ms"] > 0 and aug["flops_per_step"] > 0
  scores = benchmark.time_analysis(config, data)
  # 20 images in batches of 16 (analysis.batch_size): one whole batch scored
  assert scores["images"] == 16 and scores["layers"] == len(helpers.TINY_SOWN) + 1
  assert scores["copies"] == 2 and scores["images_per_s"] > 0
  for part in ("pass1_s", "pass2_s", "transforms_s", "forward_batch_n_s",
               "forward_batch_wide_s", "arithmetic_s"):
    assert scores[part] > 0, part
  assert scores["first_call_compile"]["xla_compile_s"] > 0  # it compiled the programs
  text = benchmark.format_markdown({
      "command": "c", "date": "d", "hardware": common.hardware(),
      "steps_per_dispatch": 2, "repeats": 2, "train_images": 64,
      "peak_tflops": {"float32": 1.0}, "peak_source": "given",
      "device_peak_bytes": float("nan"),
      "models": [{"model": "tiny", "precision": "float32", "size": "paper",
                  "overrides": {}, "batch_size": 16, "copies": 4, "paper_epochs": 1,
                  "default_method": "moments",
                  "train_rows": {"invariance moments": dict(
                      row, vs_same_batch=1.0, vs_baseline=None, loss_share_ms=0.5,
                      alpha=0.1)},
                  "loss_alone": alone,
                  "augmentation": dict(aug, vs_same_batch=0.1), "analysis": scores}]})
  assert "| invariance moments |" in text and jax.devices()[0].device_kind in text
  assert "| L_inv alone (moments" in text and "| 0.50 |" in text
  assert "| pass 2 alone | %.3f |" % scores["pass2_s"] in text
  assert np.isfinite(row["flops_per_step"])


@pytest.mark.slow  # ~20 s: two compiles of a tiny training program in a subprocess
def test_compile_time_reports_the_cached_compile_and_the_step(tmp_path):
  """experiments/compile_time.py with --cache_dir writes the training program into the
  persistent cache and compiles it again from there; --time_steps runs it."""
  cache = tmp_path / "cache"
  done = subprocess.run(
      [sys.executable, "-m", "experiments.compile_time", "--config=tests/tiny_config.py",
       "--config.num_classes=10", "--config.image_shape=(16,16,3)", "--steps=2",
       "--time_steps=2", f"--cache_dir={cache}", f"--jsonl={tmp_path / 'c.jsonl'}"],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "again from the cache" in done.stdout and "ms per step" in done.stdout
  assert any(p.name.startswith("jit_chunk") for p in cache.iterdir())
  (record,) = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
  assert record["steps"] == 2 and record["platform"] == "cpu"
  assert record["convolutions"] >= record["distinct_convolutions"] > 0
  for key, fmt in (("trace_lower_s", ".1f"), ("xla_compile_s", ".1f"),
                   ("cached_compile_s", ".1f"), ("ms_per_step", ".2f")):
    assert record[key] > 0 and format(record[key], fmt) in done.stdout, key


def test_a_report_names_the_xla_flags_it_ran_under(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
  result = {"command": "c", "date": "d", "hardware": common.hardware()}
  assert "XLA_FLAGS: `--xla_gpu_autotune_level=0`  " in common.report_header("t", result)
  monkeypatch.delenv("XLA_FLAGS")
  result = {"command": "c", "date": "d", "hardware": common.hardware()}
  assert not any("XLA_FLAGS" in line for line in common.report_header("t", result))


def test_a_report_names_the_persistent_cache_its_compiles_may_have_hit(monkeypatch):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/shared")
  result = {"command": "c", "date": "d", "hardware": common.hardware()}
  assert any(line.startswith("Persistent compilation cache: `/tmp/shared`")
             for line in common.report_header("t", result))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  result = {"command": "c", "date": "d", "hardware": common.hardware()}
  assert not any("compilation cache" in line for line in common.report_header("t", result))


def test_a_flax_batch_norm_row_is_compared_with_the_same_batch_with_flax_batch_norm():
  rows = {"baseline": {"step_ms": 1.0, "batch_norm": "fused"},
          "same batch": {"step_ms": 2.0, "batch_norm": "fused"},
          "invariance moments": {"step_ms": 2.5, "batch_norm": "fused"},
          "same batch, flax batch norm": {"step_ms": 3.0, "batch_norm": "flax"},
          "invariance moments, flax batch norm": {"step_ms": 3.3, "batch_norm": "flax"},
          "3 x invariance moments, one program": {"step_ms": 6.0, "runs": 3,
                                                  "batch_norm": "fused"}}
  benchmark.add_ratios(rows)
  assert rows["invariance moments"]["vs_same_batch"] == 1.25
  assert rows["invariance moments"]["loss_share_ms"] == 0.5
  assert abs(rows["invariance moments, flax batch norm"]["vs_same_batch"] - 1.1) < 1e-12
  assert abs(rows["invariance moments, flax batch norm"]["loss_share_ms"] - 0.3) < 1e-12
  assert rows["same batch, flax batch norm"]["vs_same_batch"] == 1.0
  assert rows["same batch, flax batch norm"]["vs_baseline"] == 3.0
  assert rows["3 x invariance moments, one program"]["vs_same_batch"] is None
  # DenseNet-BC's widened bottlenecks: against the same batch widened.
  dense = {"same batch": {"step_ms": 10.0, "batch_norm": "fused"},
           "invariance moments": {"step_ms": 10.5, "batch_norm": "fused"},
           "same batch, bottlenecks widened": {"step_ms": 8.0, "batch_norm": "fused",
                                               "widened": True},
           "invariance moments, bottlenecks widened": {
               "step_ms": 8.8, "batch_norm": "fused", "widened": True}}
  benchmark.add_ratios(dense)
  assert dense["invariance moments"]["vs_same_batch"] == 1.05
  assert abs(dense["invariance moments, bottlenecks widened"]["vs_same_batch"] - 1.1) < 1e-12
  assert dense["same batch, bottlenecks widened"]["vs_same_batch"] == 0.8
  # On a CPU every row has flax's: all are compared with the same batch.
  cpu = {"same batch": {"step_ms": 2.0, "batch_norm": "flax"},
         "invariance moments": {"step_ms": 2.2, "batch_norm": "flax"}}
  benchmark.add_ratios(cpu)
  assert abs(cpu["invariance moments"]["vs_same_batch"] - 1.1) < 1e-12


def test_a_variant_that_does_not_compile_is_reported_and_the_rest_timed(monkeypatch):
  """An XLA flag can leave a program XLA will not compile (a fusion no backend takes):
  the benchmark says which variant and why, and times the others."""
  class Compiled:
    def __init__(self, config, data, step_overrides, steps_per_dispatch):
      del data, step_overrides, steps_per_dispatch
      if config.alpha > 0:
        raise jax.errors.JaxRuntimeError("INTERNAL: no config for fusion.13\nmore")
      self.config, self.batch_norm, self.step_config = config, "fused", None

  monkeypatch.setattr(benchmark, "TrainingVariant", Compiled)
  monkeypatch.setattr(benchmark, "time_training",
                      lambda prepared, repeats: {n: {"step_ms": 1.0} for n in prepared})
  r = benchmark.benchmark_model("allcnn", "small", "float32", 1, 1, 64, 16,
                                chosen=("same_batch", "moments"))
  assert list(r["train_rows"]) == ["same batch"]
  assert r["failed"] == {"invariance moments": "INTERNAL: no config for fusion.13"}


def test_a_row_timed_at_xla_defaults_after_gpu_compile_failed_says_so(monkeypatch):
  """Where config.gpu_compile's options could not build a program and it was compiled
  with XLA's defaults instead, its row says so: it is not a timing of those options."""
  class FellBack:
    def __init__(self, config, data, step_overrides, steps_per_dispatch):
      del data, step_overrides, steps_per_dispatch
      self.config, self.batch_norm, self.step_config = config, "fused", None
      self.programs = type("Programs", (), {"fell_back": ["10"]})()

  monkeypatch.setattr(benchmark, "TrainingVariant", FellBack)
  monkeypatch.setattr(benchmark, "time_training", lambda prepared, repeats: {
      n: {"step_ms": 1.0, "images_per_s": 1.0, "flops_per_step": 1.0,
          "memory_plan_bytes": 1.0, "compile_s": 1.0} for n in prepared})
  r = benchmark.benchmark_model("allcnn", "small", "float32", 1, 1, 64, 16,
                                chosen=("same_batch",), gpu_compile="graph")
  assert r["gpu_compile"] == "graph"
  assert r["train_rows"]["same batch"]["fell_back"] == ["10"]
  text = benchmark.format_markdown({
      "command": "c", "date": "d", "hardware": common.hardware(),
      "steps_per_dispatch": 1, "repeats": 1, "train_images": 64,
      "peak_tflops": {"float32": 1.0}, "peak_source": "given",
      "device_peak_bytes": float("nan"), "models": [r]})
  assert "| same batch (gpu_compile failed: XLA's defaults) |" in text
