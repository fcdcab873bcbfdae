"""The invariance score of the paper (Eq. 2), direct and streaming.

S_i = 1 - d(x_i, G(x_i)) / ((1/N) sum_j d(x_i, x_j)), with d of Eq. 1 and the sum over
the N clean images of the evaluation set (j = i included, as the equation is written).

The denominator has a closed form. With mu the mean clean activation and
V = (1/N) sum_j ||f(x_j) - mu||^2,

  (1/N) sum_j ||f(x_i) - f(x_j)||^2 = ||f(x_i) - mu||^2 + V,

so a pass over the clean images that keeps only mu (D values) and V (one number) per
layer lets a second pass score every image: O(N D) time, O(D) memory, no N x N matrix.

Defined edge cases: identical clean and transformed activations score 1 (the paper's
maximum), also for a layer whose activations are the same for every image; a layer that
is constant over the clean set but not over a transformed copy scores -inf.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def _score(num: jax.Array, den: jax.Array) -> jax.Array:
  ok = den > 0
  ratio = num / jnp.where(ok, den, 1.0)
  return jnp.where(num == 0, 1.0, jnp.where(ok, 1.0 - ratio, -jnp.inf))


def invariance_scores(clean: jax.Array, transformed: jax.Array) -> jax.Array:
  """Eq. 2 for one layer: the N per-image scores.

  Args:
    clean: [N, ...] activations of N clean images.
    transformed: [N, ...] activations of one transformed copy of each image.
  Returns:
    float32 [N].
  """
  if clean.shape != transformed.shape:
    raise ValueError(f"clean {clean.shape} and transformed {transformed.shape} "
                     "activations must have the same shape.")
  c, t = _flat(clean), _flat(transformed)
  stats = LayerStats.of(c)
  return score_batch(stats, c, t)


class LayerStats(NamedTuple):
  """Running statistics of the clean activations of one layer."""
  count: jax.Array  # scalar
  mean: jax.Array  # [D]
  m2: jax.Array  # scalar: sum_j ||f_j - mean||^2

  @classmethod
  def zeros(cls, dim: int) -> "LayerStats":
    return cls(jnp.zeros(()), jnp.zeros((dim,)), jnp.zeros(()))

  @classmethod
  def of(cls, flat: jax.Array) -> "LayerStats":
    mean = jnp.mean(flat, axis=0)
    return cls(jnp.asarray(flat.shape[0], jnp.float32), mean,
               jnp.sum((flat - mean) ** 2))

  def merge(self, other: "LayerStats") -> "LayerStats":
    """Chan et al.'s pairwise update: exact, and stable in float32."""
    n = self.count + other.count
    delta = other.mean - self.mean
    frac = other.count / jnp.maximum(n, 1.0)
    mean = self.mean + delta * frac
    m2 = self.m2 + other.m2 + jnp.sum(delta ** 2) * self.count * frac
    return LayerStats(n, mean, m2)


def score_batch(stats: LayerStats, clean_flat: jax.Array,
                transformed_flat: jax.Array) -> jax.Array:
  """Scores of a batch of images against the whole clean set summarised by `stats`."""
  dim = clean_flat.shape[1]
  num = jnp.sum((clean_flat - transformed_flat) ** 2, axis=1) / dim
  den = (jnp.sum((clean_flat - stats.mean) ** 2, axis=1)
         + stats.m2 / stats.count) / dim
  return _score(num, den)


# Streaming over a data set with a model ------------------------------------------

FeatureFn = Callable[[jax.Array], Mapping[str, jax.Array]]
"""Maps a batch of images [n, H, W, C] in [0, 1] to {layer name: activations [n, ...]}.

The layer "pixels" (the input itself) should come first."""


def accumulate_stats(feature_fn: FeatureFn, batches: Iterable[jax.Array],
                     order: list[str] | None = None,
                     preprocess: Callable[[jax.Array], jax.Array] = lambda x: x
                     ) -> dict[str, LayerStats]:
  """First pass: per-layer statistics of the clean activations.

  If `order` is a list, the layer names are appended to it in feature_fn's order
  (dicts that leave jit come back with sorted keys). `preprocess` runs on device on
  each batch first (e.g. uint8 -> float, so the host sends a quarter of the bytes).
  """

  @jax.jit
  def batch_stats(images):
    feats = feature_fn(preprocess(images))
    if order is not None and not order:
      order.extend(feats)
    return {k: LayerStats.of(_flat(v)) for k, v in feats.items()}

  merge = jax.jit(lambda a, b: jax.tree.map(
      lambda x, y: x.merge(y), a, b, is_leaf=lambda x: isinstance(x, LayerStats)))
  total = None
  for images in batches:
    s = batch_stats(images)
    total = s if total is None else merge(total, s)
  if total is None:
    raise ValueError("no images to score")
  return total


def score_dataset(feature_fn: FeatureFn, batches: Callable[[], Iterable],
                  key: jax.Array, num_copies: int,
                  transform: Callable[[jax.Array, jax.Array], jax.Array],
                  preprocess: Callable[[jax.Array], jax.Array] = lambda x: x
                  ) -> dict[str, np.ndarray]:
  """Per-image invariance scores of every layer, [N, num_copies] each, in the order of
  feature_fn's layers.

  Args:
    feature_fn: see FeatureFn.
    batches: returns a fresh iterable of image batches (it is read twice), in a fixed
      order; batch i gets transformation keys from fold_in(key, i).
    key: PRNG key of the transformations.
    num_copies: transformed copies per image (the paper uses 5).
    transform: (key, images) -> transformed images.
    preprocess: applied on device to each batch before anything else (e.g. uint8 ->
      float in [0, 1]); feature_fn and transform see its output.
  """
  order: list[str] = []
  stats = accumulate_stats(feature_fn, batches(), order, preprocess)

  @jax.jit
  def batch_scores(stats, images, batch_key):
    images = preprocess(images)
    clean = {k: _flat(v) for k, v in feature_fn(images).items()}
    out = {k: [] for k in clean}
    for c in range(num_copies):
      moved = transform(jax.random.fold_in(batch_key, c), images)
      for k, v in feature_fn(moved).items():
        out[k].append(score_batch(stats[k], clean[k], _flat(v)))
    return {k: jnp.stack(v, axis=1) for k, v in out.items()}

  pieces = []
  for i, images in enumerate(batches()):
    pieces.append(jax.device_get(
        batch_scores(stats, images, jax.random.fold_in(key, i))))
  return {k: np.concatenate([p[k] for p in pieces]) for k in order}
