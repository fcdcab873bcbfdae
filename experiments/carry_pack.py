"""The CIFAR-10 pack as an accelerator call carries it: the JPEG pack compressed with xz,
beside a copy of its decode.py, all of it or a part.

  python -m experiments.carry_pack                          # data/ -> workdirs/carry_data/ (18 MB)
  python -m experiments.carry_pack --train=2000 --out=workdirs/attack_data   # (3.6 MB)
  OUT=$OUT PAPER_DATA=workdirs/carry_data bash experiments/gpu_window.sh paper

What one call carries is limited to 64 MiB, and the pack as ../shared/tools/gpu-prepare.sh
copies it takes 56 MB of that. Its 60,000 JPEG files are small and share their headers
(quantisation and Huffman tables), which xz finds: the same bytes come to 18 MB, and
unpack in about a second. That leaves room for the committed records' weights, or a
stopped run's checkpoint to resume. The window's `paper` phase unpacks the folder
(`--unpack=DIR`) before decode.py reads it.

--train=N keeps the first N training images and every test image: a window that only
attacks the committed records needs the test set; experiments/window.py reads the
training images only for the data check of the records' configs (a dispatch of 78 steps
of 16 seeds needs 1,248).
"""

from __future__ import annotations

import io
import lzma
import os
import shutil

from absl import app
from absl import flags
import numpy as np

PACK = "cifar10_jpeg.npz"
PACKED = PACK + ".xz"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flags (defined only when run as a script: tests import this beside
  scripts that define --out too)."""
  flags.DEFINE_string("pack", f"data/{PACK}", "The full JPEG pack "
                      "(../shared/tools/gpu-prepare.sh puts it in data/).")
  flags.DEFINE_string("out", "workdirs/carry_data", f"Folder for {PACKED} and "
                      "decode.py: the path to carry.")
  flags.DEFINE_integer("train", None, "Training images kept (the first ones; default "
                       "all).")
  flags.DEFINE_string("unpack", None, f"Instead: unpack DIR/{PACKED} into DIR/{PACK}, "
                      "for decode.py beside it (nothing to do if it is there).")

def subset(pack, train: int | None) -> dict:
  """The pack's arrays with only the first `train` training images (None: all) and
  every test image, each image's JPEG bytes unchanged."""
  arrays = {k: pack[k] for k in pack.files}
  n = len(arrays["train_offsets"]) - 1
  if train is None:
    return arrays
  if not 0 < train <= n:
    raise ValueError(f"--train={train}: the pack has {n} training images; keep 1 .. {n}.")
  offsets = arrays["train_offsets"][:train + 1]
  arrays["train_offsets"] = offsets
  arrays["train_jpeg"] = arrays["train_jpeg"][:offsets[-1]]
  arrays["train_labels"] = arrays["train_labels"][:train]
  return arrays


def write(arrays: dict, folder: str) -> str:
  """`arrays` as an .npz compressed with xz, FOLDER/cifar10_jpeg.npz.xz; its path."""
  os.makedirs(folder, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  path = os.path.join(folder, PACKED)
  with lzma.open(path + ".part", "wb", preset=6) as f:
    f.write(buf.getbuffer())
  os.replace(path + ".part", path)
  return path


def unpack(folder: str) -> str:
  """FOLDER/cifar10_jpeg.npz, from FOLDER/cifar10_jpeg.npz.xz unless it is there."""
  plain, packed = os.path.join(folder, PACK), os.path.join(folder, PACKED)
  if os.path.exists(plain):
    return plain
  if not os.path.exists(packed):
    raise FileNotFoundError(f"{folder} holds neither {PACK} nor {PACKED}: carry the folder "
                            "`python -m experiments.carry_pack --out=...` wrote, or the one "
                            "gpu-prepare.sh filled (PAPER_DATA names it).")
  with lzma.open(packed) as src, open(plain + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 22)
  os.replace(plain + ".part", plain)
  return plain


def main(argv):
  del argv
  if FLAGS.unpack is not None:
    try:
      path = unpack(FLAGS.unpack)
    except FileNotFoundError as e:
      raise app.UsageError(str(e)) from e
    print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB")
    return
  if not os.path.exists(FLAGS.pack):
    raise app.UsageError(f"--pack={FLAGS.pack} does not exist: run "
                         "`bash ../shared/tools/gpu-prepare.sh` in the repository root, "
                         f"or point --pack at {PACK}.")
  decoder = os.path.join(os.path.dirname(FLAGS.pack), "decode.py")
  if not os.path.exists(decoder):
    raise app.UsageError(f"{decoder} (the pack's decoder) is missing beside --pack.")
  with np.load(FLAGS.pack) as pack:
    try:
      arrays = subset(pack, FLAGS.train)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  path = write(arrays, FLAGS.out)
  shutil.copy(decoder, os.path.join(FLAGS.out, "decode.py"))
  print(f"{path}: {len(arrays['train_labels']):,} training and "
        f"{len(arrays['test_labels']):,} test images, {os.path.getsize(path) / 2**20:.1f} "
        f"MiB (from {os.path.getsize(FLAGS.pack) / 2**20:.1f}); carry {FLAGS.out!r} (with "
        f"'.whl') and run the window's paper phase with PAPER_DATA={FLAGS.out}.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
