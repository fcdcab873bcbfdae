"""Test-time averaging: a trained run's test accuracy when each image's softmax is
averaged over a few lightly augmented copies of it, beside its clean accuracy.

  python -m experiments.test_time_average DIR [DIR ...]
  python -m experiments.test_time_average experiments/results/records/allcnn_cifar10/paper/* \
      --dataset=data/cifar10.npz --out=experiments/results/paper/test_time_average

The authors' test script reports this besides the clean test accuracy (their "light"
scheme, horizontal flips and shifts of up to 10 % drawn from a truncated normal, 3
copies, the softmax averaged), and the paper does not say which of the two its Table 1
gives: this measures the difference on our runs. Not in the paper's text; evaluation
only (eval mode, the run's running batch-norm statistics).

DIR is a workdir (its newest good checkpoint) or a run record (its weights.npz). Copy r
of the image at index i is augmented with the key fold_in(fold_in(key(--seed), r), i)
(`copy_keys`): the same draws at any batch size. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from invjax import analyze
from invjax import augment
from invjax import build as build_lib
from invjax import steps
from invjax import workdirs

FLAGS = flags.FLAGS


def copy_keys(key: jax.Array, copy: int, indices: jax.Array) -> jax.Array:
  """The keys of copy `copy` of the images at `indices` of the test set."""
  k = jax.random.fold_in(key, copy)
  return jax.vmap(lambda i: jax.random.fold_in(k, i))(indices)


def augment_copy(key, copy, indices, images, ranges: augment.AugmentRanges):
  """Copy `copy` of float `images` [N, H, W, C] (test-set `indices` [N]): each image
  augmented on its own key (`copy_keys`)."""
  return augment.augment_with_keys(copy_keys(key, copy, indices), images, ranges)


def make_batch_fn(copies: int, ranges: augment.AugmentRanges):
  """(state, uint8 images, test-set indices, key) -> (clean softmax [N, C], softmax of
  each copy [copies, N, C]), eval mode."""

  @jax.jit
  def fn(state, images, indices, key):
    x = steps.to_float(images)
    probs = lambda v: jax.nn.softmax(steps.eval_logits(state, v).astype(jnp.float32))
    moved = [probs(augment_copy(key, r, indices, x, ranges)) for r in range(copies)]
    return probs(x), jnp.stack(moved)

  return fn


def evaluate(state, images: np.ndarray, labels: np.ndarray, copies: int,
             ranges: augment.AugmentRanges, seed: int, batch_size: int) -> dict:
  """{"clean", "averaged", "per_copy": [copies], "copies"}: accuracies on the test
  images, clean, with the softmax averaged over the copies, and of each copy alone."""
  fn, key = make_batch_fn(copies, ranges), jax.random.key(seed)
  clean, moved = [], []
  for start in range(0, len(images), batch_size):
    idx = np.arange(start, min(start + batch_size, len(images)))
    c, m = jax.device_get(fn(state, images[idx], idx, key))
    clean.append(c)
    moved.append(m)
  clean, moved = np.concatenate(clean), np.concatenate(moved, axis=1)
  right = lambda p: float(np.mean(np.argmax(p, -1) == labels))
  return {"clean": right(clean), "averaged": right(moved.mean(axis=0)),
          "per_copy": [right(p) for p in moved], "copies": copies}


def evaluate_run(directory: str, copies: int, preset: str, seed: int, batch_size: int,
                 dataset: str | None = None) -> dict:
  """`evaluate` of the run in `directory` (a workdir or a record), on its test set."""
  config = workdirs.load_config(directory)
  if dataset:
    with config.unlocked():
      config.dataset = dataset
  run = build_lib.build(config)  # checks the config first
  _, _, state, step = analyze.restore(config, directory, run=run)
  out = evaluate(state, run.data.x_test, run.data.y_test, copies,
                 augment.PRESETS[preset], seed, batch_size)
  return {"run": directory, "variant": config.variant, "step": int(step),
          "preset": preset, "seed": seed, **out}


def markdown(results: list[dict], command: str) -> str:
  lines = ["# Test-time averaging", "", f"- command: `{command}`",
           f"- {results[0]['copies']} copies ({results[0]['preset']} preset, seed "
           f"{results[0]['seed']}), the softmax averaged; eval mode", "",
           "| run | step | clean | averaged | each copy alone |",
           "| --- | ---: | ---: | ---: | --- |"]
  for r in results:
    lines.append(f"| {r['run']} ({r['variant']}) | {r['step']} | {r['clean']:.4f} | "
                 f"{r['averaged']:.4f} | "
                 + ", ".join(f"{a:.4f}" for a in r["per_copy"]) + " |")
  return "\n".join(lines) + "\n"


def _define_flags():
  """The command line's flags, defined only when this runs as a program (the tests
  import the module beside other experiments, whose flags share names)."""
  flags.DEFINE_integer("copies", 3, "Augmented copies of each test image (the "
                       "authors': 3).")
  flags.DEFINE_enum("preset", "light", list(augment.PRESETS),
                    "The copies' augmentation (augment.PRESETS; the authors' test: "
                    "light).")
  flags.DEFINE_integer("seed", 0, "Seed of the copies' augmentations.")
  flags.DEFINE_integer("batch_size", 500, "Test images per forward pass.")
  common.define_dataset_and_out_flags()


def main(argv):
  common.over_runs(
      argv, lambda d: evaluate_run(d, FLAGS.copies, FLAGS.preset, FLAGS.seed,
                                   FLAGS.batch_size, FLAGS.dataset),
      markdown, lambda r: f"clean {r['clean']:.4f}, averaged over {r['copies']} "
      f"{r['preset']} copies {r['averaged']:.4f}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
