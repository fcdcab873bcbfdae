"""Figure 5: per-layer invariance loss over training of several runs.

  python -m experiments.loss_dynamics --run baseline=DIR_A --run invariance=DIR_B \
      --out=loss_dynamics.png

Plots the L_inv probe every run logs (a fixed batch of seeds x copies, eval mode, never
optimised, so the baseline is measured the same way), epochs on a quadratic axis.
--metric=probe/inv_loss_same_class/ plots the probe's L_inv with Eq. 3's denominator
over same-class pairs (the authors' form; every run logs both), --metric=train/inv_loss/
the optimised training-batch values (runs with copies > 1 only).
"""

from absl import app
from absl import flags

from experiments import common
from experiments import compare  # pylint: disable=unused-import (--out, --title)
from invjax import report

FLAGS = flags.FLAGS
flags.DEFINE_string("metric", "probe/inv_loss/", "Metric prefix to plot per layer.")


def main(argv):
  del argv
  runs = common.parse_runs(FLAGS.run)
  print("figure:", report.plot_loss_dynamics(runs, FLAGS.out, prefix=FLAGS.metric,
                                             title=FLAGS.title))


if __name__ == "__main__":
  app.run(main)
