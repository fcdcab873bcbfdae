"""Wide residual network WRN-d-k (Zagoruyko & Komodakis, 2016), pre-activation, no
dropout, with batch norm, as trained in the paper.

A 3x3 stem of 16 channels, three groups of (d - 4) / 6 residual blocks of 16k, 32k and
64k channels (the first block of groups 2 and 3 strides by 2), then batch norm, ReLU,
global average pooling and a dense layer. Each block is BN-ReLU-conv3x3-BN-ReLU-conv3x3
with a 1x1 projection shortcut (from the pre-activated input) where the shape changes.
The output of every residual block is sown (block1 ... block12 for WRN-28-10).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from invjax.models import batch_norm as batch_norm_lib
from invjax.models import layers


class WideResNet(nn.Module):
  num_classes: int
  depth: int = 28
  widen: int = 10
  strides: tuple[int, int, int] = (1, 2, 2)
  dtype: Any = jnp.float32
  batch_norm: str = "flax"  # batch_norm_lib.IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"config.model.depth={self.depth}: a WRN has depth 6n + 4 "
                       "(e.g. 28, 16, 10).")
    blocks_per_group = (self.depth - 4) // 6
    conv = lambda f, k, s=1: layers.Conv(f, (k, k), strides=(s, s), dtype=self.dtype)
    norm_relu = batch_norm_lib.norm_relu(self.batch_norm, train, self.dtype)
    x = conv(16, 3)(x.astype(self.dtype))
    index = 0
    for group, stride in enumerate(self.strides):
      width = 16 * self.widen * 2 ** group
      for b in range(blocks_per_group):
        s = stride if b == 0 else 1
        pre = norm_relu(x)
        shortcut = x
        if s != 1 or x.shape[-1] != width:
          shortcut = conv(width, 1, s)(pre)
        y = conv(width, 3, s)(pre)
        y = conv(width, 3)(norm_relu(y))
        x = y + shortcut
        index += 1
        self.sow("intermediates", f"block{index}", x)
    x = norm_relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
