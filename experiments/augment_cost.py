"""The augmentation alone, with invjax's 2-D warp and with dm-pix's, side by side.

  python -m experiments.augment_cost                  # All-CNN-C's batch: 16 x 8, 32x32x3
  python -m experiments.augment_cost --batch_size=64 --copies=4 --repeats=0  # costs only

The program is the training step's augmentation (as benchmark.py's "augmentation
alone"): K = B / M uint8 seed images, expanded to B copies, made float and augmented
with the paper's ranges. It is compiled twice: with `augment.warp` (one source
coordinate per output pixel, 4 neighbours with all channels) and with dm-pix's
`affine_transform(order=1, mode="nearest")` on each image, the 3-D interpolation over
(h, w, c) that invjax used before (8 corners per value). For each it prints XLA's cost
analysis (FLOPs, bytes accessed), the memory plan, and the median time of --repeats calls,
the two timed in turn, round after round.
"""

import time
from unittest import mock

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from invjax import augment
from invjax import steps as steps_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Augmented images per program (B).")
flags.DEFINE_integer("copies", 8, "M: copies of each seed image.")
flags.DEFINE_integer("image_size", 32, "Height and width.")
flags.DEFINE_integer("repeats", 100, "Timed calls per warp (0: costs only).")


def compile_program(warp_fn, seeds, labels):
  ranges = augment.AugmentRanges()

  def program(key, seeds, labels):
    x, _, _ = steps_lib.expand_seeds(seeds, labels, FLAGS.copies)
    return augment.augment(key, steps_lib.to_float(x), ranges)

  with mock.patch.object(augment, "warp", warp_fn):  # traced here, so patched here
    return jax.jit(program).lower(jax.random.key(0), seeds, labels).compile()


def main(argv):
  del argv
  k = FLAGS.batch_size // FLAGS.copies
  s = FLAGS.image_size
  seeds = jnp.asarray(np.random.default_rng(0).integers(0, 256, (k, s, s, 3), np.uint8))
  labels = jnp.zeros((k,), jnp.int32)
  programs = {"invjax 2-D warp": compile_program(augment.warp, seeds, labels),
              "dm-pix affine_transform": compile_program(augment.dm_pix_warp, seeds,
                                                                labels)}
  outs = [np.asarray(p(jax.random.key(1), seeds, labels)) for p in programs.values()]
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}: {FLAGS.batch_size} images "
        f"= {k} x {FLAGS.copies}, {s}x{s}x3; outputs differ by at most "
        f"{np.max(np.abs(outs[0] - outs[1])):.2e}")
  times = {name: [] for name in programs}
  for i in range(FLAGS.repeats + 2 if FLAGS.repeats else 0):
    for name, p in programs.items():
      t = time.perf_counter()
      p(jax.random.key(i), seeds, labels).block_until_ready()
      if i >= 2:  # two warm-up rounds
        times[name].append(time.perf_counter() - t)
  for name, p in programs.items():
    c = p.cost_analysis()
    c = (c[0] if isinstance(c, (list, tuple)) else c) or {}
    m = p.memory_analysis()
    plan = (m.argument_size_in_bytes + m.temp_size_in_bytes) / 1e6 if m else float("nan")
    timed = f"; {np.median(times[name]) * 1e3:.3f} ms (median of {len(times[name])})" if (
        times[name]) else ""
    print(f"{name}: XLA {c.get('flops', 0) / 1e6:,.1f} MFLOP, bytes accessed "
          f"{c.get('bytes accessed', 0) / 1e6:,.1f} MB, memory plan {plan:,.1f} MB{timed}")


if __name__ == "__main__":
  app.run(main)
