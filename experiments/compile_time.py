"""How long a config's training program takes to trace, lower and compile.

  python -m experiments.compile_time --config=configs/densenet.py [--steps=10]
  XLA_FLAGS=--xla_gpu_autotune_level=0 python -m experiments.compile_time ...

Builds the run as `invjax.main` would (on synthetic data of the config's declared shape,
so nothing is loaded) and compiles the program of --steps steps per dispatch (a loop
off CPU, straight-line code on CPU, as `programs.TrainPrograms` does), reporting trace +
lower and XLA's compile time separately. No persistent compilation cache is used.
"""

import os
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from experiments import benchmark
from invjax import build as build_lib
from invjax import cli
from invjax import placement as placement_lib
from invjax import seed_order
from invjax import steps as steps_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/densenet.py.",
                                lock_config=True)
flags.DEFINE_integer("steps", None, "Steps per program. Default: the config's "
                     "steps_per_dispatch.")


def main(argv):
  del argv
  config = cli.config_flag("config")
  if config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/densenet.py).")
  steps = FLAGS.steps or int(config.steps_per_dispatch)
  data = benchmark.synthetic_data(config, 256, 32)
  run = build_lib.build(config, data)
  placement = placement_lib.Placement.create()
  state = build_lib.initial_state(run, placement)
  k = config.batch_size // config.copies
  schedule = seed_order.SeedSchedule(len(data.x_train), k, config.seed,
                                    placement.replicated)
  first, perms = schedule.window(0, steps)
  fn = steps_lib.make_train_chunk(run.step_config, steps, k, placement.batch,
                                  data_on_device=True,
                                  unroll=jax.default_backend() == "cpu")
  jitted = jax.jit(fn, donate_argnums=0)
  args = (state, placement.replicate(data.x_train), placement.replicate(data.y_train),
          perms, np.int32(first), np.int32(0), jax.random.key(1))
  t = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  print(f"{config.model.name} {dict(config.model)} batch {config.batch_size}, "
        f"{'bfloat16' if config.half_precision else 'float32'}, {steps} step(s) per "
        f"program, {jax.devices()[0].device_kind}: trace + lower {t1 - t:.1f} s, "
        f"XLA compile {t2 - t1:.1f} s; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


if __name__ == "__main__":
  app.run(main)
