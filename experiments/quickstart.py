"""Quickstart: baseline and invariance All-CNN on the embedded digits, side by side.

  python -m experiments.quickstart --workdir=/tmp/invjax_quickstart

Trains both models (configs/quickstart.py, variants baseline and invariance; a rerun
resumes or reuses them), scores every layer's invariance on the test set, prints test
accuracy and per-layer median scores of both, and writes the comparison figures.
Extra --config.FIELD=VALUE overrides apply to both runs.
"""

import os
import time

from absl import flags
from ml_collections import config_flags

from invjax import cli
from invjax import compilation_cache
from invjax import distributed
from invjax import experiment

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/invjax_quickstart", "Where both runs go.")
flags.DEFINE_list("variants", ["baseline", "invariance"], "Which variants to train.")
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py"),
    "Base config; its variant is set per run.", lock_config=True)
distributed.define_flags()  # several processes: see invjax/distributed.py
compilation_cache.define_flags()  # --compilation_cache=DIR|off


def main(argv):
  del argv
  t0 = time.time()
  distributed.initialize_from_flags()
  compilation_cache.configure()  # before anything compiles
  result = experiment.compare_variants(cli.config_flag("config"), FLAGS.workdir,
                                       FLAGS.variants)
  if not distributed.is_primary():
    return
  print(result["table"])
  for path in result["figures"]:
    print("figure:", path)
  print(f"wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
  cli.run(main)  # app.run, with refused input as a short message and exit status 2
