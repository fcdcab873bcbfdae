"""What a run's logging, evaluation, probe and checkpoint cadence cost beside its steps.

  python -m experiments.overheads                       # quickstart-sized, on this machine
  python -m experiments.overheads --cadences=pure,window --epochs=30

Trains the quickstart's invariance model (All-CNN-C at 1/8 width on the embedded digits)
once per cadence, in fresh workdirs, and prints each run's wall time beside its run
card's split (invjax/run_card.py): the cost of a cadence is its wall time over the
`pure` run's (logs, evaluation and checkpoint at the end only). Then it times, on the
full-size All-CNN-C train state (1.37 M parameters and their momentum: 11 MB), one
Orbax checkpoint save (the blocking part and the whole write) and the weights.npz
export, which cost the same host time on any accelerator.

The figures are for the machine it runs on; on an accelerator the steps are far
shorter, so what counts there is each event's host time x the number of events
(README, "Run records and accelerator windows").
"""

import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

from experiments import paper
from invjax import build as build_lib
from invjax import checkpoints
from invjax import run_card
from invjax import train

FLAGS = flags.FLAGS
CADENCES = {
    # name: (log_every_steps, eval_every_epochs, checkpoint_every_epochs); None: at the
    # end only
    "pure": (None, None, None),
    "quickstart": (21, 5.0, 1),  # configs/quickstart.py
    "base": (50, 1.0, 1),  # config_lib.base_config(): what the paper configs use
    "window": ("epoch", 10.0, 25),  # experiments/window.py
}
flags.DEFINE_list("cadences", list(CADENCES), f"Of {list(CADENCES)}.")
flags.DEFINE_float("epochs", 30.0, "Epochs of each run (the quickstart's: 30).")
flags.DEFINE_integer("saves", 5, "Checkpoint saves of the full-size state to time.")


def _config(cadence: str):
  config = paper.load_config_module("configs/quickstart.py").get_config("invariance")
  log, eval_epochs, ckpt_epochs = CADENCES[cadence]
  with config.unlocked():
    config.lr_boundaries = tuple(b * FLAGS.epochs / config.num_epochs
                                 for b in config.lr_boundaries)
    config.num_epochs = FLAGS.epochs
  return config, log, eval_epochs, ckpt_epochs


def time_cadences(root: str) -> None:
  print("| cadence | log / eval / checkpoint | wall s | startup | compile | train | "
        "evaluation | log | checkpoint | wall - startup - compile, over pure |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  pure = None
  for cadence in FLAGS.cadences:
    config, log, eval_epochs, ckpt_epochs = _config(cadence)
    run = build_lib.build(config)
    total, spe = run.total_steps, run.steps_per_epoch
    with config.unlocked():
      config.log_every_steps = total if log is None else spe if log == "epoch" else log
      config.eval_every_epochs = config.num_epochs if eval_epochs is None else eval_epochs
      config.checkpoint_every_steps = total if ckpt_epochs is None else ckpt_epochs * spe
    workdir = os.path.join(root, cadence)
    t = time.perf_counter()
    train.train_and_evaluate(config, workdir, data=run.data, tensorboard=False)
    wall = time.perf_counter() - t
    s = run_card.read(workdir)["seconds"]
    loop = wall - s["startup"] - s["compile"]
    pure = loop if cadence == "pure" else pure
    ratio = f"{loop / pure:.3f}" if pure else "-"
    print(f"| {cadence} | {config.log_every_steps} steps / {config.eval_every_epochs:g} "
          f"ep / {config.checkpoint_every_steps} steps | {wall:.1f} | "
          f"{s['startup']:.1f} | {s['compile']:.1f} | {s['train']:.1f} | "
          f"{s['evaluation']:.2f} | {s['log']:.2f} | {s['checkpoint']:.2f} | {ratio} |",
          flush=True)


def time_full_size_saves(root: str) -> None:
  config = paper.cell_config("allcnn_cifar10", "invariance", paper.Scale())
  model = build_lib.create_model(config, 10)
  import jax  # pylint: disable=g-import-not-at-top
  from invjax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  tx = steps_lib.create_optimizer(lambda s: 0.01, 0.9, True)
  state = steps_lib.create_train_state(jax.random.key(0), model, (32, 32, 3), tx)
  nbytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.batch_stats,
                                                  state.opt_state)))
  ckpts = checkpoints.Checkpoints(os.path.join(root, "full"), max_to_keep=3)
  blocking, whole = [], []
  for i in range(FLAGS.saves):
    t = time.perf_counter()
    ckpts.save(i + 1, state, force=True)
    blocking.append(time.perf_counter() - t)
    ckpts.manager.wait_until_finished()
    whole.append(time.perf_counter() - t)
  ckpts.close()
  t = time.perf_counter()
  path = os.path.join(root, "weights.npz")
  checkpoints.save_weights(path, state, 0)
  export = time.perf_counter() - t
  med = lambda v: sorted(v)[len(v) // 2]
  print(f"\nfull-size All-CNN-C train state, {nbytes / 1e6:.1f} MB: checkpoint save "
        f"blocking {1e3 * med(blocking):.0f} ms, whole write {1e3 * med(whole):.0f} ms "
        f"(median of {FLAGS.saves}); weights.npz {os.path.getsize(path) / 1e6:.1f} MB "
        f"in {1e3 * export:.0f} ms")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = tempfile.mkdtemp(prefix="invjax-overheads-")
  try:
    time_cadences(root)
    time_full_size_saves(root)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
