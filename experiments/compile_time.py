"""How long a config's training program takes to trace, lower and compile.

  python -m experiments.compile_time --config=configs/densenet.py [--steps=10]
  XLA_FLAGS=--xla_gpu_autotune_level=0 python -m experiments.compile_time ...
  python -m experiments.compile_time --config=... --time_steps=3 --cache_dir=/tmp/c
  python -m experiments.compile_time --config=... --jsonl=DIR/compile.jsonl

Builds the run as `invjax.main` would (on synthetic data of the config's declared shape,
so nothing is loaded) and compiles the program of --steps steps per dispatch (a loop
off CPU, straight-line code on CPU, as `programs.TrainPrograms` does), reporting trace +
lower and XLA's compile time separately. With --time_steps, it then runs the program
that many times and reports the step time (so a compile-time flag's cost in speed shows
beside its saving). With --cache_dir, JAX's persistent compilation cache (with XLA's
per-fusion autotuning cache, JAX's default with it) is used in that directory, and the
program is compiled a second time from it after clearing JAX's in-memory caches: what
a rerun or resume of the config pays. Without it, no persistent cache is used. With
--jsonl, the figures are also appended to that file as one JSON line (what
experiments/targets.py reads).
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from experiments import benchmark
from experiments import common
from invjax import build as build_lib
from invjax import cli
from invjax import compilation_cache
from invjax import placement as placement_lib
from invjax import programs as programs_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/densenet.py.",
                                lock_config=True)
flags.DEFINE_integer("steps", None, "Steps per program. Default: the config's "
                     "steps_per_dispatch.")
flags.DEFINE_integer("time_steps", 0, "Programs to run and time after compiling.")
flags.DEFINE_string("cache_dir", None, "Persistent compilation cache directory: also "
                    "time a second compile from it.")
flags.DEFINE_string("jsonl", None, "Append the figures to this file as one JSON line.")


def main(argv):
  del argv
  if FLAGS.cache_dir:
    compilation_cache.configure(FLAGS.cache_dir)
  else:
    jax.config.update("jax_enable_compilation_cache", False)
  config = cli.config_flag("config")
  if config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/densenet.py).")
  data = benchmark.synthetic_data(config, 256, 32)
  run = build_lib.build(config, data)
  steps = FLAGS.steps or run.steps_per_dispatch
  placement = placement_lib.Placement.create(config.gpu_compile)
  state = build_lib.initial_state(run, placement)
  programs = programs_lib.TrainPrograms(run, placement, state, compile_now=False)
  fn = programs.chunk(steps)
  jitted = jax.jit(fn, donate_argnums=0)
  args = programs.args(programs.enter(state), 0, steps)  # the loop's layout
  t = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  options = placement.compiler_options or None  # as invjax.main compiles it
  compiled = lowered.compile(compiler_options=options)
  t2 = time.perf_counter()
  dev = jax.devices()[0]
  record = {"model": config.model.name, "model_fields": dict(config.model),
            "batch_size": config.batch_size,
            "precision": "bfloat16" if config.half_precision else "float32",
            "steps": steps, "device": dev.device_kind, "platform": dev.platform,
            "trace_lower_s": t1 - t, "xla_compile_s": t2 - t1, "cached_compile_s": None,
            "ms_per_step": None, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compiler_options": options or {}, "gpu_compile": config.gpu_compile,
            # the --config.FIELD overrides: targets.py judges the file's own config
            "config_overrides": sorted(config_flags.get_override_values(FLAGS["config"]))}
  record["convolutions"], record["distinct_convolutions"] = common.convolutions(
      lowered.as_text())
  line = (f"{config.model.name} {dict(config.model)} batch {config.batch_size}, "
          f"{record['precision']}, {steps} step(s) per program, {dev.device_kind}: "
          f"{record['convolutions']} convolutions ({record['distinct_convolutions']} "
          f"distinct), trace + lower {t1 - t:.1f} s, XLA compile {t2 - t1:.1f} s")
  if FLAGS.cache_dir:
    jax.clear_caches()
    t = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=0)
    jitted.lower(*args).compile(compiler_options=options)
    record["cached_compile_s"] = time.perf_counter() - t
    line += (f"; again from the cache {record['cached_compile_s']:.1f} s "
             "(trace included)")
  if FLAGS.time_steps:
    state, *_ = compiled(*args)  # warm-up; the state is donated, so pass the new one
    jax.block_until_ready(state)
    times = []
    for _ in range(FLAGS.time_steps):
      t = time.perf_counter()
      state, *_ = compiled(state, *args[1:])
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
    record["ms_per_step"] = 1e3 * float(np.median(times)) / steps
    line += f"; {record['ms_per_step']:.2f} ms per step"
  print(f"{line}; XLA_FLAGS={record['xla_flags']!r}", flush=True)
  if FLAGS.jsonl:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.jsonl)), exist_ok=True)
    with open(FLAGS.jsonl, "a") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
