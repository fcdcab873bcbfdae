"""Representation similarity between layers: linear CKA and RSA, exact, in blocks.

Pure JAX: no TensorFlow, tfds, clu or orbax. Each function takes the activations of the
same N images at two layers (of one model or of two), X [N, ...] and Y [N, ...],
flattened to X [N, Dx] and Y [N, Dy] and centred on their mean image.

Linear CKA (Kornblith et al., 2019) compares the Gram matrices K = X X^T and L = Y Y^T:

  CKA(X, Y) = <K, L> / (||K|| ||L||),   with <K, L> = sum_ij K_ij L_ij = ||X^T Y||^2

(Frobenius norms and products). Both forms of <K, L> are exact; they differ in cost
and memory. Held whole, the feature-space form X^T Y is Dx x Dy and the sample-space
form K is N x N: neither is O(N D) in general (D x D is not when D > N, e.g. an early
convolution's 32 x 32 x 96 values per image; N x N is not when N > D). So both are
streamed in blocks:
  - sample form (`similarity_matrix`, and `linear_cka` where it is cheaper): over
    blocks of `block` images, the Gram rows X[block] X^T ([block, N]) of every layer,
    and <K, L> += <X[block] X^T, Y[block] Y^T>. Memory: the activations, O(N D), plus
    block x N per layer; time N^2 (Dx + Dy).
  - feature form (`linear_cka` where D is small, e.g. class scores): over blocks of
    `block` columns of X, ||X[:, block]^T Y||^2 ([block, Dy] at a time). Memory: the
    activations plus block x Dy; time N Dx Dy.
Neither an N x N nor a D x D matrix is ever held.

RSA compares the representational dissimilarity matrices (RDMs) of the two layers:
the correlation distance RDM_ij = 1 - pearson(x_i, x_j) between the activation
vectors of images i and j, and RSA = the Pearson correlation of the two RDMs' entries
above the diagonal (the N (N - 1) / 2 image pairs). It streams over blocks of images
as the sample form does ([block, N] RDM rows at a time), in two passes (the RDMs'
means, then centred sums) for accuracy in float32: O(N D) memory, N^2 D time. An
image whose activations are constant over a layer has no correlation; its distance to
every other image is taken as 1.

Both take float32 activations and compute in float32 with full-precision matrix
products.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def flatten(x) -> jax.Array:
  """[N, ...] -> float32 [N, D]."""
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[0] < 2:
    raise ValueError(f"need the activations of at least 2 images, got shape {x.shape}.")
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def centre(x) -> jax.Array:
  """[N, ...] -> float32 [N, D] minus its mean row."""
  x = flatten(x)
  return x - jnp.mean(x, axis=0, keepdims=True)


def _pad(x: jax.Array, axis: int, block: int) -> jax.Array:
  """Zeros appended along `axis` up to a multiple of `block` (zero rows or columns
  of a centred matrix add nothing to a Gram product)."""
  extra = -x.shape[axis] % block
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _dot(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def _check_pair(xc, yc):
  if xc.shape[0] != yc.shape[0]:
    raise ValueError(f"the two layers' activations are of {xc.shape[0]} and "
                     f"{yc.shape[0]} images; give both the same images.")


def _hsic_features(xc: jax.Array, yc: jax.Array, block: int) -> jax.Array:
  """||X^T Y||_F^2, X^T Y in blocks of `block` columns of X."""
  block = min(block, xc.shape[1])
  xp = _pad(xc, 1, block)

  def body(j, acc):
    xj = jax.lax.dynamic_slice_in_dim(xp, j * block, block, axis=1)
    return acc + jnp.sum(_dot(xj.T, yc) ** 2)

  return jax.lax.fori_loop(0, xp.shape[1] // block, body, jnp.float32(0.0))


_hsic_features_jit = jax.jit(_hsic_features, static_argnums=2)


def linear_cka(x, y, block: int = 256) -> float:
  """Linear CKA of the activations x [N, ...] and y [N, ...] of the same N images, by
  the cheaper of the feature-space and sample-space forms (see the module docstring).
  NaN where a layer's activations are the same for every image."""
  xc, yc = centre(x), centre(y)
  _check_pair(xc, yc)
  n, dx, dy = xc.shape[0], xc.shape[1], yc.shape[1]
  if dx * dy + dx * dx + dy * dy > n * (dx + dy):  # feature form costs more
    return float(_cka_matrix((xc,), (yc,), block)[0, 0])
  xy, xx, yy = (_hsic_features_jit(a, b, block) for a, b in ((xc, yc), (xc, xc),
                                                               (yc, yc)))
  den = jnp.sqrt(xx) * jnp.sqrt(yy)
  return float(jnp.where(den > 0, xy / jnp.where(den > 0, den, 1.0), jnp.nan))


def _row_block(x: jax.Array, i, block: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, i * block, block)


