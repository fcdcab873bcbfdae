"""Tiny ImageNet (200 classes of 64x64 images) as a tensorflow-datasets builder.

The data set is the official `tiny-imagenet-200.zip` of Stanford's CS231n. Preparing reads
the zip directly, without extracting it:
  - the 200 class ids (WordNet ids, e.g. n01443537) from `wnids.txt`, in its order, which
    fixes the integer labels;
  - "train": 500 images per class from `train/<wnid>/images/*.JPEG`;
  - "validation": 10,000 images from `val/images/`, labelled by `val_annotations.txt`.
    This is the paper's test set (the zip's own test images carry no labels).
The images are stored decoded and losslessly re-encoded (PNG); the few greyscale JPEGs
of the data set become RGB, so every example is uint8 [64, 64, 3].

The zip is taken from the manual directory (`config.manual_dir`, by default tfds's
`<data_dir>/downloads/manual`) and otherwise downloaded where there is a network.
"""

from __future__ import annotations

import io
import os
import posixpath
import zipfile

import numpy as np
import tensorflow_datasets as tfds

ZIP_NAME = "tiny-imagenet-200.zip"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
IMAGE_SHAPE = (64, 64, 3)


def _instructions(manual_dir) -> str:
  where = manual_dir or "<data_dir>/downloads/manual"
  return (f"Put {ZIP_NAME} (from {URL}) in the manual directory {where} "
          "(or name another directory with --config.manual_dir=DIR), then run again. "
          "The zip is read as it is; do not extract it.")


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny ImageNet 200: train (100,000) and validation (10,000) images."""

  name = "tiny_imagenet"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version: train and labelled validation splits."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(None)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE),
            # The names (WordNet ids) come from the zip's wnids.txt when preparing.
            "label": tfds.features.ClassLabel(),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="http://cs231n.stanford.edu/",
    )

  def _zip_path(self, dl_manager) -> str:
    try:
      manual = dl_manager.manual_dir  # raises if the directory is missing or empty
    except AssertionError:
      manual = None
    if manual is not None and (manual / ZIP_NAME).exists():
      return os.fspath(manual / ZIP_NAME)
    manual_dir = getattr(dl_manager, "_manual_dir", None)
    try:
      return os.fspath(self._download(dl_manager))
    except Exception as e:  # pylint: disable=broad-except
      raise FileNotFoundError(
          f"Tiny ImageNet: {ZIP_NAME} is not in the manual directory and could not be "
          f"downloaded ({type(e).__name__}: {e}). {_instructions(manual_dir)}") from e

  def _download(self, dl_manager):
    return dl_manager.download(URL)

  def _split_generators(self, dl_manager):
    path = self._zip_path(dl_manager)
    root, wnids = read_wnids(path)
    self.info.features["label"].names = wnids
    return {
        "train": self._generate_examples(path, root, "train"),
        "validation": self._generate_examples(path, root, "validation"),
    }

  def _generate_examples(self, path, root, split):
    with zipfile.ZipFile(path) as zf:
      for file_name, wnid in _split_members(zf, root, split):
        image = decode_rgb(zf.read(file_name))
        base = posixpath.basename(file_name)
        yield base, {"image": image, "label": wnid, "file_name": base}


def read_wnids(path) -> tuple[str, list[str]]:
  """(folder inside the zip that holds wnids.txt, the class ids in file order)."""
  with zipfile.ZipFile(path) as zf:
    candidates = sorted((n for n in zf.namelist()
                         if posixpath.basename(n) == "wnids.txt" and n.count("/") <= 1),
                        key=len)
    if not candidates:
      raise ValueError(f"{path} has no wnids.txt at its top level; it is not the "
                       f"official {ZIP_NAME}.")
    root = posixpath.dirname(candidates[0])
    wnids = [w.strip() for w in zf.read(candidates[0]).decode().splitlines()
             if w.strip()]
  if len(set(wnids)) != len(wnids):
    raise ValueError(f"{path}: wnids.txt lists a class id twice.")
  return root, wnids


def _split_members(zf: zipfile.ZipFile, root: str, split: str):
  """(member name, wnid) of every labelled image of a split, in a fixed order."""
  join = lambda *p: posixpath.join(root, *p) if root else posixpath.join(*p)
  if split == "train":
    prefix = join("train") + "/"
    for name in sorted(zf.namelist()):
      parts = name[len(prefix):].split("/") if name.startswith(prefix) else []
      # train/<wnid>/images/<file>.JPEG (the boxes files beside them are skipped)
      if len(parts) == 3 and parts[1] == "images" and parts[2]:
        yield name, parts[0]
  else:
    annotations = zf.read(join("val", "val_annotations.txt")).decode()
    for line in sorted(annotations.splitlines()):
      fields = line.split("\t")
      if len(fields) >= 2:
        yield join("val", "images", fields[0]), fields[1]


def decode_rgb(data: bytes) -> np.ndarray:
  """JPEG (or any PIL-readable) bytes -> uint8 [64, 64, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as im:
    arr = np.asarray(im.convert("RGB"), np.uint8)
  if arr.shape != IMAGE_SHAPE:
    raise ValueError(f"Tiny ImageNet image of shape {arr.shape}, expected {IMAGE_SHAPE}.")
  return arr
