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

from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from invjax import losses


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
  def of(cls, flat: jax.Array, valid: jax.Array | None = None) -> "LayerStats":
    """Of the rows of `flat` [n, D]; with `valid` [n], of the rows where it is true
    (the others are padding)."""
    if valid is None:
      mean = jnp.mean(flat, axis=0)
      return cls(jnp.asarray(flat.shape[0], jnp.float32), mean,
                 jnp.sum((flat - mean) ** 2))
    w = valid.astype(jnp.float32)
    count = jnp.sum(w)
    mean = jnp.sum(w[:, None] * flat, axis=0) / jnp.maximum(count, 1.0)
    return cls(count, mean, jnp.sum(w * jnp.sum((flat - mean) ** 2, axis=1)))

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
  num = losses.distance(clean_flat, transformed_flat)  # Eq. 1
  return _score(num, mean_distances(stats, clean_flat))


def copy_distances(clean: jax.Array, moved: jax.Array) -> jax.Array:
  """Eq. 1 between clean [n, D] and each of g copies moved [n, g, D], in any float
  dtype (made float32 inside the sums, not as whole arrays): float32 [n, g]."""
  return losses.distance(clean.astype(jnp.float32)[:, None], moved.astype(jnp.float32))


def mean_distances(stats: LayerStats, clean: jax.Array) -> jax.Array:
  """Eq. 2's denominator, (1/N) sum_j d(x_i, x_j), of each clean image [n, D]: [n]."""
  clean = clean.astype(jnp.float32)
  return (jnp.sum((clean - stats.mean) ** 2, axis=1)
          + stats.m2 / stats.count) / clean.shape[-1]


def score_copies(stats: LayerStats, clean: jax.Array, moved: jax.Array) -> jax.Array:
  """`score_batch` of g transformed copies at once: clean [n, D] and moved [n, g, D]
  activations, in any float dtype -> float32 [n, g] scores."""
  return _score(copy_distances(clean, moved), mean_distances(stats, clean)[:, None])


# Streaming over a data set with a model ------------------------------------------

FeatureFn = Callable[[jax.Array], Mapping[str, jax.Array]]
"""Maps a batch of images [n, H, W, C] in [0, 1] to {layer name: activations [n, ...]}.

The layer "pixels" (the input itself) should come first."""


MetricsFn = Callable[[jax.Array, jax.Array, jax.Array], Mapping[str, jax.Array]]
"""Maps (logits [n, classes], labels [n], mask [n]: 1 for real images, 0 for padding)
to sums over the batch's real images, e.g. {"correct": ...}."""


class Batch(NamedTuple):
  """A batch to score. Plain arrays (images) and (images, labels) tuples work too.

  `valid` [n] marks real images (true) and padding (false), e.g. to round the last
  batch up to one shape that splits over the devices: padding is scored but left out
  of the statistics, the metrics and the returned scores.
  """
  images: Any
  labels: Any = None
  valid: Any = None


class Scored(NamedTuple):
  """What `score_dataset` and `score_pairs` return: the per-image scores per layer, and
  the metric sums of the forward passes (None without a metrics_fn)."""
  scores: dict[str, np.ndarray]
  sums: Any = None


def _as_batch(batch) -> Batch:
  if isinstance(batch, Batch):
    return batch
  return Batch(*batch) if isinstance(batch, tuple) else Batch(batch)


