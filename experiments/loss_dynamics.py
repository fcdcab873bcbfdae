"""Figure 5: per-layer invariance loss over training of several runs.

  python experiments/loss_dynamics.py --run baseline=DIR_A --run invariance=DIR_B \
      --out=loss_dynamics.png

Plots the L_inv probe every run logs (a fixed batch of seeds x copies, eval mode, never
optimised, so the baseline is measured the same way), epochs on a quadratic axis.
--metric=train/inv_loss/ plots the optimised training-batch values instead (runs with
copies > 1 only).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # pylint: disable=g-import-not-at-top
from experiments import compare  # pylint: disable=g-import-not-at-top,unused-import (--out, --title)
from invjax import report  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("metric", "probe/inv_loss/", "Metric prefix to plot per layer.")


def main(argv):
  del argv
  runs = common.parse_runs(FLAGS.run)
  print("figure:", report.plot_loss_dynamics(runs, FLAGS.out, prefix=FLAGS.metric,
                                             title=FLAGS.title))


if __name__ == "__main__":
  app.run(main)
