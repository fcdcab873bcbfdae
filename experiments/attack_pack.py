"""A small CIFAR-10 pack for a window that attacks the committed records instead of
training: every test image and the first --train training images, in the JPEG pack's
own format, beside a copy of its decode.py.

  python -m experiments.attack_pack            # data/ -> workdirs/attack_data/ (~11 MB)
  OUT=$OUT PAPER_DATA=workdirs/attack_data bash experiments/gpu_window.sh paper

What one accelerator call carries is limited to 64 MiB: the whole pack (56 MB) and the
committed records with their weights (21 MB) do not fit together, and a window that
only attacks needs the test set. experiments/window.py skips the finished records and
attacks each one that has weights and no robustness report, on every test image; the
training images are there only for the data check of the records' configs (a dispatch
of 78 steps of 16 seeds needs 1,248).
"""

from __future__ import annotations

import os
import shutil

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("pack", "data/cifar10_jpeg.npz", "The full JPEG pack "
                    "(../shared/tools/gpu-prepare.sh puts it in data/).")
flags.DEFINE_string("attack_data", "workdirs/attack_data", "Folder for the small pack "
                    "(cifar10_jpeg.npz) and decode.py: the path to carry.")
flags.DEFINE_integer("train", 2000, "Training images kept (the first ones).")

SPLITS = ("train", "test")


def subset(pack, train: int) -> dict:
  """The pack's arrays with only the first `train` training images (every test image),
  each image's JPEG bytes unchanged."""
  n = len(pack["train_offsets"]) - 1
  if not 0 < train <= n:
    raise ValueError(f"--train={train}: the pack has {n} training images; keep 1 .. {n}.")
  arrays = {k: pack[k] for k in pack.files}
  offsets = arrays["train_offsets"][:train + 1]
  arrays["train_offsets"] = offsets
  arrays["train_jpeg"] = arrays["train_jpeg"][:offsets[-1]]
  arrays["train_labels"] = arrays["train_labels"][:train]
  return arrays


def main(argv):
  del argv
  if not os.path.exists(FLAGS.pack):
    raise app.UsageError(f"--pack={FLAGS.pack} does not exist: run "
                         "`bash ../shared/tools/gpu-prepare.sh` in the repository root, "
                         "or point --pack at cifar10_jpeg.npz.")
  decoder = os.path.join(os.path.dirname(FLAGS.pack), "decode.py")
  if not os.path.exists(decoder):
    raise app.UsageError(f"{decoder} (the pack's decoder) is missing beside --pack.")
  with np.load(FLAGS.pack) as pack:
    try:
      arrays = subset(pack, FLAGS.train)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  os.makedirs(FLAGS.attack_data, exist_ok=True)
  out = os.path.join(FLAGS.attack_data, "cifar10_jpeg.npz")
  np.savez(out, **arrays)
  shutil.copy(decoder, os.path.join(FLAGS.attack_data, "decode.py"))
  print(f"{out}: {len(arrays['train_labels']):,} training and "
        f"{len(arrays['test_labels']):,} test images, {os.path.getsize(out) / 2**20:.1f} "
        f"MiB; carry {FLAGS.attack_data!r} (with '.whl') and run the window's paper "
        f"phase with PAPER_DATA={FLAGS.attack_data}.")


if __name__ == "__main__":
  app.run(main)