def fetch(tree):
  """Device values -> numpy in every process (gathered across processes where an
  array is split over several hosts' devices)."""
  if all(not isinstance(x, jax.Array) or x.is_fully_addressable
         for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def _split(feature_fn: FeatureFn, with_logits: bool, images, weights=None):
  out = feature_fn(images) if weights is None else feature_fn(weights, images)
  return out if with_logits else (out, None)


def _mask(batch: Batch, images):
  return (jnp.ones(images.shape[0], jnp.float32) if batch.valid is None
          else batch.valid.astype(jnp.float32))


def _add(total, part):
  return part if total is None else {k: total[k] + part[k] for k in total}


def _fetched(calls: Iterable):
  """The results of `calls` (programs already dispatched, in order) on the host, one
  batch behind: batch i is queued on the device while batch i - 1 comes back."""
  pending = []
  for call in calls:
    pending.append(call)
    if len(pending) > 1:
      yield fetch(pending.pop(0))
  for call in pending:
    yield fetch(call)


def _concatenated(pieces: list, order) -> dict[str, np.ndarray]:
  """{layer: scores of every real image} from per-batch (scores, valid) pairs."""
  if not pieces:
    raise ValueError("no images to score")
  return {k: np.concatenate([s[k][valid > 0] for s, valid in pieces]) for k in order}


def _stats_program(feature_fn: FeatureFn, order: list[str] | None, preprocess,
                   metrics_fn: MetricsFn | None):
  """(weights, batch) -> (per-layer LayerStats of the batch's clean images, metric sums
  or None), jitted; fills `order` with the layer names at its first trace."""

  def batch_stats(weights, batch: Batch):
    feats, logits = _split(feature_fn, metrics_fn is not None, preprocess(batch.images),
                           weights)
    if order is not None and not order:
      order.extend(feats)
    stats = {k: LayerStats.of(_flat(v), batch.valid) for k, v in feats.items()}
    return stats, (metrics_fn(logits, batch.labels, _mask(batch, logits))
                   if metrics_fn else None)

  return jax.jit(batch_stats)


_merge = jax.jit(lambda a, b: jax.tree.map(
    lambda x, y: x.merge(y), a, b, is_leaf=lambda x: isinstance(x, LayerStats)))


def _run_stats(program, weights, batches: Iterable, with_metrics: bool):
  total, sums = None, []
  for batch in batches:
    s, m = program(weights, _as_batch(batch))
    total = s if total is None else _merge(total, s)
    sums.append(m)
  if total is None:
    raise ValueError("no images to score")
  if not with_metrics:
    return total
  clean = None
  for m in fetch(sums):
    clean = _add(clean, {k: float(v) for k, v in m.items()})
  return total, clean


def accumulate_stats(feature_fn: FeatureFn, batches: Iterable,
                     order: list[str] | None = None,
                     preprocess: Callable[[jax.Array], jax.Array] = lambda x: x,
                     metrics_fn: MetricsFn | None = None, weights: Any = None):
  """First pass: per-layer statistics of the clean activations.

  If `order` is a list, the layer names are appended to it in feature_fn's order
  (dicts that leave jit come back with sorted keys). `preprocess` runs on device on
  each batch first (e.g. uint8 -> float, so the host sends a quarter of the bytes).
  With `metrics_fn` (see `score_dataset`), returns (stats, metric sums of the clean
  images). `weights`: see `score_dataset`.
  """
  program = _stats_program(feature_fn, order, preprocess, metrics_fn)
  return _run_stats(program, weights, batches, metrics_fn is not None)


class Scorer:
  """The programs of `score_dataset`, compiled at their first use and kept: a Scorer
  called again (on other batches of the same shapes, or with other weights of the same
  shapes) compiles nothing. Arguments as for `score_dataset`.

  Pass 2 runs a batch's n clean images through the network, then its num_copies
  transformed copies, copies_per_forward x n images a forward pass (each image's
  copies side by side, so that a batch split over devices keeps them on its device),
  and scores each layer's copies in one read of their activations, in their own dtype.
  copies_per_forward (a divisor of num_copies) defaults to num_copies on accelerators
  (one forward of num_copies x n images: larger batches, and one forward traced and
  compiled for the copies instead of num_copies) and to 1 on a CPU, where separate
  forward passes of n images ran faster (the one of 5n took 28-43 % longer).
  `platform` names the devices the programs will run on (default: JAX's default
  backend), for programs compiled for other devices than this process's.
  """

  def __init__(self, feature_fn: FeatureFn, num_copies: int,
               transform: Callable[[jax.Array, jax.Array], jax.Array],
               preprocess: Callable[[jax.Array], jax.Array] = lambda x: x,
               metrics_fn: MetricsFn | None = None, weights: Any = None,
               copies_per_forward: int | None = None, platform: str | None = None):
    if copies_per_forward is None:
      on_cpu = (platform or jax.default_backend()) == "cpu"
      copies_per_forward = 1 if on_cpu else num_copies
    if copies_per_forward < 1 or num_copies % copies_per_forward:
      raise ValueError(f"copies_per_forward={copies_per_forward} must divide "
                       f"num_copies={num_copies} (e.g. 1 or {num_copies}).")
    self.copies_per_forward = copies_per_forward
    self.num_copies, self.weights, self.order = num_copies, weights, []
    self.with_metrics = metrics_fn is not None
    self.stats_program = _stats_program(feature_fn, self.order, preprocess, metrics_fn)
    g = copies_per_forward

    def batch_scores(weights, stats, batch: Batch, batch_key):
      images = preprocess(batch.images)
      n, shape = images.shape[0], images.shape[1:]
      mask = _mask(batch, images)
      feats, _ = _split(feature_fn, self.with_metrics, images, weights)
      clean = {k: v.reshape(n, -1) for k, v in feats.items()}
      den = {k: mean_distances(stats[k], v) for k, v in clean.items()}
      num, sums = {k: [] for k in clean}, []
      for j in range(0, num_copies, g):  # copies j .. j + g - 1 of each image
        moved = [transform(jax.random.fold_in(batch_key, c), images)
                 for c in range(j, j + g)]
        moved = jnp.stack(moved, axis=1).reshape(n * g, *shape)
        feats, logits = _split(feature_fn, self.with_metrics, moved, weights)
        for k, v in feats.items():
          num[k].append(copy_distances(clean[k], v.reshape(n, g, -1)))
        if self.with_metrics:
          logits = logits.reshape(n, g, *logits.shape[1:])
          sums += [metrics_fn(logits[:, i], batch.labels, mask) for i in range(g)]
      scores = {k: _score(jnp.concatenate(v, axis=1), den[k][:, None])
                for k, v in num.items()}
      return scores, sums, mask

    self.scores_program = jax.jit(batch_scores)

  def stats(self, batches: Iterable):
    """Pass 1: as `accumulate_stats` (the layer names go to self.order)."""
    return _run_stats(self.stats_program, self.weights, batches, self.with_metrics)

  def scores(self, stats: Mapping[str, LayerStats], batches: Iterable,
             key: jax.Array) -> Scored:
    """Pass 2: Scored({layer: [N, num_copies]}, [metric sums of copy c, ...] or None)
    of `batches` (batch i: keys from fold_in(key, i)) against `stats`, in pass 1's
    layer order (else stats' order)."""
    calls = (self.scores_program(self.weights, stats, _as_batch(batch),
                                 jax.random.fold_in(key, i))
             for i, batch in enumerate(batches))
    pieces, moved_sums = [], [None] * self.num_copies
    for scores, sums, valid in _fetched(calls):
      pieces.append((scores, valid))
      for c, m in enumerate(sums):
        moved_sums[c] = _add(moved_sums[c], {k: float(v) for k, v in m.items()})
    scores = _concatenated(pieces, self.order or list(stats))
    return Scored(scores, moved_sums if self.with_metrics else None)

  def __call__(self, batches: Callable[[], Iterable], key: jax.Array) -> Scored:
    """Both passes: as `score_dataset`."""
    stats = self.stats(batches())
    stats, clean_sums = stats if self.with_metrics else (stats, None)
    scores, moved_sums = self.scores(stats, batches(), key)
    if not self.with_metrics:
      return Scored(scores)
    return Scored(scores, {"clean": clean_sums, "transformed": moved_sums})


def score_dataset(feature_fn: FeatureFn, batches: Callable[[], Iterable],
                  key: jax.Array, num_copies: int,
                  transform: Callable[[jax.Array, jax.Array], jax.Array],
                  preprocess: Callable[[jax.Array], jax.Array] = lambda x: x,
                  metrics_fn: MetricsFn | None = None, weights: Any = None,
                  copies_per_forward: int | None = None) -> Scored:
  """Per-image invariance scores of every layer, [N, num_copies] each, in the order of
  feature_fn's layers: `Scored(scores, sums)`. (`Scorer` keeps the compiled programs
  for further calls.)

  Args:
    feature_fn: see FeatureFn; with `weights`, (weights, images) -> features.
    batches: returns a fresh iterable of batches (it is read twice), in a fixed order;
      batch i gets transformation keys from fold_in(key, i). A batch is an array of
      images, an (images, labels) tuple or a `Batch` (with `valid` to mark padding).
      Batches may be split over the devices of several processes: the scores come
      back whole in every process.
    key: PRNG key of the transformations.
    num_copies: transformed copies per image (the paper uses 5).
    transform: (key, images) -> transformed images.
    preprocess: applied on device to each batch before anything else (e.g. uint8 ->
      float in [0, 1]); feature_fn and transform see its output.
    metrics_fn: optional classification metrics from the same forward passes. Then
      batches carry labels, feature_fn returns (features, logits), and
      the result's sums are {"clean": sums, "transformed": [sums of copy c, ...]}:
      e.g. the accuracy on the clean images and on exactly the transformed copies that
      were scored, at no extra forward pass.
    weights: a pytree of arrays (e.g. the model's parameters) given to feature_fn as
      its first argument, an argument of the compiled programs. Arrays that
      feature_fn closes over instead are compiled into the programs as constants:
      slower to compile, and a copy of them in every program.
    copies_per_forward: the transformed copies go through the network this many
      at a time, copies_per_forward x n images a forward pass (see `Scorer` for the
      default); the scores are the same to float rounding.
  """
  return Scorer(feature_fn, num_copies, transform, preprocess, metrics_fn,
                weights, copies_per_forward)(batches, key)


class PairScorer:
  """Per-image scores (Eq. 2) against a given transformed version of each image, e.g. a
  corruption read from disk, [N] per layer; its compiled program is kept, so scoring
  many transformed sets of the same shapes (75 corruptions x severities) compiles once.

  Args:
    feature_fn, preprocess, metrics_fn: as for `score_dataset`.
    weights: as for `Scorer`: given, feature_fn is (weights, images) -> features, and
      the weights are an argument of the program, not constants compiled into it.
  """

  def __init__(self, feature_fn: FeatureFn,
               preprocess: Callable[[jax.Array], jax.Array] = lambda x: x,
               metrics_fn: MetricsFn | None = None, weights: Any = None):
    self.weights, self.with_logits = weights, metrics_fn is not None
    with_logits = self.with_logits

    @jax.jit
    def batch_scores(weights, stats, batch: Batch, moved):
      feats, _ = _split(feature_fn, with_logits, preprocess(batch.images), weights)
      moved_feats, logits = _split(feature_fn, with_logits, preprocess(moved), weights)
      mask = _mask(batch, logits if with_logits else moved)
      scores = {k: score_batch(stats[k], _flat(v), _flat(moved_feats[k]))
                for k, v in feats.items()}
      return (scores, (metrics_fn(logits, batch.labels, mask) if with_logits else None),
              mask)

    self._batch_scores = batch_scores

  def __call__(self, stats: Mapping[str, LayerStats], batches: Iterable) -> Scored:
    """stats: the clean set's statistics per layer (`accumulate_stats`); the scores
    come back in its order. batches: (clean, moved) pairs of `Batch`es (or arrays) of
    the same images, the clean batch carrying the labels and padding mask. Returns
    Scored(scores, the metric sums of the moved images with `metrics_fn`, else None)."""
    calls = (self._batch_scores(self.weights, stats, _as_batch(clean),
                                _as_batch(moved).images) for clean, moved in batches)
    pieces, sums = [], None
    for scores, m, valid in _fetched(calls):
      pieces.append((scores, valid))
      if self.with_logits:
        sums = _add(sums, {k: float(v) for k, v in m.items()})
    return Scored(_concatenated(pieces, stats), sums)  # stats' order


def score_pairs(feature_fn: FeatureFn, stats: Mapping[str, LayerStats],
                batches: Iterable, preprocess: Callable[[jax.Array], jax.Array] = lambda x: x,
                metrics_fn: MetricsFn | None = None, weights: Any = None) -> Scored:
  """`PairScorer(feature_fn, preprocess, metrics_fn, weights)(stats, batches)`: for one
  transformed set; keep a PairScorer to score several."""
  return PairScorer(feature_fn, preprocess, metrics_fn, weights)(stats, batches)
