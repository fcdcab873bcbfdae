"""Robustness of several trained runs side by side: clean, transformed, FGSM and PGD.

  python -m experiments.robustness --run baseline=DIR_A --run batchaug=DIR_B \
      --run invariance=DIR_C [--eps=2,8] [--examples=N] [--out=robustness.md]

Each DIR is a trained run (e.g. the quickstart's /tmp/invjax_quickstart/baseline). A
run whose report (DIR/analysis/robustness.json) is missing, of an older checkpoint or
of other attack settings is scored first (`python -m invjax.main --mode=robustness`);
its analysis too, if that is missing. Prints the accuracies side by side and writes
them as Markdown to --out, if given.
"""

import os

from absl import app
from absl import flags

from experiments import common
from invjax import checkpoints
from invjax import cli
from invjax import report
from invjax import robustness
from invjax import workdirs

FLAGS = flags.FLAGS
common.define_run_flag()
flags.DEFINE_list("eps", ["2", "8"], "L-inf radii of the attacks, in units of 1/255.")
flags.DEFINE_integer("examples", 0, "Attack and corrupt only the first N test images "
                     "(0 = all).")
flags.DEFINE_list("corruptions", ["none"], "Common corruptions: 'all', 'none' or names.")
flags.DEFINE_list("severities", ["1", "2", "3", "4", "5"], "Corruption severities, 1-5.")
flags.DEFINE_enum("corruption_source", "auto", ["auto", "official", "generated"],
                  "CIFAR-10-C from tfds, made by corrupt-tta, or auto (see "
                  "invjax/corruptions.py).")
flags.DEFINE_string("out", "", "Markdown file for the table (optional).")
flags.DEFINE_string("figure", "", "PNG of the accuracies and per-layer scores (optional).")
flags.mark_flag_as_required("run")


def _current(workdir: str, settings: robustness.Settings) -> bool:
  try:
    report = robustness.load(workdir)
  except FileNotFoundError:
    return False
  ckpts = checkpoints.Checkpoints(workdir)
  try:
    step = ckpts.latest_step()
  finally:
    ckpts.close()
  return report["step"] == step and report["settings"] == robustness.settings_dict(
      settings)


def main(argv):
  del argv
  try:
    settings = robustness.Settings(
        eps=FLAGS.eps, test_examples=FLAGS.examples, corruptions=FLAGS.corruptions,
        severities=FLAGS.severities, corruption_source=FLAGS.corruption_source)
    settings.check()
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  for name, path in (("--out", FLAGS.out), ("--figure", FLAGS.figure)):
    if path:  # before the attacks, which take minutes: a bad path fails now
      try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      except OSError as e:
        raise app.UsageError(f"{name}={path}: cannot create its directory ({e}).")
  reports = {}
  for label, workdir in common.parse_runs(FLAGS.run).items():
    if not _current(workdir, settings):
      robustness.robustness(workdirs.load_config(workdir), workdir, settings)
    reports[label] = robustness.load(workdir)
  table = robustness.table(reports)
  print(table)
  print(robustness.score_table(reports))
  if FLAGS.out:
    first = next(iter(reports.values()))
    with open(FLAGS.out, "w") as f:
      f.write(f"Test accuracy of {first['model']} on {first['dataset']} "
              f"({first['attacked_images']} of {first['test_images']} test images "
              f"attacked; PGD: {settings.pgd_steps} steps of "
              f"{settings.pgd_step_size:g}/255, random start)\n\n")
      f.write(robustness.markdown(reports) + "\n")
      f.write("\n```\n" + robustness.score_table(reports) + "\n```\n")
    print("table:", FLAGS.out)
  if FLAGS.figure:
    first = next(iter(reports.values()))
    print("figure:", report.plot_robustness(
        reports, FLAGS.figure, f"robustness, {first['model']} on {first['dataset']}"))


if __name__ == "__main__":
  cli.run(main)  # refused input as a short message and exit status 2
