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
import jax
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
    convs = iter(range(1 << 30))  # named as flax names them unnamed: Conv_0, Conv_1, ...
    conv = lambda f, k: layers.Conv(f, (k, k), dtype=self.dtype,
                                    name=f"Conv_{next(convs)}")
    norm_relu = batch_norm_lib.norm_relu(self.batch_norm, train, self.dtype)
    x = conv(2 * self.growth, 3)(x.astype(self.dtype))
    self.sow("intermediates", "stem", x)
    for block in range(self.num_blocks):
      width = x.shape[-1] + per_block * self.growth
      for _ in range(per_block):
        if self.widen_bottlenecks:
          y = _WidenedConv1x1(4 * self.growth, -(-width // 8) * 8, self.dtype,
                              name=f"Conv_{next(convs)}")(norm_relu(x))
        else:
          y = conv(4 * self.growth, 1)(norm_relu(x))
        y = conv(self.growth, 3)(norm_relu(y))
        x = jnp.concatenate([x, y], axis=-1)
      self.sow("intermediates", f"dense{block + 1}", x)
      if block < self.num_blocks - 1:
        x = conv(math.floor(x.shape[-1] * self.compression), 1)(norm_relu(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = norm_relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class _WidenedConv1x1(nn.Module):
  """layers.Conv(features, (1, 1)) on x [..., C], computed on x and the
  kernel padded with zero channels to `width` >= C: the same output and gradients as
  the unpadded convolution, and the same parameter ("kernel" [1, 1, C, features],
  He-normal by its true fan-in), in a shape that does not depend on C."""
  features: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if channels > self.width:
      raise ValueError(f"a {channels}-channel input does not fit width {self.width}")
    kernel = layers.param(self, "kernel", nn.initializers.he_normal(),
                          (1, 1, channels, self.features))
    pad = self.width - channels
    x = jnp.pad(x.astype(self.dtype), [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    kernel = jnp.pad(kernel.astype(self.dtype), [(0, 0), (0, 0), (0, pad), (0, 0)])
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
