"""The invariance loss alone: value and gradient over a model's sown activations.

  python experiments/loss_cost.py [--model=allcnn] [--width=0.25] [--batch_size=128]

Times L_inv (both methods) on random post-ReLU activations of the model's sown layers,
with no network around it: what the loss costs where the benchmark's step ratios
(experiments/benchmark.py) cannot separate it from the noise of the step.
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from invjax import losses  # pylint: disable=g-import-not-at-top
from invjax import models  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "allcnn", "Model name.")
flags.DEFINE_float("width", 0.25, "Width multiplier (All-CNN).")
flags.DEFINE_integer("batch_size", 128, "Images per step.")
flags.DEFINE_integer("copies", 8, "M.")
flags.DEFINE_integer("repeats", 10, "Timed calls.")


def main(argv):
  del argv
  fields = {"width": FLAGS.width} if FLAGS.model == "allcnn" else {}
  model = models.create(FLAGS.model, 10, **fields)
  shapes = models.layer_shapes(model, (32, 32, 3))
  rng = np.random.default_rng(0)
  feats = {k: jnp.asarray(np.maximum(rng.normal(size=(FLAGS.batch_size, *s)), 0),
                          jnp.float32) for k, s in shapes.items()}
  weights = losses.layer_weights(len(shapes), 0.1, 10.0)
  megabytes = sum(v.size for v in feats.values()) * 4 / 2**20
  for method in losses.METHODS:
    def total(fs, method=method):
      return jnp.sum(weights * jnp.stack([
          losses.grouped_invariance_loss(v, FLAGS.copies, method) for v in fs.values()]))
    f = jax.jit(jax.value_and_grad(total))
    jax.block_until_ready(f(feats))
    times = []
    for _ in range(FLAGS.repeats):
      t = time.perf_counter()
      jax.block_until_ready(f(feats))
      times.append(time.perf_counter() - t)
    print(f"{method}: L_inv value and gradient over {len(shapes)} layers "
          f"({megabytes:.1f} MB of activations): {1e3 * np.median(times):.1f} ms")


if __name__ == "__main__":
  app.run(main)
