"""The invariance loss of the paper (Eq. 1, 3, 4) and the classification loss.

Every function here is pure JAX and works on one layer's activations `features` [B, ...]
(flattened to D values per example) with `seed_ids` [B]: examples with the same id are
augmented copies of the same seed image.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

METHODS = ("pairwise", "moments")


def _flat(features: jax.Array) -> jax.Array:
  f = features.reshape(features.shape[0], -1).astype(jnp.float32)
  # Distances do not change under a shift; centring on the batch mean keeps the
  # ||a||^2 - 2 a.b + ||b||^2 expansion from cancelling catastrophically when the
  # activations share a large common part (ReLU outputs do).
  return f - jnp.mean(f, axis=0, keepdims=True)


def _normalised(f: jax.Array) -> jax.Array:
  """Centred flat features divided by their largest magnitude, held constant.

  L_inv is a ratio of distances, unchanged by a positive scale of the activations, and
  so is its gradient once the scale is held constant (stop_gradient): L(f / s) = L(f)
  and d/df L(f / s) = L'(f). Without this, activations of order 1e-11 have squared
  distances of order 1e-22 whose square, in the quotient rule, underflows float32 and
  makes the gradient NaN (found by tests/test_properties.py); order 1e20 overflows.
  """
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(f)))
  return f / jnp.where(scale > 0, scale, 1.0)


def _distances(f: jax.Array) -> jax.Array:
  sq = jnp.sum(f * f, axis=1)
  gram = f @ f.T
  d = (sq[:, None] + sq[None, :] - 2.0 * gram) / f.shape[1]
  return jnp.maximum(d, 0.0)


def pairwise_distances(features: jax.Array) -> jax.Array:
  """Eq. 1 for every pair: [B, B] mean squared differences, from matrix products."""
  return _distances(_flat(features))


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"invariance loss method {method!r} is unknown; "
                     f"valid methods are {list(METHODS)}.")


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den == 0 (then num == 0 too: all activations equal).

  A layer whose activations are the same for every example of the batch (a dead or
  constant layer) has no distances at all; its loss is defined as 0 with zero gradient.
  """
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _loss_pairwise(features, seed_ids):
  d = _distances(_normalised(_flat(features)))
  b = d.shape[0]
  off_diag = ~jnp.eye(b, dtype=bool)
  same = (seed_ids[:, None] == seed_ids[None, :]) & off_diag
  within = jnp.sum(jnp.where(same, d, 0.0)) / jnp.maximum(jnp.sum(same), 1)
  between = jnp.sum(jnp.where(off_diag, d, 0.0)) / (b * (b - 1))
  return _safe_ratio(within, between)


def _loss_moments(features, seed_ids):
  # For a set S of n vectors with mean mu, sum_{i, j in S} ||f_i - f_j||^2 equals
  # 2 n sum_{i in S} ||f_i - mu||^2; self-pairs add 0, so dividing by n (n - 1) pairs
  # gives the mean over i != j. O(B D), no B x B matrix.
  f = _normalised(_flat(features))  # centred on the batch mean
  b, dim = f.shape
  _, group = jnp.unique(seed_ids, return_inverse=True, size=b)
  group = group.reshape(b)
  counts = jax.ops.segment_sum(jnp.ones((b,), jnp.float32), group, num_segments=b)
  means = jax.ops.segment_sum(f, group, num_segments=b) / jnp.maximum(counts, 1)[:, None]
  dev = jnp.sum((f - means[group]) ** 2, axis=1)  # ||f_i - mu_seed(i)||^2
  within_sum = jnp.sum(2.0 * counts[group] * dev)
  within_pairs = jnp.sum(counts * (counts - 1))
  within = within_sum / jnp.maximum(within_pairs, 1) / dim
  between = 2.0 * b * jnp.sum(f * f) / (b * (b - 1)) / dim
  return _safe_ratio(within, between)


def invariance_loss(features: jax.Array, seed_ids: jax.Array,
                    method: str = "pairwise") -> jax.Array:
  """L_inv of one layer (Eq. 3), a float32 scalar.

  mean{d(x_i, x_j): i != j, same seed} / mean{d(x_i, x_j): i != j}, with d of Eq. 1.
  Self-pairs are left out of both means, so the value depends neither on the batch
  size nor on the number of copies M. 0 when every example has the same activations.

  Args:
    features: [B, ...] activations of one layer; B >= 2.
    seed_ids: int [B]; equal ids mark copies of the same seed image. Any integers.
    method: "pairwise" (the |B| x |B| distance matrix from matrix products) or
      "moments" (the same value in O(B D) from per-seed and batch means).
  """
  _check_method(method)
  if features.ndim < 2 or features.shape[0] < 2:
    raise ValueError("invariance_loss needs features of shape [B, ...] with B >= 2, "
                     f"got {features.shape}.")
  if seed_ids.shape != (features.shape[0],):
    raise ValueError(f"seed_ids must have shape [{features.shape[0]}], "
                     f"got {seed_ids.shape}.")
  fn = _loss_pairwise if method == "pairwise" else _loss_moments
  return fn(features, seed_ids)


