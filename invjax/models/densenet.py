"""DenseNet-BC (Huang et al., 2017): bottleneck layers and compression, with batch
norm and no dropout, as trained in the paper (L = 100, growth rate k = 12).

A 3x3 stem of 2k channels, three dense blocks of (L - 4) / 6 bottleneck layers
(BN-ReLU-conv1x1 to 4k, BN-ReLU-conv3x3 to k, concatenated to the block's input), with
transitions (BN-ReLU-conv1x1 to compression x channels, 2x2 average pooling) between
them, then BN, ReLU, global average pooling and a dense layer. Sown: the output of the
first convolution ("stem") and of every dense block ("dense1" ... "dense3").

With `widen_bottlenecks`, each bottleneck's 1x1 convolution reads its input padded
with zero channels to its block's final width (rounded up to a multiple of 8), its
kernel padded with zero rows to match: the same function and the same parameters
(shapes, initialisation, names), but one bottleneck convolution shape per block
instead of one per layer. XLA's GPU compiler autotunes each distinct convolution
(forward, and both backward ones) once, so DenseNet-BC-100's 161 distinct shapes fall
to 26 (`python -m experiments.compile_time`), for 1.76 x the bottlenecks' FLOPs (the
network's 0.58 GFLOP an image forward become 0.79).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from invjax.models import batch_norm as batch_norm_lib
from invjax.models import layers


class DenseNetBC(nn.Module):
  num_classes: int
  depth: int = 100
  growth: int = 12
  compression: float = 0.5
  num_blocks: int = 3
  dtype: Any = jnp.float32
  batch_norm: str = "flax"  # batch_norm_lib.IMPLEMENTATIONS
  widen_bottlenecks: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    per_block, rem = divmod(self.depth - 4, 2 * self.num_blocks)
    if rem or per_block < 1:
      raise ValueError(f"config.model.depth={self.depth}: DenseNet-BC with "
                       f"{self.num_blocks} blocks has depth 6n + 4 (e.g. 100, 40).")
    conv = lambda f, k, width=None: layers.Conv(f, (k, k), dtype=self.dtype, width=width)
    norm_relu = batch_norm_lib.norm_relu(self.batch_norm, train, self.dtype)
    x = conv(2 * self.growth, 3)(x.astype(self.dtype))
    self.sow("intermediates", "stem", x)
    for block in range(self.num_blocks):
      block_width = x.shape[-1] + per_block * self.growth
      bottleneck_width = -(-block_width // 8) * 8 if self.widen_bottlenecks else None
      for _ in range(per_block):
        y = conv(4 * self.growth, 1, bottleneck_width)(norm_relu(x))
        y = conv(self.growth, 3)(norm_relu(y))
        x = jnp.concatenate([x, y], axis=-1)
      self.sow("intermediates", f"dense{block + 1}", x)
      if block < self.num_blocks - 1:
        x = conv(math.floor(x.shape[-1] * self.compression), 1)(norm_relu(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = norm_relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
