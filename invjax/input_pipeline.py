"""Data: whole data sets as uint8 arrays in host memory, and the seed-image schedule.

Three sources, chosen by `config.dataset`:
  - "digits": scikit-learn's 1,797 handwritten digits (shipped with scikit-learn, no
    download), upsampled from 8x8 to 32x32x3 (or to the size `config.image_shape`
    declares, e.g. 16x16x3), with a fixed stratified train/test split.
  - a path ending in ".npz" with x_train, y_train, x_test, y_test (uint8 images
    [N, H, W, C] or [N, H, W]; integer labels), e.g. a decoded copy of CIFAR-10.
  - any other name: a tensorflow-datasets data set with "image" and "label" features,
    a "train" split and a test split (`config.test_split`, "test" by default), e.g.
    "cifar10", or one of invjax's own builders (`invjax.datasets`: "tiny_imagenet",
    whose test split is "validation"). TensorFlow is imported only here, and only for
    this source.

Augmentation happens on device in the train step; this module only picks which seed
images each step sees.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import numpy as np

from invjax import datasets as invjax_datasets
from invjax import distributed
from invjax import errors

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass
class Dataset:
  name: str
  x_train: np.ndarray  # uint8 [N, H, W, C]
  y_train: np.ndarray  # int32 [N]
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])

  def subset(self, train: int | None, test: int | None) -> "Dataset":
    """The first `train` / `test` examples (None or 0 keeps all)."""
    return dataclasses.replace(
        self, x_train=self.x_train[:train or None], y_train=self.y_train[:train or None],
        x_test=self.x_test[:test or None], y_test=self.y_test[:test or None])


def load(config) -> Dataset:
  """Loads the data set named by `config.dataset` (see the module docstring)."""
  name = config.dataset
  if name == "digits":
    shape = tuple(config.get("image_shape") or ())
    ds = load_digits(shape[0] if shape else 32)
  elif name.endswith(".npz"):
    ds = load_npz(name)
  else:
    ds = load_tfds(name, config.get("data_dir") or None,
                   manual_dir=config.get("manual_dir") or None,
                   test_split=config.get("test_split") or "test")
  return ds.subset(config.get("train_examples"), config.get("test_examples"))


def _to_rgb32(images8: np.ndarray, size: int = 32) -> np.ndarray:
  """[N, 8, 8] digits in 0..16 -> uint8 [N, size, size, 3], bilinear upsampling."""
  n, h, w = images8.shape
  # Pixel centres of the output in input coordinates (half-pixel convention).
  ys = (np.arange(size) + 0.5) * h / size - 0.5
  xs = (np.arange(size) + 0.5) * w / size - 0.5
  y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
  x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
  y1, x1 = np.clip(y0 + 1, 0, h - 1), np.clip(x0 + 1, 0, w - 1)
  wy = np.clip(ys - y0, 0, 1)[None, :, None]
  wx = np.clip(xs - x0, 0, 1)[None, None, :]
  img = images8.astype(np.float64)
  top = img[:, y0][:, :, x0] * (1 - wx) + img[:, y0][:, :, x1] * wx
  bottom = img[:, y1][:, :, x0] * (1 - wx) + img[:, y1][:, :, x1] * wx
  out = top * (1 - wy) + bottom * wy
  out = np.round(out / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
  return np.repeat(out[..., None], 3, axis=-1)


def load_digits(size: int = 32) -> Dataset:
  """The digits upsampled to size x size x 3 (8x8 originally)."""
  from sklearn import datasets as skdatasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  digits = skdatasets.load_digits()
  x = _to_rgb32(digits.images, size)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y)
  return Dataset("digits", x_train, y_train, x_test, y_test, num_classes=10)


def load_npz(path: str) -> Dataset:
  if not os.path.exists(path):
    raise errors.DataFileError(
        f"config.dataset={path!r}: no such file. Give the path of an .npz with "
        "x_train, y_train, x_test, y_test.")
  try:
    f = np.load(path, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
      raise ValueError("not an .npz")
    with f:
      missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
      if missing:
        raise errors.DataError(f"config.dataset={path!r} lacks the key(s) {missing}; an "
                               ".npz needs x_train, y_train, x_test, y_test.")
      arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
      names = f["label_names"] if "label_names" in f else None
  except errors.DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    size = os.path.getsize(path) if os.path.isfile(path) else None
    what = ("it is empty (0 bytes)" if size == 0 else
            "it is a directory" if size is None else
            _why_unreadable(path, e))
    raise errors.DataError(
        f"config.dataset={path!r} cannot be read: {what}. Give an .npz written by "
        "numpy.savez with x_train, y_train, x_test, y_test (uint8 images, integer "
        "labels).") from e
  for split in ("train", "test"):
    x = arrays[f"x_{split}"]
    if x.ndim == 3:
      x = x[..., None]
    if x.dtype != np.uint8 or x.ndim != 4:
      raise errors.DataError(f"{path}: x_{split} must be uint8 images [N, H, W, C] (or "
                       f"[N, H, W]), got {x.dtype} {x.shape}.")
    arrays[f"x_{split}"] = x
    y = arrays[f"y_{split}"]
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
      raise errors.DataError(f"{path}: y_{split} must be integer labels [{x.shape[0]}], got "
                       f"{y.dtype} {y.shape}.")
    arrays[f"y_{split}"] = y.astype(np.int32)
  num_classes = (len(names) if names is not None
                 else int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1)
  for split in ("train", "test"):
    y = arrays[f"y_{split}"]
    if y.min() < 0 or y.max() >= num_classes:
      raise errors.DataError(
          f"{path}: y_{split} has labels outside [0, {num_classes})" +
          (f" (the {num_classes} label_names)" if names is not None else "") +
          "; labels must be 0 .. num_classes - 1.")
  return Dataset(os.path.basename(path), num_classes=num_classes, **arrays)


def _why_unreadable(path: str, e: BaseException) -> str:
  """What is wrong with a file np.load could not read as an .npz, from its first bytes."""
  with open(path, "rb") as f:
    head = f.read(6)
  text = (str(e).splitlines() or [""])[0][:120]
  if head.startswith(b"PK\x03\x04"):
    if "allow_pickle" in text:
      return "it holds object (pickled) arrays; save plain numeric arrays"
    return f"it is truncated or damaged ({type(e).__name__}: {text})"
  if head == b"\x93NUMPY":
    return "it is a single .npy array, not an .npz archive of named arrays"
  return f"it is not an .npz: it does not begin as a zip archive does (first bytes {head!r})"


def load_tfds(name: str, data_dir: str | None, manual_dir: str | None = None,
              test_split: str = "test") -> Dataset:
  """A tensorflow-datasets image classification set, whole, as numpy.

  Prepares it first if needed (downloading, or from `manual_dir` for data sets that
  need a manual download, e.g. "tiny_imagenet").
  """
  # TensorFlow's C++ INFO and WARNING lines (oneDNN, GCS credentials) are not the
  # user's concern here; TF_CPP_MIN_LOG_LEVEL set by the user wins.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.DataUnavailable(
        f"config.dataset={name!r} is read with tensorflow-datasets, which needs "
        "TensorFlow (`pip install tensorflow-cpu tensorflow-datasets`). Without it, "
        "use config.dataset=digits or the path of an .npz copy.") from e
  tf.config.set_visible_devices([], "GPU")  # keep TensorFlow off the accelerators
  own = name in invjax_datasets.BUILDERS
  if own:
    importlib.import_module(invjax_datasets.BUILDERS[name])  # registers the builder
  if not own and name.split(":")[0] not in tfds.list_builders():
    raise errors.DataError(
        f"config.dataset={name!r} is not a known data set: use 'digits' (embedded), "
        f"the path of an .npz (ending in .npz), one of invjax's own "
        f"{sorted(invjax_datasets.BUILDERS)}, or a tensorflow-datasets name such as "
        "'cifar10' (tfds.list_builders() lists them).")
  builder = tfds.builder(name, data_dir=data_dir)
  # With several processes, process 0 prepares first, so that processes sharing a
  # data_dir do not write it at once; the others then find it prepared (or prepare
  # their own copy where each host has its own data_dir).
  if not distributed.is_primary():
    distributed.barrier("invjax: tfds data prepared by process 0")
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        try_download_gcs=not own))  # tfds's bucket has only its catalog's data sets
  except Exception as e:  # pylint: disable=broad-except
    if own:  # invjax's builders explain themselves (e.g. where the zip goes)
      raise
    raise errors.DataUnavailable(
        f"config.dataset={name!r} is not prepared in {builder.data_dir} and could not "
        f"be downloaded ({type(e).__name__}: {str(e)[:200]}). Either prepare it where "
        "there is a network and point --config.data_dir at that directory, put the "
        "archives tfds asks for in --config.manual_dir, or convert it to an .npz "
        "(x_train, y_train, x_test, y_test) and pass its path as --config.dataset."
        ) from e
  if distributed.is_primary():
    distributed.barrier("invjax: tfds data prepared by process 0")
  available = sorted(builder.info.splits)
  for split in ("train", test_split):
    if available and split not in available:
      raise errors.DataError(f"config.dataset={name!r} has no split {split!r}; its splits are "
                       f"{available}. Set config.test_split to the held-out one.")
  splits = {}
  for split in ("train", test_split):
    # Fixed-size batches, concatenated. (batch_size=-1 makes tfds ask for a batch of
    # sys.maxsize when it does not know the split size, e.g. under
    # tfds.testing.mock_data without metadata, and TensorFlow aborts the process.)
    ds = builder.as_dataset(split=split, as_supervised=True, batch_size=10_000)
    parts = list(tfds.as_numpy(ds))
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    splits[split] = (np.asarray(x, np.uint8), np.asarray(y, np.int32))
  num_classes = builder.info.features["label"].num_classes
  return Dataset(name, splits["train"][0], splits["train"][1], splits[test_split][0],
                 splits[test_split][1], num_classes=num_classes)
