"""experiments/attack_pack.py: the small pack keeps the first training images and every
test image, byte for byte, in the JPEG pack's format."""

import io

import numpy as np
from PIL import Image
import pytest

from experiments import attack_pack


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


def test_small_pack_keeps_the_first_training_images_and_every_test_image(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (5, 8, 8, 3), np.uint8)
  test = rng.integers(0, 256, (3, 8, 8, 3), np.uint8)
  (tj, to), (sj, so) = _jpegs(train), _jpegs(test)
  path = tmp_path / "pack.npz"
  np.savez(path, train_jpeg=tj, train_offsets=to, train_labels=np.arange(5, dtype=np.uint8),
           test_jpeg=sj, test_offsets=so, test_labels=np.arange(3, dtype=np.uint8),
           label_names=np.array(["a", "b"]))
  with np.load(path) as pack:
    full = {k: pack[k] for k in pack.files}
    small = attack_pack.subset(pack, 2)
  np.testing.assert_array_equal(_decode(small, "train"), _decode(full, "train")[:2])
  np.testing.assert_array_equal(small["train_labels"], [0, 1])
  for k in ("test_jpeg", "test_offsets", "test_labels", "label_names"):
    np.testing.assert_array_equal(small[k], full[k])
  assert len(small["train_jpeg"]) == to[2] < len(tj)
  with np.load(path) as pack, pytest.raises(ValueError, match="--train=6.*5 training"):
    attack_pack.subset(pack, 6)
