"""Invariance scores (Eq. 2) split by transformation: which of the scoring scheme's
transformations a run's layers are not invariant to.

  python -m experiments.score_by_transform DIR [DIR ...] [--dataset=data/cifar10.npz]
  python -m experiments.score_by_transform experiments/results/records/allcnn_cifar10/paper/{baseline,invariance} \
      --dataset=data/cifar10.npz --images=1000 --out=experiments/results/paper/score_by_transform

For each run (a workdir or a run record) and each part, the median score of every layer
over the first --images test images x --copies transformed copies: "all" is the run's
scoring scheme (every transformation at once, `--mode=analyze`'s), "no flip" the same
without the flip, and each other part one transformation alone, at the scheme's
extremes (the run's training ranges halved; the flip always on). Evaluation only.

Writes OUT.md and OUT.json with --out.
"""

from __future__ import annotations

import dataclasses
from absl import app
from absl import flags
import numpy as np

from experiments import common
from invjax import api
from invjax import augment

FLAGS = flags.FLAGS

# The transformations of augment.AugmentRanges that the scoring scheme applies.
TRANSFORMS = ("flip", "translate", "scale", "rotation", "shear", "contrast",
              "brightness")


def parts(ranges: augment.AugmentRanges) -> dict[str, augment.AugmentRanges]:
  """{part: training-style ranges} whose scoring transformations are the part: "all"
  (`ranges`), "no flip", and each transformation of TRANSFORMS alone (the flip with
  probability 1); parts the ranges leave off are left out."""
  none = dataclasses.replace(ranges, cutout=0.0,
                             **{t: 0.0 for t in TRANSFORMS})
  out = {"all": ranges, "no flip": dataclasses.replace(ranges, flip=0.0)}
  for t in TRANSFORMS:
    if getattr(ranges, t) > 0:
      out[t] = dataclasses.replace(none, **{t: 1.0 if t == "flip" else
                                            getattr(ranges, t)})
  return out


def medians(run: api.LoadedRun, images: np.ndarray, copies: int,
            seed: int = 0) -> dict[str, dict[str, float]]:
  """{part: {layer: median score}} of `run` on `images` (see `parts`)."""
  out = {}
  for name, ranges in parts(run.ranges).items():
    transform = lambda key, x, r=ranges: augment.augment_each(key, x, r, scoring=True)
    scores = run.invariance_scores(images, num_transforms=copies, seed=seed,
                                   transform=transform)
    out[name] = {layer: float(np.median(s)) for layer, s in scores.items()}
  return out


def markdown(results: list[dict], command: str, images: int, copies: int) -> str:
  lines = ["# Median invariance score by transformation", "", f"- command: `{command}`",
           f"- the first {images} test images x {copies} transformed copies each; "
           "\"all\" is the scoring scheme, each other column one transformation alone "
           "at the scheme's extremes (\"no flip\": all but the flip)", ""]
  for r in results:
    names = list(r["medians"])
    layers = list(r["medians"]["all"])
    lines += [f"## {r['run']} ({r['variant']}, step {r['step']})", "",
              "| layer | " + " | ".join(names) + " |",
              "| --- |" + " ---: |" * len(names)]
    for layer in layers:
      lines.append(f"| {layer} | " + " | ".join(
          f"{r['medians'][n][layer]:.3f}" for n in names) + " |")
    lines.append("")
  return "\n".join(lines)


def _define_flags():
  flags.DEFINE_integer("images", 1000, "Test images scored (the first ones); they are "
                       "also Eq. 2's reference set.")
  flags.DEFINE_integer("copies", 5, "Transformed copies of each image (the paper's 5).")
  flags.DEFINE_integer("seed", 0, "Seed of the transformations.")
  common.define_dataset_and_out_flags()


def measure_run(directory: str) -> dict:
  run = api.load_run(directory, dataset=FLAGS.dataset)
  images = run.data.x_test[:FLAGS.images]
  return {"run": directory, "variant": run.config.variant, "step": run.step,
          "images": len(images),
          "medians": medians(run, images, FLAGS.copies, FLAGS.seed)}


def main(argv):
  common.over_runs(argv, measure_run, lambda results, command: markdown(
      results, command, results[0]["images"], FLAGS.copies))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
