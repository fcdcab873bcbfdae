"""Tests for invjax/input_pipeline.py: digits, .npz, tfds (mocked, offline), seeds."""

import os

import ml_collections
import numpy as np
import pytest

from invjax import config_lib
from invjax import input_pipeline as ip


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
  return ip.load_digits()


@pytest.fixture(scope="module")
def sk_digits_split():
  """The original 8x8 images of each split, via the split call the module makes."""
  from sklearn import datasets, model_selection
  d = datasets.load_digits()
  idx = np.arange(len(d.target))
  i_train, i_test = model_selection.train_test_split(
      idx, test_size=0.25, random_state=0, stratify=d.target)
  return d, i_train, i_test


def test_digits_shapes_types_and_classes(digits):
  assert digits.x_train.dtype == np.uint8 and digits.x_test.dtype == np.uint8
  assert digits.x_train.shape == (1347, 32, 32, 3)
  assert digits.x_test.shape == (450, 32, 32, 3)
  assert digits.y_train.shape == (1347,) and digits.y_test.shape == (450,)
  assert np.issubdtype(digits.y_train.dtype, np.integer)
  assert digits.num_classes == 10
  assert digits.image_shape == (32, 32, 3)
  assert set(np.unique(digits.y_train)) == set(range(10))
  assert set(np.unique(digits.y_test)) == set(range(10))
  for x in (digits.x_train, digits.x_test):
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
  lo = min(digits.x_train.min(), digits.x_test.min())
  hi = max(digits.x_train.max(), digits.x_test.max())
  assert lo <= 5 and hi >= 250


def test_digits_deterministic(digits):
  again = ip.load_digits()
  for k in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(digits, k), getattr(again, k), err_msg=k)


def test_digits_at_the_declared_size_are_2x_bilinear(sk_digits_split):
  """image_shape=(16, 16, 3) gives 16x16 digits: each 8x8 pixel v[j] becomes the pair
  0.25 v[j-1] + 0.75 v[j], 0.75 v[j] + 0.25 v[j+1] (edges replicated), per axis."""
  config = config_lib.base_config()
  config.dataset, config.image_shape = "digits", (16, 16, 3)
  small = ip.load(config)
  assert small.x_train.shape == (1347, 16, 16, 3) and small.x_test.shape == (450, 16, 16, 3)
  d, i_train, _ = sk_digits_split

  def up(v, axis):
    v = np.moveaxis(v, axis, -1)
    p = np.concatenate([v[..., :1], v, v[..., -1:]], axis=-1)
    even = 0.25 * p[..., :-2] + 0.75 * p[..., 1:-1]
    odd = 0.75 * p[..., 1:-1] + 0.25 * p[..., 2:]
    out = np.stack([even, odd], axis=-1).reshape(*v.shape[:-1], 2 * v.shape[-1])
    return np.moveaxis(out, -1, axis)

  expected = up(up(d.images[i_train].astype(np.float64), 1), 2) / 16.0 * 255.0
  np.testing.assert_allclose(small.x_train[..., 0], np.round(expected), atol=1)
  np.testing.assert_array_equal(small.y_train, d.target[i_train])


def _filter_121(v):
  """Separable [1/8, 3/4, 1/8] filter with edge replication, over the last two axes."""
  p = np.pad(v, ((0, 0), (1, 1), (1, 1)), mode="edge")
  r = 0.125 * p[:, :-2] + 0.75 * p[:, 1:-1] + 0.125 * p[:, 2:]
  return 0.125 * r[:, :, :-2] + 0.75 * r[:, :, 1:-1] + 0.125 * r[:, :, 2:]


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_upsampling_matches_original(digits, sk_digits_split, split):
  d, i_train, i_test = sk_digits_split
  ii = i_train if split == "train" else i_test
  x = getattr(digits, f"x_{split}")[..., 0].astype(np.float64)
  np.testing.assert_array_equal(getattr(digits, f"y_{split}"), d.target[ii])
  block = x.reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))  # 4x4 block averages
  orig = d.images[ii] / 16.0 * 255.0
  mae = np.abs(block - orig).mean()
  assert mae < 20.0
  # The check discriminates: pairing each image with the wrong original is far off.
  assert np.abs(block - np.roll(orig, 1, axis=0)).mean() > 2 * mae
  # Sharper: half-pixel bilinear x4 followed by 4x4 averaging is exactly the separable
  # [1/8, 3/4, 1/8] filter of the original (edges replicated), up to uint8 rounding.
  assert np.abs(block - _filter_121(orig)).max() <= 0.5 + 1e-9


