"""experiments/carry_pack.py: the pack an accelerator call carries keeps the images it
keeps byte for byte, in the JPEG pack's format, and unpacks to the same arrays."""

import io
import os

import numpy as np
from PIL import Image
import pytest

from experiments import carry_pack


def _jpegs(images):
  blobs = []
  for im in images:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG")
    blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
  return np.concatenate(blobs), offsets


def _decode(arrays, split):
  data, offs = arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"]
  return np.stack([np.asarray(Image.open(io.BytesIO(data[a:b].tobytes())).convert("RGB"))
                   for a, b in zip(offs[:-1], offs[1:])])


def _pack(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (5, 8, 8, 3), np.uint8)
  test = rng.integers(0, 256, (3, 8, 8, 3), np.uint8)
  (tj, to), (sj, so) = _jpegs(train), _jpegs(test)
  path = tmp_path / "pack.npz"
  np.savez(path, train_jpeg=tj, train_offsets=to, train_labels=np.arange(5, dtype=np.uint8),
           test_jpeg=sj, test_offsets=so, test_labels=np.arange(3, dtype=np.uint8),
           label_names=np.array(["a", "b"]))
  return path


def test_small_pack_keeps_the_first_training_images_and_every_test_image(tmp_path):
  path = _pack(tmp_path)
  with np.load(path) as pack:
    full = {k: pack[k] for k in pack.files}
    small = carry_pack.subset(pack, 2)
  np.testing.assert_array_equal(_decode(small, "train"), _decode(full, "train")[:2])
  np.testing.assert_array_equal(small["train_labels"], [0, 1])
  for k in ("test_jpeg", "test_offsets", "test_labels", "label_names"):
    np.testing.assert_array_equal(small[k], full[k])
  to, tj = full["train_offsets"], full["train_jpeg"]
  assert len(small["train_jpeg"]) == to[2] < len(tj)
  with np.load(path) as pack, pytest.raises(ValueError, match="--train=6.*5 training"):
    carry_pack.subset(pack, 6)


def test_the_carried_pack_is_smaller_and_unpacks_to_the_same_arrays(tmp_path):
  path = _pack(tmp_path)
  with np.load(path) as pack:
    full = {k: pack[k] for k in pack.files}
    assert carry_pack.subset(pack, None).keys() == full.keys()
    packed = carry_pack.write(carry_pack.subset(pack, None), str(tmp_path / "carry"))
  assert packed == str(tmp_path / "carry" / "cifar10_jpeg.npz.xz")
  # JPEGs this small are mostly their shared headers, which xz finds.
  assert os.path.getsize(packed) < os.path.getsize(path) / 2
  plain = carry_pack.unpack(str(tmp_path / "carry"))
  assert plain == str(tmp_path / "carry" / "cifar10_jpeg.npz")
  with np.load(plain) as back:
    assert sorted(back.files) == sorted(full)
    for k in full:
      np.testing.assert_array_equal(back[k], full[k])
  # Unpacked already: left as it is (decode.py reads it; the .xz is not read again).
  os.remove(packed)
  assert carry_pack.unpack(str(tmp_path / "carry")) == plain


def test_unpacking_a_folder_without_a_pack_names_what_to_carry(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither cifar10_jpeg.npz nor .*carry_pack"):
    carry_pack.unpack(str(tmp_path))
