"""Batch normalisation in two implementations of the same function: flax's, and a
"fused" one that launches fewer kernels on a GPU.

On an H200 a step of All-CNN-C or WRN-28-10 is bound by the kernels it launches (about
3.4-4 us each, experiments/kernel_census.py), and flax.linen.BatchNorm is over half:
its statistics are two reductions, and its backward pass, made by autodiff through the
mean and the variance, several more. The fused layer computes both statistics in one
variadic reduction and has a written backward pass: one reduction for the two sums the
gradient needs (of dy and of dy * x_hat), then one elementwise pass,

  dx = scale / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat)).

Both compute y = (x - mean) / sqrt(var + eps) * scale + bias over the batch and the
spatial axes (var biased, E[x^2] - E[x]^2 in float32, clipped at 0; the fused layer
in training as y = x * a + b, a and b per channel), and update the running statistics
as momentum * old + (1 - momentum) * new. Their variables have the same names, shapes
and dtypes, and a module of either is named BatchNorm_<i>, so a checkpoint or record
of one loads into the other. In evaluation (running statistics) they are the same
arithmetic; in training they differ by rounding. `implementation` picks per platform:
flax's on a CPU, where the CPU figures of the README were made, the fused one on an
accelerator.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from invjax.models import layers

IMPLEMENTATIONS = ("flax", "fused")
CHOICES = ("auto",) + IMPLEMENTATIONS


def implementation(choice: str, platform: str) -> str:
  """The implementation `choice` ("auto", "flax" or "fused") means on `platform`."""
  if choice not in CHOICES:
    raise ValueError(f"config.batch_norm={choice!r} is not one of {list(CHOICES)}.")
  if choice == "auto":
    return "flax" if platform == "cpu" else "fused"
  return choice


def norm_relu(kind: str, train: bool, dtype: Any):
  """f(x) = ReLU(BN(x)), BN a new batch-norm layer of implementation `kind` at each
  call, as the models use it (momentum 0.9, eps 1e-5, features on the last axis). The
  fused layer takes the ReLU into its backward pass."""
  settings = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                  dtype=dtype)
  if kind == "fused":
    return lambda x: BatchNorm(relu=True, **settings)(x)
  return lambda x: nn.relu(nn.BatchNorm(**settings)(x))


def _sum2(a, b):
  return lax.add(a[0], b[0]), lax.add(a[1], b[1])


# The arithmetic below is written in jax.lax, not jax.numpy: the same operations, but
# jax.numpy's functions trace as nested jitted calls, and with a batch norm of its own
# shape at each of DenseNet-BC-100's 99 layers they were half of the 8.5 ms each took to
# trace (forward and backward), about 0.4 s of every run's start.

def _two_sums(u, v, axes):
  """(sum u, sum v) over `axes`, in one reduction (one kernel on a GPU)."""
  zero = np.float32(0)
  return lax.reduce((u, v), (zero, zero), _sum2, axes)


def _per_channel(v, x):
  """[C] broadcast to x's shape [..., C]."""
  return lax.broadcast_in_dim(v, x.shape, (x.ndim - 1,))


def _coefficients(total, squares, count, epsilon):
  n = lax.full_like(total, count)
  mean = lax.div(total, n)
  var = lax.max(lax.full_like(total, 0), lax.sub(lax.div(squares, n), lax.mul(mean, mean)))
  return mean, var, lax.rsqrt(lax.add(var, lax.full_like(var, epsilon)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _train_norm(x, scale, bias, epsilon, relu):
  """(y, batch mean, batch variance) with y = ReLU(BN(x)) if relu else BN(x). Only y
  is differentiated: the statistics feed the running averages, which are not (the
  backward pass ignores their cotangents)."""
  return _train_norm_fwd(x, scale, bias, epsilon, relu)[0]


def _train_norm_fwd(x, scale, bias, epsilon, relu):
  x32 = lax.convert_element_type(x, np.float32)
  total, squares = _two_sums(x32, lax.mul(x32, x32), tuple(range(x.ndim - 1)))
  mean, var, inv = _coefficients(total, squares, x.size // x.shape[-1], epsilon)
  # y = x * a + b, a and b per channel: the parameters then meet only per-channel
  # arithmetic, which XLA puts in the one small kernel that computes the statistics'
  # coefficients, and the backward pass reads a, not the scale. Where the pass over x
  # read the bias itself, XLA gave the bias's slice of the step loop's parameter
  # vector a kernel of its own: 48 of DenseNet-BC's step, 7 of All-CNN-C's.
  a = lax.mul(inv, scale)
  b = lax.sub(bias, lax.mul(mean, a))
  y = lax.add(lax.mul(x32, _per_channel(a, x)), _per_channel(b, x))
  if relu:
    y = lax.max(y, lax.full_like(y, 0))
  y = lax.convert_element_type(y, x.dtype)
  return (y, mean, var), (x, y if relu else None, mean, inv, a)


def _train_norm_bwd(epsilon, relu, residuals, cotangents):
  del epsilon
  x, y, mean, inv, a = residuals
  dy = lax.convert_element_type(cotangents[0], np.float32)
  if relu:
    dy = lax.select(lax.gt(y, lax.full_like(y, 0)), dy, lax.full_like(dy, 0))
  axes = tuple(range(x.ndim - 1))
  n = lax.full_like(mean, x.size // x.shape[-1])
  x_hat = lax.mul(lax.sub(lax.convert_element_type(x, np.float32), _per_channel(mean, x)),
                  _per_channel(inv, x))
  dbias, dscale = _two_sums(dy, lax.mul(dy, x_hat), axes)
  dx = lax.mul(_per_channel(a, x), lax.sub(
      lax.sub(dy, _per_channel(lax.div(dbias, n), x)),
      lax.mul(x_hat, _per_channel(lax.div(dscale, n), x))))
  return lax.convert_element_type(dx, x.dtype), dscale, dbias


_train_norm.defvjp(_train_norm_fwd, _train_norm_bwd)


def _running_average(old, new, momentum):
  """momentum * old + (1 - momentum) * new, with new held constant. In jax.lax, where
  each jax.numpy operator traces as a jitted call of its own: the running averages'
  were 594 of the 998 such calls in tracing DenseNet-BC-100's training step."""
  new = lax.stop_gradient(new)
  return lax.add(lax.mul(lax.full_like(old, momentum), old),
                 lax.mul(lax.full_like(new, 1 - momentum), new))


class BatchNorm(nn.Module):
  """Batch norm over every axis but the last, flax.linen.BatchNorm's variables and
  results (to rounding in training), with a one-pass forward and a written backward.

  Named BatchNorm so that its modules are named as flax's (BatchNorm_0, ...)."""
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None  # of the output; None: the input's
  relu: bool = False  # ReLU(BN(x)), with the ReLU inside the written backward pass

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = layers.param(self, "scale", nn.initializers.ones, features)
    bias = layers.param(self, "bias", nn.initializers.zeros, features)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    dtype = self.dtype or x.dtype
    if self.use_running_average:  # flax's arithmetic, in flax's order
      y = x - ra_mean.value
      y = y * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
      return jax.nn.relu(y.astype(dtype)) if self.relu else y.astype(dtype)
    y, mean, var = _train_norm(x, scale, bias, self.epsilon, self.relu)
    if not self.is_initializing():
      ra_mean.value = _running_average(ra_mean.value, mean, self.momentum)
      ra_var.value = _running_average(ra_var.value, var, self.momentum)
    return y.astype(dtype)
