"""The convolution the models share, and a parameter that applying a model does not
re-initialise.

flax.linen's `Module.param`, at every apply of an initialised model, traces the
parameter's initialiser (`jax.eval_shape`) only to check the stored parameter's shape.
For a He-normal kernel that tracing takes about 7 ms on a CPU: 0.9 of the 2.0 s that
tracing DenseNet-BC-100's training step took (299 parameters), paid again by every
run, rerun and resume, whose compile the persistent cache otherwise makes a few
seconds. `param` makes the same parameter (the same value from the same RNG stream at
init) and checks the stored one's shape directly; `Conv` is flax.linen.Conv without
a bias, as the models use it, on `param`: the same parameter tree and the same
computation (`tests/test_models.py` compares both with flax's), optionally on its
input padded with zero channels.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


# Kernel initialisers a model's config may name (config.model.kernel_init): invjax's
# He-normal, and the Glorot-uniform the authors' Keras models start from.
KERNEL_INITS = {"he_normal": nn.initializers.he_normal(),
                "glorot_uniform": nn.initializers.glorot_uniform()}


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
          dtype: Any = jnp.float32) -> jax.Array:
  """`module.param(name, init, shape, dtype)` inside a compact method, without tracing
  `init` when the parameter exists."""
  shape = tuple(shape)
  value = module.variable(
      "params", name, lambda: init(module.make_rng("params"), shape, dtype)).value
  if value.shape != shape:
    raise ValueError(
        f"parameter {'/'.join(module.scope.path)}/{name} has shape {value.shape} where "
        f"the model makes {shape}: variables from another model or config?")
  return value


class Conv(nn.Module):
  """flax.linen.Conv(features, kernel_size, strides, padding, use_bias=False,
  dtype=dtype, kernel_init=kernel_init) on images [B, H, W, C].

  `width` (>= C): computed on the input padded with zero channels to `width` and the
  kernel with zero rows to match: the same output and gradients and the same
  parameter ([kh, kw, C, features], initialised by its true fan-in), in a shape that
  does not depend on C (DenseNet-BC's widened bottlenecks)."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Any = "SAME"  # as jax.lax.conv_general_dilated takes it
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.he_normal()
  width: int | None = None

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = param(self, "kernel", self.kernel_init,
                   (*self.kernel_size, channels, self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.width is not None:
      pad = self.width - channels
      if pad < 0:
        raise ValueError(f"a {channels}-channel input does not fit width {self.width}")
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
      kernel = jnp.pad(kernel, [(0, 0), (0, 0), (0, pad), (0, 0)])
    return jax.lax.conv_general_dilated(
        x, kernel, self.strides, self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
