"""Eq. 2: invariance scores against a naive N x N reference; streaming = direct."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invjax import analysis


def naive_scores(clean, transformed):
  c = np.asarray(clean, np.float64).reshape(len(clean), -1)
  t = np.asarray(transformed, np.float64).reshape(len(clean), -1)
  n, d = c.shape
  dist = lambda a, b: np.sum((a - b) ** 2) / d
  out = []
  for i in range(n):
    den = np.mean([dist(c[i], c[j]) for j in range(n)])  # (1/N) sum_j, j = i included
    out.append(1 - dist(c[i], t[i]) / den)
  return np.array(out)


def test_matches_naive_reference():
  rng = np.random.default_rng(0)
  clean = rng.normal(size=(40, 3, 3, 4)) + 5.0
  moved = clean + 0.3 * rng.normal(size=clean.shape)
  got = analysis.invariance_scores(jnp.asarray(clean, jnp.float32),
                                   jnp.asarray(moved, jnp.float32))
  np.testing.assert_allclose(got, naive_scores(clean, moved), rtol=1e-4, atol=1e-5)


def test_identical_is_one_and_unrelated_is_near_zero():
  rng = np.random.default_rng(1)
  clean = jnp.asarray(rng.normal(size=(500, 64)), jnp.float32)
  np.testing.assert_allclose(analysis.invariance_scores(clean, clean), 1.0)
  other = jnp.asarray(rng.normal(size=(500, 64)), jnp.float32)
  # A random other image is as far as an average pair: S ~ 0.
  assert abs(float(jnp.median(analysis.invariance_scores(clean, other)))) < 0.1


def test_constant_layer_defined():
  c = jnp.ones((6, 5))
  np.testing.assert_array_equal(analysis.invariance_scores(c, c), 1.0)
  s = analysis.invariance_scores(c, c.at[0].set(2.0))
  assert s[0] == -np.inf and np.all(s[1:] == 1.0)


def test_stats_merge_equals_whole():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(37, 9)) * 3 + 100, jnp.float32)
  parts = [x[:5], x[5:20], x[20:]]
  merged = analysis.LayerStats.of(parts[0])
  for p in parts[1:]:
    merged = merged.merge(analysis.LayerStats.of(p))
  whole = analysis.LayerStats.of(x)
  np.testing.assert_allclose(merged.count, 37)
  np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-6)
  np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-4)


def test_streaming_equals_direct_and_keeps_layer_order():
  """score_dataset over uneven batches = invariance_scores on whole arrays."""
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.uniform(size=(23, 4, 4, 3)), jnp.float32)
  w1 = jnp.asarray(rng.normal(size=(48, 7)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)

  def feature_fn(x):  # names whose sorted order is not their depth order
    h = jax.nn.relu(x.reshape(len(x), -1) @ w1)
    return {"pixels": x, "layer10": h, "layer2": h @ w2}

  def transform(key, x):
    return x + 0.1 * jax.random.normal(key, x.shape)

  key = jax.random.key(7)
  sizes = [10, 10, 3]
  def batches():
    start = 0
    for s in sizes:
      yield images[start:start + s]
      start += s

  got = analysis.score_dataset(feature_fn, batches, key, 2, transform).scores
  assert list(got) == ["pixels", "layer10", "layer2"]
  for name, scores in got.items():
    assert scores.shape == (23, 2)
    for c in range(2):  # rebuild exactly the transformed copies the stream used
      moved = jnp.concatenate([
          transform(jax.random.fold_in(jax.random.fold_in(key, i), c),
                    images[sum(sizes[:i]):sum(sizes[:i + 1])])
          for i in range(len(sizes))])
      direct = analysis.invariance_scores(feature_fn(images)[name],
                                          feature_fn(moved)[name])
      np.testing.assert_allclose(scores[:, c], direct, rtol=1e-4, atol=1e-5)


def test_metrics_come_from_the_scored_forward_passes():
  """With metrics_fn, the clean and per-copy sums equal those of the clean images and
  of the very transformed copies scored, and the scores are unchanged."""
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.uniform(size=(14, 4, 4, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 14), jnp.int32)
  w = jnp.asarray(rng.normal(size=(48, 3)), jnp.float32)
  logits_of = lambda x: x.reshape(len(x), -1) @ w
  feats_of = lambda x: {"pixels": x, "logit_layer": logits_of(x)}
  transform = lambda key, x: x + 0.3 * jax.random.normal(key, x.shape)
  metrics_fn = lambda lg, y, mask: {"correct": jnp.sum((jnp.argmax(lg, -1) == y) * mask),
                                    "count": jnp.sum(mask)}
  key = jax.random.key(11)
  splits = [(images[:8], labels[:8]), (images[8:], labels[8:])]
  plain = analysis.score_dataset(feats_of, lambda: [x for x, _ in splits], key, 3,
                                 transform).scores
  scores, sums = analysis.score_dataset(lambda x: (feats_of(x), logits_of(x)),
                                        lambda: splits, key, 3, transform,
                                        metrics_fn=metrics_fn)
  for name in plain:
    np.testing.assert_array_equal(scores[name], plain[name])
  correct = lambda x: int(jnp.sum(jnp.argmax(logits_of(x), -1) == labels))
  assert sums["clean"] == {"correct": correct(images), "count": 14.0}
  assert len(sums["transformed"]) == 3
  for c, got in enumerate(sums["transformed"]):
    moved = jnp.concatenate([
        transform(jax.random.fold_in(jax.random.fold_in(key, i), c), x)
        for i, (x, _) in enumerate(splits)])
    assert got == {"correct": correct(moved), "count": 14.0}
  assert len({s["correct"] for s in sums["transformed"]} | {sums["clean"]["correct"]}
             ) > 1  # the transformations changed some predictions


def test_preprocess_runs_on_device_before_features_and_transform():
  """uint8 batches with preprocess = to_float score as the float batches do."""
  rng = np.random.default_rng(4)
  raw = rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
  w = jnp.asarray(rng.normal(size=(48, 6)), jnp.float32)
  feature_fn = lambda x: {"pixels": x, "h": jax.nn.relu(x.reshape(len(x), -1) @ w)}
  transform = lambda key, x: x + 0.1 * jax.random.normal(key, x.shape)
  to_float = lambda x: x.astype(jnp.float32) / 255.0
  key = jax.random.key(2)
  as_uint8 = analysis.score_dataset(feature_fn, lambda: [raw[:8], raw[8:]], key, 2,
                                    transform, preprocess=to_float).scores
  floats = np.asarray(raw, np.float32) / 255.0
  as_float = analysis.score_dataset(feature_fn, lambda: [floats[:8], floats[8:]], key, 2,
                                    transform).scores
  for name in ("pixels", "h"):
    np.testing.assert_allclose(as_uint8[name], as_float[name], rtol=1e-5, atol=1e-6)
  # without it, the noise meets 0..255 values instead of 0..1: other scores
  unscaled = analysis.score_dataset(feature_fn, lambda: [raw[:8], raw[8:]], key, 2,
                                    transform).scores
  assert not np.allclose(unscaled["pixels"], as_float["pixels"], atol=1e-3)


def test_shape_mismatch_rejected():
  with pytest.raises(ValueError, match="same shape"):
    analysis.invariance_scores(jnp.zeros((3, 2)), jnp.zeros((3, 3)))


def test_score_copies_in_low_precision_is_the_float32_arithmetic():
  """All copies of a layer scored at once from bfloat16 activations = score_batch of
  each copy on the activations made float32 first."""
  rng = np.random.default_rng(6)
  clean = jnp.asarray(rng.normal(size=(30, 50)) + 3.0, jnp.bfloat16)
  moved = jnp.asarray(rng.normal(size=(30, 4, 50)) * 0.2 + 3.0, jnp.bfloat16)
  moved = moved.at[:, 1].set(clean)  # copy 1 identical: exactly 1
  c32 = clean.astype(jnp.float32)
  stats = analysis.LayerStats.of(c32)
  got = analysis.score_copies(stats, clean, moved)
  assert got.dtype == jnp.float32 and got.shape == (30, 4)
  for c in range(4):
    want = analysis.score_batch(stats, c32, moved[:, c].astype(jnp.float32))
    np.testing.assert_allclose(got[:, c], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[:, 1], 1.0)
  assert np.all(np.asarray(got[:, [0, 2, 3]]) < 1.0)


def _conv_net():
  """A tiny conv net whose weights are an argument: (weights, images) -> features."""
  def feature_fn(weights, x):
    h = jax.nn.relu(jax.lax.conv_general_dilated(
        x, weights["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return {"pixels": x, "conv": h, "dense": h.reshape(len(h), -1) @ weights["dense"]}
  rng = np.random.default_rng(8)
  weights = lambda: {"conv": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32),
                     "dense": jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)}
  return feature_fn, weights


def test_scorer_compiles_once_and_takes_the_weights_as_an_argument():
  """Weights given as an argument score as the same function closed over them; a
  Scorer called again, with other weights or on the same batches, traces nothing new
  and gives the scores of the weights it is given (the per-copy forward passes of
  test_streaming_equals_direct_and_keeps_layer_order as reference)."""
  feature_fn, new_weights = _conv_net()
  traces = []
  def counted(weights, x):
    traces.append(x.shape)
    return feature_fn(weights, x)
  rng = np.random.default_rng(9)
  images = jnp.asarray(rng.uniform(size=(10, 4, 4, 3)), jnp.float32)
  batches = lambda: [images[:6], images[6:]]
  transform = lambda key, x: x + 0.1 * jax.random.normal(key, x.shape)
  key = jax.random.key(3)
  w1, w2 = new_weights(), new_weights()
  closure = analysis.score_dataset(lambda x: feature_fn(w1, x), batches, key, 4,
                                   transform).scores
  scorer = analysis.Scorer(counted, 4, transform, weights=w1, copies_per_forward=2)
  first = scorer(batches, key).scores
  traced = len(traces)  # pass 1; pass 2's clean and 2 x 2 copies; both batch shapes
  assert traced == 8 and sorted(traces)[-1] == (12, 4, 4, 3)  # 2 copies x 6 images
  assert scorer(batches, key).scores.keys() == first.keys()
  scorer.weights = w2
  second = scorer(batches, key).scores
  assert len(traces) == traced  # nothing traced again
  assert list(first) == ["pixels", "conv", "dense"]
  for name in first:
    np.testing.assert_allclose(first[name], closure[name], rtol=1e-5, atol=1e-6)
  direct = jax.jit(lambda w, moved: {
      k: analysis.invariance_scores(v, feature_fn(w, moved)[k])
      for k, v in feature_fn(w, images).items()})
  for c in range(4):
    moved = jnp.concatenate([
        transform(jax.random.fold_in(jax.random.fold_in(key, i), c), b)
        for i, b in enumerate(batches())])
    for w, got in ((w1, first), (w2, second)):
      for name, want in direct(w, moved).items():
        np.testing.assert_allclose(got[name][:, c], want, rtol=1e-4, atol=1e-5)
  assert not np.allclose(first["dense"], second["dense"])
  for g in (1, 4):  # the 4 copies in 4 forward passes or in one: the same scores
    other = analysis.score_dataset(feature_fn, batches, key, 4, transform, weights=w1,
                                   copies_per_forward=g).scores
    for name in first:
      np.testing.assert_allclose(other[name], first[name], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="copies_per_forward=3 must divide"):
    analysis.Scorer(feature_fn, 4, transform, copies_per_forward=3)