@functools.partial(jax.jit, static_argnums=2)
def _cka_matrix(xa: tuple, xb: tuple, block: int) -> jax.Array:
  """Linear CKA of every centred [N, D_a] of `xa` with every [N, D_b] of `xb`.

  Streams over blocks of `block` images: the Gram rows G_l = X_l[block] X_l^T
  ([block, N]) of every layer, then <K_a, K_b> += <G_a, G_b> for all pairs at once.
  Memory: the activations, plus (La + Lb) block N for the Gram rows.
  """
  n = xa[0].shape[0]
  block = min(block, n)
  pad_a = [_pad(x, 0, block) for x in xa]
  pad_b = [_pad(x, 0, block) for x in xb]

  def grams(padded, full, i):
    return jnp.stack([_dot(_row_block(p, i, block), x.T).reshape(-1)
                      for p, x in zip(padded, full)])  # [L, block N]

  def body(i, acc):
    ga, gb = grams(pad_a, xa, i), grams(pad_b, xb, i)
    cross, aa, bb = acc
    return (cross + _dot(ga, gb.T), aa + jnp.sum(ga * ga, axis=1),
            bb + jnp.sum(gb * gb, axis=1))

  la, lb = len(xa), len(xb)
  cross, aa, bb = jax.lax.fori_loop(
      0, pad_a[0].shape[0] // block, body,
      (jnp.zeros((la, lb)), jnp.zeros((la,)), jnp.zeros((lb,))))
  den = jnp.sqrt(aa)[:, None] * jnp.sqrt(bb)[None, :]
  return jnp.where(den > 0, cross / jnp.where(den > 0, den, 1.0), jnp.nan)


def _standardised_rows(x) -> jax.Array:
  """Rows z_i with z_i . z_j = pearson(x_i, x_j) (a constant row becomes 0)."""
  x = flatten(x)
  x = x - jnp.mean(x, axis=1, keepdims=True)
  norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
  return x / jnp.where(norm > 0, norm, 1.0)


@functools.partial(jax.jit, static_argnums=2)
def _rsa_matrix(za: tuple, zb: tuple, block: int) -> jax.Array:
  """RSA of every standardised [N, D_a] of `za` with every [N, D_b] of `zb`.

  Streams over blocks of `block` images: the RDM rows 1 - Z_l[block] Z_l^T of every
  layer, masked to the pairs above the diagonal; a first pass takes each RDM's mean,
  a second the centred products of all pairs of layers at once.
  """
  n = za[0].shape[0]
  block = min(block, n)
  pad_a = [_pad(z, 0, block) for z in za]
  pad_b = [_pad(z, 0, block) for z in zb]
  cols = jnp.arange(n)
  pairs = n * (n - 1) / 2
  steps = pad_a[0].shape[0] // block

  def rdms(padded, full, i, means):
    rows = i * block + jnp.arange(block)
    upper = ((cols[None, :] > rows[:, None]) & (rows[:, None] < n)).reshape(-1)
    d = jnp.stack([1.0 - _dot(_row_block(p, i, block), z.T).reshape(-1)
                   for p, z in zip(padded, full)])  # [L, block N]
    return jnp.where(upper[None, :], d - means[:, None], 0.0)

  za0, zb0 = jnp.zeros(len(za)), jnp.zeros(len(zb))

  def first(i, acc):
    return (acc[0] + jnp.sum(rdms(pad_a, za, i, za0), axis=1),
            acc[1] + jnp.sum(rdms(pad_b, zb, i, zb0), axis=1))

  mean_a, mean_b = jax.lax.fori_loop(0, steps, first, (za0, zb0))
  mean_a, mean_b = mean_a / pairs, mean_b / pairs

  def second(i, acc):
    da, db = rdms(pad_a, za, i, mean_a), rdms(pad_b, zb, i, mean_b)
    cross, aa, bb = acc
    return (cross + _dot(da, db.T), aa + jnp.sum(da * da, axis=1),
            bb + jnp.sum(db * db, axis=1))

  cross, aa, bb = jax.lax.fori_loop(
      0, steps, second,
      (jnp.zeros((len(za), len(zb))), jnp.zeros(len(za)), jnp.zeros(len(zb))))
  den = jnp.sqrt(aa)[:, None] * jnp.sqrt(bb)[None, :]
  return jnp.where(den > 0, cross / jnp.where(den > 0, den, 1.0), jnp.nan)


def rsa(x, y, block: int = 256) -> float:
  """RSA of the activations x [N, ...] and y [N, ...] of the same N images: the
  Pearson correlation of their correlation-distance RDMs (pairs above the diagonal).
  NaN where an RDM is constant."""
  return float(similarity_matrix({"x": x}, {"y": y}, "rsa", block)[0, 0])


MEASURES = ("cka", "rsa")


def similarity_matrix(rows: Mapping[str, object], cols: Mapping[str, object],
                      measure: str = "cka", block: int = 256) -> np.ndarray:
  """float32 [len(rows), len(cols)]: the similarity ("cka": linear CKA, "rsa") of
  every layer of `rows` with every layer of `cols`, {layer: activations [N, ...]} of
  the same N images (e.g. two runs' `activations`), in one compiled program.

  Memory: the activations, flattened on the device (N times the layers' total D),
  plus (number of layers) x block x N for the streamed Gram or RDM rows; no N x N
  or D x D matrix. Time: N^2 times the layers' total D (twice for RSA).
  """
  if measure not in MEASURES:
    raise ValueError(f"measure={measure!r} is unknown; valid measures are "
                     f"{list(MEASURES)}.")
  if not rows or not cols:
    raise ValueError("give at least one layer on each side.")
  prep = centre if measure == "cka" else _standardised_rows
  xa = tuple(prep(v) for v in rows.values())
  xb = tuple(prep(v) for v in cols.values())
  sizes = {x.shape[0] for x in xa + xb}
  if len(sizes) > 1:
    raise ValueError(f"the layers' activations are of different numbers of images "
                     f"{sorted(sizes)}; give all of them the same images.")
  fn = _cka_matrix if measure == "cka" else _rsa_matrix
  return np.asarray(fn(xa, xb, block), np.float32)
