"""Invariance scores of several analyzed runs side by side (Figures 2-4 style).

  python -m experiments.compare --run baseline=DIR_A --run invariance=DIR_B \
      --out=compare.png

Each DIR must have been analyzed (python -m invjax.main --mode=analyze --workdir=DIR).
Prints test accuracy and per-layer median scores, and draws the box plots, pixel space
first, one colour per run.
"""

from absl import app
from absl import flags

from experiments import common
from invjax import analyze
from invjax import report

FLAGS = flags.FLAGS
common.define_run_flag()
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