def grouped_invariance_loss(features: jax.Array, copies: int,
                            method: str = "pairwise") -> jax.Array:
  """L_inv for a batch laid out as consecutive groups: examples k*M .. k*M + M - 1 are
  the copies of seed k. Equal to `invariance_loss(features, repeat(arange(K), M))`.

  This is the form the train step uses. The within-seed term reduces over [K, M, ...]
  blocks, so when the batch is split over devices by seed, it is computed where the
  activations are; the all-pairs term of "moments" needs only a global sum.
  """
  _check_method(method)
  b = features.shape[0]
  if copies < 2 or b % copies:
    raise ValueError(f"grouped_invariance_loss needs copies >= 2 dividing the batch "
                     f"({b}), got copies={copies}.")
  f = _normalised(_flat(features))  # centred on the batch mean
  k, dim = b // copies, f.shape[1]
  groups = f.reshape(k, copies, dim)
  pairs_within = k * copies * (copies - 1)
  if method == "pairwise":
    d = _distances(f)
    between = jnp.sum(d) / (b * (b - 1))  # the diagonal is 0
    sq = jnp.sum(groups * groups, axis=-1)  # [K, M]
    gram = jnp.einsum("kmd,knd->kmn", groups, groups)
    block = jnp.maximum((sq[:, :, None] + sq[:, None, :] - 2.0 * gram) / dim, 0.0)
    within = jnp.sum(block) / pairs_within
  else:
    dev = groups - jnp.mean(groups, axis=1, keepdims=True)
    within = 2.0 * copies * jnp.sum(dev * dev) / pairs_within / dim
    between = 2.0 * b * jnp.sum(f * f) / (b * (b - 1)) / dim
  return _safe_ratio(within, between)


# How alpha is shared out over the L sown layers (t = l / (L - 1), l = 0 .. L - 1, the
# first layer l = 0); each law is normalised to sum to alpha.
WEIGHT_LAWS = {
    "exponential": lambda t, r: r ** t,  # Eq. 4: the deepest weighs r x the first
    "linear": lambda t, r: 1.0 + (r - 1.0) * t,  # the deepest weighs r x the first
    "uniform": lambda t, r: jnp.ones_like(t),  # every layer alpha / L
    "decay": lambda t, r: r ** -t,  # the first weighs r x the deepest
}


def layer_weights(num_layers: int, alpha: float = 0.1, ratio: float = 10.0,
                  law: str = "exponential") -> jax.Array:
  """Eq. 4's layer weights alpha_l, summing to alpha, by one of WEIGHT_LAWS.

  The paper's law is "exponential": weights[l] ~ ratio ** (l / (L - 1)), so the deepest
  layer weighs `ratio` times the first.
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
  if law not in WEIGHT_LAWS:
    raise ValueError(f"layer weight law {law!r} is unknown; valid laws are "
                     f"{list(WEIGHT_LAWS)}.")
  if num_layers == 1:
    return jnp.array([alpha], jnp.float32)
  t = jnp.arange(num_layers, dtype=jnp.float32) / (num_layers - 1)
  w = WEIGHT_LAWS[law](t, jnp.asarray(ratio, jnp.float32))
  return alpha * w / jnp.sum(w)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy (L_obj), in float32."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


def total_loss(ce: jax.Array, inv_losses: Mapping[str, jax.Array],
               weights: jax.Array, alpha: float,
               class_losses: Mapping[str, jax.Array] | None = None,
               class_weights: jax.Array | None = None,
               class_alpha: float = 0.0) -> jax.Array:
  """Eq. 4: (1 - alpha) * L_obj + sum_l alpha_l * L_inv_l (layers in depth order).

  With a class-invariance term (not in the paper; the authors' code has it): L_cls_l is
  Eq. 3 with the examples' classes in place of their seeds, weighted by class_weights
  (summing to class_alpha), and the cross-entropy weighs 1 - alpha - class_alpha.
  """
  loss = (1.0 - alpha - class_alpha) * ce
  if inv_losses:
    loss = loss + jnp.sum(weights * jnp.stack(list(inv_losses.values())))
  if class_losses:
    loss = loss + jnp.sum(class_weights * jnp.stack(list(class_losses.values())))
  return loss
