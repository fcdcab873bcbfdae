"""All-CNN (Springenberg et al., 2014) with batch norm, as trained in the paper.

Convolutions only: strided convolutions instead of pooling, and global average pooling of
the last one, a 1x1 convolution to the classes, into the class scores. Every convolution
is followed by batch norm and a ReLU, and the activation after each ReLU is sown as a
layer of the invariance loss and score (`intermediates` collection, names conv1, conv2,
... in depth order).

Layer sets, chosen by name with `layers` (or give the list of layers itself):
  - "cifar": All-CNN-C for 32x32 inputs, 9 convolutions (conv1 ... conv9).
  - "cifar_authors": the same with conv7 padded SAME (8x8 maps, where the original
    All-CNN-C's VALID gives 6x6), as the authors' Keras model builds it.
  - "tinyimagenet": the paper's All-CNN for 64x64 Tiny ImageNet, "with three additional
    layers and a stride-2 first convolution": Springenberg et al.'s ImageNet All-CNN
    (11x11 / 5x5 / 3x3 blocks of 96, 256 and 384 channels, then 1024), whose first
    convolution strides by 4 on 224x224 images and here by 2 on 64x64 images, as in the
    authors' Tiny ImageNet configuration. 12 convolutions (conv1 ... conv12); the
    activations go 64 -> 32 -> 16 -> 8 -> 4 pixels wide.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from invjax.models import batch_norm as batch_norm_lib
from invjax.models import layers

# Hidden layers as (features, kernel, stride, padding); the class layer is added.
LAYER_SETS = {
    "cifar": (  # All-CNN-C, 32x32 inputs
        (96, 3, 1, "SAME"), (96, 3, 1, "SAME"), (96, 3, 2, "SAME"),
        (192, 3, 1, "SAME"), (192, 3, 1, "SAME"), (192, 3, 2, "SAME"),
        (192, 3, 1, "VALID"), (192, 1, 1, "VALID"),
    ),
    "cifar_authors": (  # All-CNN-C with conv7 padded SAME (8x8 maps), as the authors'
        (96, 3, 1, "SAME"), (96, 3, 1, "SAME"), (96, 3, 2, "SAME"),  # code builds it
        (192, 3, 1, "SAME"), (192, 3, 1, "SAME"), (192, 3, 2, "SAME"),
        (192, 3, 1, "SAME"), (192, 1, 1, "VALID"),
    ),
    "tinyimagenet": (  # ImageNet All-CNN, first stride 2, 64x64 inputs
        (96, 11, 2, "SAME"), (96, 1, 1, "SAME"), (96, 3, 2, "SAME"),
        (256, 5, 1, "SAME"), (256, 1, 1, "SAME"), (256, 3, 2, "SAME"),
        (384, 3, 1, "SAME"), (384, 1, 1, "SAME"), (384, 3, 2, "SAME"),
        (1024, 3, 1, "SAME"), (1024, 1, 1, "VALID"),
    ),
}
CIFAR_LAYERS = LAYER_SETS["cifar"]


def layer_specs(layers) -> tuple[tuple[int, int, int, str], ...]:
  """`layers` as a tuple of (features, kernel, stride, padding): a name or the list."""
  if isinstance(layers, str):
    if layers not in LAYER_SETS:
      raise ValueError(f"config.model.layers={layers!r} is not a known All-CNN layer "
                       f"set; valid names are {sorted(LAYER_SETS)}, or give a list of "
                       "(features, kernel, stride, padding).")
    return LAYER_SETS[layers]
  specs = []
  for spec in layers:
    if (len(spec) != 4 or str(spec[3]).upper() not in ("SAME", "VALID")
        or any(int(v) < 1 for v in spec[:3])):
      raise ValueError(f"config.model.layers has the entry {tuple(spec)!r}; each must "
                       "be (features, kernel, stride, 'SAME' or 'VALID') with positive "
                       "integers.")
    specs.append((int(spec[0]), int(spec[1]), int(spec[2]), str(spec[3]).upper()))
  return tuple(specs)


class AllCNN(nn.Module):
  """All-CNN-C. `width` scales every hidden layer's channels (1.0 is the paper's).

  `layers` names one of LAYER_SETS or lists the hidden convolutions as (features,
  kernel, stride, padding); a last 1x1 convolution to the classes is always added.
  `kernel_init` names the convolutions' initialiser (layers.KERNEL_INITS: He-normal,
  or the authors' Glorot-uniform).
  """
  num_classes: int
  width: float = 1.0
  layers: str | Sequence[tuple[int, int, int, str]] = "cifar"
  dtype: Any = jnp.float32
  batch_norm: str = "flax"  # batch_norm_lib.IMPLEMENTATIONS
  kernel_init: str = "he_normal"  # layers.KERNEL_INITS

  @nn.compact
  def __call__(self, x, train: bool = False):
    init = layers.KERNEL_INITS[self.kernel_init]
    conv = lambda f, k, s, p: layers.Conv(f, (k, k), strides=(s, s), padding=p,
                                          dtype=self.dtype, kernel_init=init)
    norm_relu = batch_norm_lib.norm_relu(self.batch_norm, train, self.dtype)
    x = x.astype(self.dtype)
    specs = [(max(1, round(f * self.width)), k, s, p)
             for f, k, s, p in layer_specs(self.layers)]
    specs.append((self.num_classes, 1, 1, "VALID"))  # class scores, not scaled
    for i, spec in enumerate(specs, start=1):
      x = norm_relu(conv(*spec)(x))
      self.sow("intermediates", f"conv{i}", x)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
