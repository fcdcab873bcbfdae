"""Command line: train, analyze or describe one run.

  python -m invjax.main --config=configs/allcnn.py --workdir=DIR [--config.FIELD=VALUE]
  python -m invjax.main --config=configs/allcnn.py --workdir=DIR --mode=analyze
  python -m invjax.main --config=configs/allcnn.py --workdir=DIR --mode=train_and_analyze
  python -m invjax.main --workdir=DIR --mode=robustness  # accuracy under attacks
  python -m invjax.main --config=configs/allcnn.py --mode=describe

The same command runs on every host of a multi-host run (a TPU pod slice: `gcloud
compute tpus tpu-vm ssh ... --worker=all --command=...`); see `invjax.distributed` for
--distributed, --coordinator_address, --num_processes and --process_id.

A refused input (config, data, workdir, checkpoint) prints `error: ...` naming the
field or file, the value and the fix, and exits with status 2 (`--verbose` adds the
traceback); see `invjax.cli`.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from invjax import analyze as analyze_lib
from invjax import cli
from invjax import compilation_cache
from invjax import describe as describe_lib
from invjax import distributed
from invjax import report
from invjax import robustness as robustness_lib
from invjax import train
from invjax import workdirs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/allcnn.py or configs/allcnn.py:baseline. With "
    "--mode=analyze or robustness it defaults to the config saved in the workdir.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory of the run: config, metrics, "
                    "checkpoints, figures. Rerunning on it resumes. With several "
                    "hosts, one directory all of them see (NFS, Filestore, or a bucket "
                    "mounted with gcsfuse).")
flags.DEFINE_enum("mode", "train", ["train", "analyze", "train_and_analyze", "robustness",
                                    "describe"],
                  "train (default), analyze (invariance scores of the latest "
                  "checkpoint), train_and_analyze (both, one start-up), robustness "
                  "(accuracy on clean, transformed and attacked test images) or "
                  "describe (model summary, no training).")
flags.DEFINE_list("robustness_eps", ["2", "8"],
                  "With --mode=robustness: the L-inf radii of the FGSM and PGD attacks, "
                  "in units of 1/255 of the pixel range.")
flags.DEFINE_integer("robustness_examples", 0,
                     "With --mode=robustness: attack and corrupt only the first N test "
                     "images (0 = all).")
flags.DEFINE_list("robustness_corruptions", ["none"],
                  "With --mode=robustness: common corruptions to test, 'all' (CIFAR-10-C's "
                  "15), 'none', or names (gaussian_noise,fog,...); see "
                  "invjax/corruptions.py.")
flags.DEFINE_list("robustness_severities", ["1", "2", "3", "4", "5"],
                  "With --mode=robustness: corruption severities, 1-5.")
flags.DEFINE_enum("robustness_corruption_source", "auto", ["auto", "official", "generated"],
                  "With --mode=robustness: CIFAR-10-C from tfds ('official'), made from "
                  "the run's test set by corrupt-tta ('generated'), or 'auto': official "
                  "for tfds's cifar10, generated otherwise.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir even though its saved config differs.")
flags.DEFINE_bool("tensorboard", True,
                  "Write TensorBoard summaries (clu). --notensorboard skips them and "
                  "clu's import of TensorFlow (seconds of start-up); metrics.jsonl and "
                  "the log still get every metric.")
distributed.define_flags()
compilation_cache.define_flags()


def _compilation_cache():
  try:
    compilation_cache.configure()  # before anything compiles
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli.config_flag("config")
  if config is None and FLAGS.mode in ("analyze", "robustness") and FLAGS.workdir:
    config = workdirs.load_config(FLAGS.workdir)  # the config the run was trained with
  if config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/allcnn.py).")
  if FLAGS.mode == "describe":
    _compilation_cache()
    print(describe_lib.format_description(describe_lib.describe(config), config))
    return
  if not FLAGS.workdir:
    raise app.UsageError(f"--workdir is required for --mode={FLAGS.mode}.")
  try:
    distributed.initialize_from_flags()
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  _compilation_cache()  # after joining: only process 0 logs at info level
  if FLAGS.mode in ("train", "train_and_analyze"):
    result = train.train_and_evaluate(config, FLAGS.workdir, FLAGS.allow_config_change,
                                      tensorboard=FLAGS.tensorboard)
    logging.info("training returned: %s", result)
    if not result["finished"]:
      if distributed.is_primary():
        print(f"stopped by the time limit (config.time_limit_minutes) at step "
              f"{result['step']}, with a checkpoint: rerun the same command to resume"
              + (" (and analyze)" if FLAGS.mode == "train_and_analyze" else ""))
      return
    if distributed.is_primary():
      print(f"test accuracy {result['accuracy']:.4f} after {result['step']} steps")
  if FLAGS.mode in ("analyze", "train_and_analyze"):
    summary = analyze_lib.analyze(config, FLAGS.workdir)
    if distributed.is_primary():
      print(report.median_table({config.variant: summary}))
  if FLAGS.mode == "robustness":
    try:
      settings = robustness_lib.Settings(
          eps=FLAGS.robustness_eps, test_examples=FLAGS.robustness_examples,
          corruptions=FLAGS.robustness_corruptions,
          severities=FLAGS.robustness_severities,
          corruption_source=FLAGS.robustness_corruption_source)
      settings.check()
    except ValueError as e:
      raise app.UsageError(f"--robustness_*: {e}") from e
    result = robustness_lib.robustness(config, FLAGS.workdir, settings)
    if distributed.is_primary():
      print(robustness_lib.table({config.variant: result}))
      print(robustness_lib.score_table({config.variant: result}))


if __name__ == "__main__":
  cli.run(main)