# ---------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------

def _write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def _valid_arrays(rng, n_train=6, n_test=4, shape=(5, 7, 3)):
  return dict(
      x_train=rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
      y_train=np.array([0, 1, 2, 1, 0, 2][:n_train], np.int64),
      x_test=rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
      y_test=np.array([2, 0, 1, 1][:n_test], np.int64),
  )


def test_load_npz_rgb(tmp_path):
  a = _valid_arrays(np.random.default_rng(0))
  path = _write_npz(tmp_path / "mine.npz", **a)
  ds = ip.load_npz(path)
  assert ds.name == "mine.npz"
  for k in ("x_train", "x_test"):
    assert getattr(ds, k).dtype == np.uint8
    np.testing.assert_array_equal(getattr(ds, k), a[k])
  for k in ("y_train", "y_test"):
    assert getattr(ds, k).dtype == np.int32
    np.testing.assert_array_equal(getattr(ds, k), a[k])
  assert ds.num_classes == 3  # max label + 1
  assert ds.image_shape == (5, 7, 3)


def test_load_npz_grayscale_and_label_names(tmp_path):
  rng = np.random.default_rng(1)
  a = _valid_arrays(rng, shape=(6, 4))
  path = _write_npz(tmp_path / "gray.npz", label_names=np.array(["a", "b", "c", "d", "e"]),
                    **a)
  ds = ip.load_npz(path)
  assert ds.x_train.shape == (6, 6, 4, 1) and ds.x_test.shape == (4, 6, 4, 1)
  np.testing.assert_array_equal(ds.x_train[..., 0], a["x_train"])
  np.testing.assert_array_equal(ds.x_test[..., 0], a["x_test"])
  assert ds.num_classes == 5  # from label_names, not max label + 1 (= 3)


def test_load_npz_num_classes_uses_both_splits(tmp_path):
  a = _valid_arrays(np.random.default_rng(2))
  a["y_test"] = np.array([0, 6, 1, 1], np.int32)  # the largest label only in test
  ds = ip.load_npz(_write_npz(tmp_path / "d.npz", **a))
  assert ds.num_classes == 7


def test_load_npz_missing_file(tmp_path):
  path = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    ip.load_npz(path)


@pytest.mark.parametrize("key", ["x_train", "y_train", "x_test", "y_test"])
def test_load_npz_missing_key(tmp_path, key):
  a = _valid_arrays(np.random.default_rng(3))
  del a[key]
  path = _write_npz(tmp_path / "d.npz", **a)
  with pytest.raises(ValueError, match=key):
    ip.load_npz(path)


def _bad(kind):
  a = _valid_arrays(np.random.default_rng(4))
  extra = {}
  if kind == "float_images":
    a["x_test"] = a["x_test"].astype(np.float32) / 255.0
    field = "x_test"
  elif kind == "images_5d":
    a["x_train"] = a["x_train"][:, None]
    field = "x_train"
  elif kind == "labels_wrong_length":
    a["y_train"] = a["y_train"][:-1]
    field = "y_train"
  elif kind == "labels_2d":
    a["y_test"] = a["y_test"][:, None]
    field = "y_test"
  elif kind == "float_labels":
    a["y_train"] = a["y_train"].astype(np.float32)
    field = "y_train"
  elif kind == "label_beyond_names":
    extra["label_names"] = np.array(["a", "b"])  # labels go up to 2
    field = "y_train"  # the first split checked that holds label 2
  elif kind == "negative_label":
    a["y_test"] = np.array([0, -1, 1, 1], np.int64)
    field = "y_test"
  else:
    raise AssertionError(kind)
  return a, extra, field


@pytest.mark.parametrize("kind", ["float_images", "images_5d", "labels_wrong_length",
                                  "labels_2d", "float_labels", "label_beyond_names",
                                  "negative_label"])
def test_load_npz_refusals(tmp_path, kind):
  a, extra, field = _bad(kind)
  path = _write_npz(tmp_path / "bad.npz", **a, **extra)
  with pytest.raises(ValueError, match=field) as e:
    ip.load_npz(path)
  msg = str(e.value)
  if kind in ("label_beyond_names", "negative_label"):
    assert "outside" in msg
  if kind == "float_images":
    assert "uint8" in msg and "float32" in msg
  if kind == "float_labels":
    assert "integer" in msg


