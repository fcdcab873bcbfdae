"""How much the choice of Eq. 3's denominator changes L_inv on trained runs.

  python -m experiments.denominators DIR [DIR ...] [--dataset=data/cifar10.npz]
  python -m experiments.denominators experiments/results/records/allcnn_cifar10/paper/* \
      --dataset=data/cifar10.npz --out=experiments/results/paper/denominators

The paper's text divides the within-seed mean distance by the mean over every pair of
the batch; the authors' training code divides it by the mean over the pairs of the same
class (`losses.DENOMINATORS`). For each run (a workdir or a run record) this measures,
layer by layer, L_inv under both on the same batches: --batches batches of --seeds test
images (the same images for every run) x --copies copies, augmented as the run trained,
eval mode. class / batch is how much larger the authors' loss is for the same
activations: the factor by which it multiplies that layer's weight alpha_l on the
within-seed term.

Writes OUT.md and OUT.json with --out.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import common
from invjax import api
from invjax import losses

FLAGS = flags.FLAGS


def measure(run: api.LoadedRun, images: np.ndarray, labels: np.ndarray, seeds: int,
            copies: int, batches: int, seed: int = 0) -> dict[str, dict[str, float]]:
  """{denominator: {layer: mean L_inv over the batches}} of `run`'s sown layers, on
  batches of `seeds` of `images` (taken in order) x `copies` training-style copies."""
  if len(images) < seeds * batches:
    raise ValueError(f"{seeds} seeds x {batches} batches need {seeds * batches} images, "
                     f"the test set has {len(images)}: lower --batches or --seeds.")
  layers = list(run.layer_shapes)
  method = run.config.loss_method
  fn = jax.jit(lambda feats, sc: {
      d: losses.grouped_invariance_losses(feats, copies, method,
                                          seed_classes=None if d == "batch" else sc)
      for d in losses.DENOMINATORS})
  sums = {d: {name: 0.0 for name in layers} for d in losses.DENOMINATORS}
  for i in range(batches):
    x, y = images[i * seeds:(i + 1) * seeds], labels[i * seeds:(i + 1) * seeds]
    c = run.augmented_copies(x, copies, seed=seed + i)
    acts = run.activations(c.reshape(seeds * copies, *c.shape[2:]), layers)
    inv = jax.device_get(fn({k: acts[k] for k in layers}, np.asarray(y, np.int32)))
    for d in sums:
      for name in layers:
        sums[d][name] += float(inv[d][name]) / batches
  return sums


def markdown(results: list[dict], command: str, seeds: int, copies: int,
             batches: int) -> str:
  lines = ["# L_inv over every pair (the paper's text) and over same-class pairs "
           "(the authors' code)", "", f"- command: `{command}`",
           f"- {batches} batches of {seeds} test images x {copies} training-style "
           "copies each (the same images for every run), eval mode; the mean over "
           "the batches", ""]
  for r in results:
    lines += [f"## {r['run']} ({r['variant']}, step {r['step']})", "",
              "| layer | every pair | same class | same class / every pair |",
              "| --- | ---: | ---: | ---: |"]
    for name, b in r["batch"].items():
      c = r["class"][name]
      lines.append(f"| {name} | {b:.4f} | {c:.4f} | {c / b:.2f} |")
    lines.append("")
  return "\n".join(lines)


def _define_flags():
  flags.DEFINE_integer("seeds", 16, "Seed images per batch (the paper's 16).")
  flags.DEFINE_integer("copies", 8, "Copies of each seed (the paper's M = 8).")
  flags.DEFINE_integer("batches", 20, "Batches to average over.")
  flags.DEFINE_integer("seed", 0, "Seed of the copies' augmentations.")
  common.define_dataset_and_out_flags()


def measure_run(directory: str) -> dict:
  run = api.load_run(directory, dataset=FLAGS.dataset)
  inv = measure(run, run.data.x_test, run.data.y_test, FLAGS.seeds, FLAGS.copies,
                FLAGS.batches, FLAGS.seed)
  return {"run": directory, "variant": run.config.variant, "step": run.step,
          "denominator": run.config.get("invariance_denominator", "batch"), **inv}


def main(argv):
  common.over_runs(argv, measure_run, lambda results, command: markdown(
      results, command, FLAGS.seeds, FLAGS.copies, FLAGS.batches))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
