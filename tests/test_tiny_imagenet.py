"""Tests for invjax/datasets/tiny_imagenet.py on a small zip of the official layout."""

import io
import zipfile

import ml_collections
import numpy as np
import pytest

pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
Image = pytest.importorskip("PIL.Image")

from invjax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
from invjax.datasets import tiny_imagenet  # pylint: disable=g-import-not-at-top

# Deliberately not sorted: the labels must follow wnids.txt's order.
WNIDS = ["n09999999", "n01443537", "n05555555"]
TRAIN_PER_CLASS = 3
VAL = [("val_0.JPEG", "n05555555"), ("val_1.JPEG", "n09999999"),
       ("val_2.JPEG", "n01443537"), ("val_3.JPEG", "n05555555")]


def _jpeg(rng, grey=False):
  """JPEG bytes of a random 64x64 image and the array PIL decodes them to (RGB)."""
  mode, shape = ("L", (64, 64)) if grey else ("RGB", (64, 64, 3))
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
      buf, "JPEG", quality=90)
  data = buf.getvalue()
  with Image.open(io.BytesIO(data)) as im:
    return data, np.asarray(im.convert("RGB"))


def make_zip(path):
  """A tiny-imagenet-200.zip in miniature; returns {file name: (rgb array, label)}."""
  rng = np.random.default_rng(0)
  expected = {}
  with zipfile.ZipFile(path, "w") as zf:
    root = "tiny-imagenet-200/"
    zf.writestr(root + "wnids.txt", "\n".join(WNIDS) + "\n")
    zf.writestr(root + "words.txt", "".join(f"{w}\tthing {w}\n" for w in WNIDS))
    for label, wnid in enumerate(WNIDS):
      zf.writestr(root + f"train/{wnid}/{wnid}_boxes.txt", "not an image\n")
      for i in range(TRAIN_PER_CLASS):
        name = f"{wnid}_{i}.JPEG"
        data, rgb = _jpeg(rng, grey=(label == 1 and i == 0))  # a greyscale one too
        zf.writestr(root + f"train/{wnid}/images/{name}", data)
        expected[name] = (rgb, label)
    zf.writestr(root + "val/val_annotations.txt",
                "".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in VAL))
    for f, w in VAL:
      data, rgb = _jpeg(rng)
      zf.writestr(root + f"val/images/{f}", data)
      expected[f] = (rgb, WNIDS.index(w))
    data, _ = _jpeg(rng)  # the unlabelled test split, which must be ignored
    zf.writestr(root + "test/images/test_0.JPEG", data)
  return expected


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The builder run once on the small zip in a manual directory."""
  base = tmp_path_factory.mktemp("tiny")
  manual = base / "manual"
  manual.mkdir()
  expected = make_zip(manual / tiny_imagenet.ZIP_NAME)
  builder = tiny_imagenet.TinyImagenet(data_dir=str(base / "data"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual), try_download_gcs=False))
  return builder, expected, base


def test_splits_hold_every_labelled_image_and_no_other(prepared):
  builder, _, _ = prepared
  assert builder.info.splits["train"].num_examples == len(WNIDS) * TRAIN_PER_CLASS
  assert builder.info.splits["validation"].num_examples == len(VAL)
  assert sorted(builder.info.splits) == ["train", "validation"]


def test_labels_follow_wnids_txt_and_images_are_the_decoded_jpegs(prepared):
  builder, expected, _ = prepared
  assert builder.info.features["label"].names == WNIDS
  seen = set()
  for split in ("train", "validation"):
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      name = ex["file_name"].decode()
      rgb, label = expected[name]
      assert ex["label"] == label, name
      assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
      np.testing.assert_array_equal(ex["image"], rgb)  # lossless after decoding
      seen.add(name)
  assert seen == set(expected)


def test_loads_through_the_input_pipeline_with_validation_as_test(prepared):
  _, expected, base = prepared
  config = ml_collections.ConfigDict({
      "dataset": "tiny_imagenet", "data_dir": str(base / "data"),
      "manual_dir": str(base / "manual"), "test_split": "validation",
      "train_examples": 0, "test_examples": 0})
  ds = ip.load(config)
  assert ds.num_classes == 3 and ds.image_shape == (64, 64, 3)
  assert ds.x_train.shape == (9, 64, 64, 3) and ds.x_test.shape == (4, 64, 64, 3)
  assert sorted(ds.y_test.tolist()) == sorted(WNIDS.index(w) for _, w in VAL)
  assert np.bincount(ds.y_train).tolist() == [TRAIN_PER_CLASS] * 3


def test_a_missing_split_is_named_with_the_ones_there_are(prepared):
  _, _, base = prepared
  with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train', "
                     r"'validation'\]. Set config.test_split"):
    ip.load_tfds("tiny_imagenet", str(base / "data"), test_split="test")


def test_without_the_zip_or_a_network_the_error_says_where_to_put_it(
    tmp_path, monkeypatch):
  def offline(self, dl_manager):
    raise OSError("Could not resolve host: cs231n.stanford.edu")
  monkeypatch.setattr(tiny_imagenet.TinyImagenet, "_download", offline)
  manual = tmp_path / "manual"
  builder = tiny_imagenet.TinyImagenet(data_dir=str(tmp_path / "data"))
  with pytest.raises(FileNotFoundError) as e:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual), try_download_gcs=False))
  message = str(e.value)
  assert "Put tiny-imagenet-200.zip" in message
  assert str(manual) in message and "--config.manual_dir" in message
  assert "Could not resolve host" in message


def test_a_zip_of_another_layout_is_refused(tmp_path):
  path = tmp_path / tiny_imagenet.ZIP_NAME
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("images/a.JPEG", b"")
  with pytest.raises(ValueError, match="no wnids.txt"):
    tiny_imagenet.read_wnids(str(path))
