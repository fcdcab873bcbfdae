"""All-CNN-C (Springenberg et al., 2014) with batch norm, as trained in the paper.

Nine 3x3/1x1 convolutions, strided convolutions instead of pooling, global average
pooling of the last one into the class scores. Every convolution is followed by batch norm
and a ReLU, and the activation after each ReLU is sown as a layer of the invariance loss
and score (`intermediates` collection, names conv1 ... conv9, in depth order).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# (features, kernel, stride, padding) for CIFAR-10 (32x32 inputs).
CIFAR_LAYERS = (
    (96, 3, 1, "SAME"), (96, 3, 1, "SAME"), (96, 3, 2, "SAME"),
    (192, 3, 1, "SAME"), (192, 3, 1, "SAME"), (192, 3, 2, "SAME"),
    (192, 3, 1, "VALID"), (192, 1, 1, "VALID"),
)


class AllCNN(nn.Module):
  """All-CNN-C. `width` scales every hidden layer's channels (1.0 is the paper's).

  `layers` lists the hidden convolutions as (features, kernel, stride, padding); a last
  1x1 convolution to the classes is always added.
  """
  num_classes: int
  width: float = 1.0
  layers: Sequence[tuple[int, int, int, str]] = CIFAR_LAYERS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda f, k, s, p: nn.Conv(
        f, (k, k), strides=(s, s), padding=p, use_bias=False, dtype=self.dtype,
        kernel_init=nn.initializers.he_normal())
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                epsilon=1e-5, dtype=self.dtype)
    x = x.astype(self.dtype)
    specs = [(max(1, round(f * self.width)), int(k), int(s), str(p))
             for f, k, s, p in self.layers]
    specs.append((self.num_classes, 1, 1, "VALID"))  # class scores, not scaled
    for i, spec in enumerate(specs, start=1):
      x = nn.relu(norm()(conv(*spec)(x)))
      self.sow("intermediates", f"conv{i}", x)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
