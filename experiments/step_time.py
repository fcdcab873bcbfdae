"""Step time of the invariance loss against the same batch without it, side by side.

  python experiments/step_time.py [--width=0.125] [--batch_size=64] [--steps=30]

Times, in one process on the same data, the baseline step (M = 1, alpha = 0), the same
batch with M copies and alpha = 0 (L_inv still measured for logging), and the
invariance step (alpha = 0.1) with each loss method: the median of --steps timed steps
after warm-up, the device synchronised after each. Prints milliseconds and the ratios.
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from invjax import augment  # pylint: disable=g-import-not-at-top
from invjax import models  # pylint: disable=g-import-not-at-top
from invjax import steps  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "allcnn", "Model name.")
flags.DEFINE_float("width", 1.0, "Model width multiplier.")
flags.DEFINE_integer("batch_size", 128, "Images per step.")
flags.DEFINE_integer("copies", 8, "M of the invariance step.")
flags.DEFINE_integer("steps", 30, "Timed steps per variant.")
flags.DEFINE_integer("image_size", 32, "Square image size.")


def time_step(cfg, model, batch_size, n):
  tx = optax.sgd(0.01, momentum=0.9, nesterov=True)
  shape = (FLAGS.image_size, FLAGS.image_size, 3)
  state = steps.create_train_state(jax.random.key(0), model, shape, tx)
  k = batch_size // cfg.copies
  rng = np.random.default_rng(0)
  seeds = jax.device_put(rng.integers(0, 256, (k, *shape), dtype=np.uint8))
  labels = jax.device_put(rng.integers(0, 10, k).astype(np.int32))
  step = jax.jit(steps.make_train_step(cfg), donate_argnums=0)
  for i in range(3):  # compile and warm up
    state, m = step(state, seeds, labels, jax.random.key(i))
  jax.block_until_ready((state, m))
  times = []
  for i in range(n):
    t = time.perf_counter()
    state, m = step(state, seeds, labels, jax.random.key(100 + i))
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3


def main(argv):
  del argv
  model = models.create(FLAGS.model, 10, width=FLAGS.width)
  shape = (FLAGS.image_size, FLAGS.image_size, 3)
  num_layers = len(models.layer_shapes(model, shape))
  base = dict(alpha_ratio=10.0, ranges=augment.AugmentRanges(), num_layers=num_layers)
  variants = {
      "baseline (M=1, alpha=0)": steps.StepConfig(copies=1, alpha=0.0,
                                                  loss_method="moments", **base),
      f"same batch (M={FLAGS.copies}, alpha=0)": steps.StepConfig(
          copies=FLAGS.copies, alpha=0.0, loss_method="moments", **base),
  }
  for method in ("pairwise", "moments"):
    variants[f"invariance {method} (alpha=0.1)"] = steps.StepConfig(
        copies=FLAGS.copies, alpha=0.1, loss_method=method, **base)
  ms = {name: time_step(cfg, model, FLAGS.batch_size, FLAGS.steps)
        for name, cfg in variants.items()}
  print(f"{FLAGS.model} width {FLAGS.width}, batch {FLAGS.batch_size}, "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, median of {FLAGS.steps}")
  names = list(ms)
  same = ms[names[1]]
  print(f"{'step':<36}{'ms':>9}{'/ baseline':>12}{'/ same batch':>14}")
  for name in names:
    print(f"{name:<36}{ms[name]:>9.1f}{ms[name] / ms[names[0]]:>12.3f}"
          f"{ms[name] / same:>14.3f}")


if __name__ == "__main__":
  app.run(main)