# ---------------------------------------------------------------------------
# load(config)
# ---------------------------------------------------------------------------

def _cfg(dataset, train, test):
  return ml_collections.ConfigDict(dict(dataset=dataset, data_dir="",
                                        train_examples=train, test_examples=test))


def test_load_digits_subsets(digits):
  ds = ip.load(_cfg("digits", 100, 30))
  assert ds.x_train.shape == (100, 32, 32, 3) and ds.x_test.shape == (30, 32, 32, 3)
  np.testing.assert_array_equal(ds.x_train, digits.x_train[:100])
  np.testing.assert_array_equal(ds.y_train, digits.y_train[:100])
  np.testing.assert_array_equal(ds.x_test, digits.x_test[:30])
  np.testing.assert_array_equal(ds.y_test, digits.y_test[:30])
  assert ds.num_classes == 10
  full = ip.load(_cfg("digits", 0, None))  # 0 and None keep everything
  assert len(full.x_train) == 1347 and len(full.x_test) == 450


def test_load_npz_subsets(tmp_path):
  a = _valid_arrays(np.random.default_rng(5))
  path = _write_npz(tmp_path / "s.npz", **a)
  ds = ip.load(_cfg(path, 4, 2))
  np.testing.assert_array_equal(ds.x_train, a["x_train"][:4])
  np.testing.assert_array_equal(ds.y_train, a["y_train"][:4])
  np.testing.assert_array_equal(ds.x_test, a["x_test"][:2])
  np.testing.assert_array_equal(ds.y_test, a["y_test"][:2])
  assert ds.num_classes == 3  # from the whole set, before subsetting


# ---------------------------------------------------------------------------
# tfds, mocked and offline
# ---------------------------------------------------------------------------

def test_load_tfds_cifar10_mocked(tmp_path):
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  # The pip package of tfds ships no metadata for mock_data, so without it the mocked
  # builder knows no split sizes and `as_dataset(batch_size=-1)` asks TensorFlow for a
  # batch of sys.maxsize, which aborts the process (see the report). Give mock_data a
  # metadata directory, as its docstring advises; the mock never downloads anything
  # (GCS access and download_and_prepare are patched out).
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    builder = tfds.builder("cifar10")  # data_dir injected by the mock: tmp_path/...
    assert str(tmp_path) in str(builder.data_dir)
    splits = [tfds.core.SplitInfo(name=s, shard_lengths=[20], num_bytes=0)
              for s in ("train", "test")]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)

    ds = ip.load_tfds("cifar10", None)

  assert ds.name == "cifar10"
  assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (20, 32, 32, 3)
  assert ds.x_test.dtype == np.uint8 and ds.x_test.shape == (20, 32, 32, 3)
  assert ds.y_train.dtype == np.int32 and ds.y_train.shape == (20,)
  assert ds.y_test.shape == (20,)
  for y in (ds.y_train, ds.y_test):
    assert y.min() >= 0 and y.max() < 10
  assert len(np.unique(ds.y_train)) > 1  # real labels, not a constant
  assert ds.x_train.max() > ds.x_train.min()
  assert ds.num_classes == 10


def test_unknown_dataset_name_lists_the_valid_sources():
  pytest.importorskip("tensorflow")
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match=r"'cifar_ten' is not a known data set.*digits.*"
                     r"\.npz.*tiny_imagenet.*cifar10"):
    ip.load_tfds("cifar_ten", None)


def test_unprepared_dataset_without_network_says_what_to_do(tmp_path, monkeypatch):
  """A tfds set that is not prepared and cannot be downloaded (simulated: the network
  call fails as it does here) gets instructions instead of tfds's traceback."""
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")

  def offline(self, *args, **kwargs):
    raise ConnectionError("Failed to resolve 'www.cs.toronto.edu'")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  with pytest.raises(RuntimeError) as e:
    ip.load_tfds("cifar10", str(tmp_path))
  message = str(e.value)
  assert "not prepared in" in message and str(tmp_path) in message
  for fix in ("--config.data_dir", "--config.manual_dir", ".npz", "ConnectionError"):
    assert fix in message
