"""Invariance scores of several analyzed runs side by side (Figures 2-4 style).

  python experiments/compare.py --run baseline=DIR_A --run invariance=DIR_B \
      --out=compare.png

Each DIR must have been analyzed (python -m invjax.main --mode=analyze --workdir=DIR).
Prints test accuracy and per-layer median scores, and draws the box plots, pixel space
first, one colour per run.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # pylint: disable=g-import-not-at-top
from invjax import analyze  # pylint: disable=g-import-not-at-top
from invjax import report  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "invariance_scores.png", "Figure path.")
flags.DEFINE_string("title", "", "Figure title.")
flags.mark_flag_as_required("run")


def main(argv):
  del argv
  scores, summaries = {}, {}
  for label, workdir in common.parse_runs(FLAGS.run).items():
    scores[label], summaries[label] = analyze.load(workdir)
  print(report.median_table(summaries))
  print("figure:", report.plot_scores(scores, FLAGS.out, FLAGS.title))


if __name__ == "__main__":
  app.run(main)
