"""invjax/build.py: a run built from its config and data, the data checked against the
config."""

import pytest

from invjax import build as build_lib
from tests import helpers


def test_data_of_another_shape_or_class_count_is_refused_naming_both(npz):
  c = helpers.tiny_config(npz, image_shape=(32, 32, 3), num_classes=10)
  with pytest.raises(ValueError) as e:
    build_lib.build(c)
  message = str(e.value)
  assert ("config.image_shape=(32, 32, 3) but toy.npz has images of shape (16, 16, 3); "
          "set --config.image_shape='(16, 16, 3)'") in message
  assert "config.num_classes=10 but toy.npz has 4 classes" in message
  c = helpers.tiny_config(npz, image_shape=(16, 16, 3), num_classes=4)
  assert build_lib.build(c).data.image_shape == (16, 16, 3)  # matching data are accepted
