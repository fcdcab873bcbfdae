"""Eq. 1, 3, 4: the invariance loss against a naive double loop, and its properties."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invjax import losses
from tests import helpers


def naive_loss(features, seed_ids, include_self=False):
  f = np.asarray(features, np.float64).reshape(len(features), -1)
  b, d = f.shape
  within, allp = [], []
  for i, j in itertools.product(range(b), range(b)):
    if i == j and not include_self:
      continue
    dist = np.sum((f[i] - f[j]) ** 2) / d  # Eq. 1
    allp.append(dist)
    if seed_ids[i] == seed_ids[j]:
      within.append(dist)
  return np.mean(within) / np.mean(allp)


def literal_loss(f, ids):
  """Eq. 3 read literally, self-pairs counted in both means (numpy, float64)."""
  f = f.astype(np.float64)
  d = np.mean((f[:, None] - f[None]) ** 2, axis=-1)
  same = ids[:, None] == ids[None]
  return d[same].mean() / d.mean()


def test_literal_reference_agrees_with_naive_loop():
  rng = np.random.default_rng(9)
  f, ids = rng.normal(size=(10, 3)), np.repeat(np.arange(5), 2)
  assert literal_loss(f, ids) == pytest.approx(naive_loss(f, ids, include_self=True))


LAYOUTS = {
    "4 seeds x 4 copies": np.repeat(np.arange(4), 4),
    "interleaved": np.tile(np.arange(4), 4),
    "unequal groups": np.array([7, 7, 7, 3, 3, 9, 9, 9, 9, 1, 1, 7]),
    "with singletons": np.array([0, 0, 1, 2, 2, 2, 3, 4]),
    "large ids": np.array([10**6, 5, 10**6, 5, -3, -3]),
}


@pytest.mark.parametrize("method", losses.METHODS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_naive_double_loop(method, layout):
  ids = LAYOUTS[layout]
  rng = np.random.default_rng(len(ids))
  for shape in [(5,), (3, 3, 2)]:
    # A shared offset makes the ||a||^2 - 2ab + ||b||^2 expansion cancel badly unless
    # the implementation centres first.
    f = rng.normal(size=(len(ids), *shape)) + 30.0
    got = losses.invariance_loss(jnp.asarray(f, jnp.float32), jnp.asarray(ids), method)
    np.testing.assert_allclose(got, naive_loss(f, ids), rtol=2e-5)


@pytest.mark.parametrize("method", losses.METHODS)
@pytest.mark.parametrize("k,m", [(4, 4), (2, 8), (8, 2)])
def test_grouped_form_equals_seed_id_form(method, k, m):
  rng = np.random.default_rng(k * m)
  f = jnp.asarray(rng.normal(size=(k * m, 3, 2, 5)) + 10.0, jnp.float32)
  ids = jnp.repeat(jnp.arange(k), m)
  got = losses.grouped_invariance_loss(f, m, method)
  np.testing.assert_allclose(got, naive_loss(np.asarray(f), np.asarray(ids)), rtol=2e-5)
  g1 = jax.grad(losses.grouped_invariance_loss)(f, m, method)
  g2 = jax.grad(losses.invariance_loss)(f, ids, method)
  np.testing.assert_allclose(g1, g2, atol=1e-6, rtol=1e-4)


def test_grouped_form_rejects_bad_layout():
  with pytest.raises(ValueError, match="copies"):
    losses.grouped_invariance_loss(jnp.zeros((6, 2)), 4)
  with pytest.raises(ValueError, match="copies"):
    losses.grouped_invariance_loss(jnp.zeros((6, 2)), 1)


def test_methods_agree_in_value_and_gradient():
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(32, 6, 6, 8)), jnp.float32)
  ids = jnp.repeat(jnp.arange(4), 8)
  vals, grads = {}, {}
  for m in losses.METHODS:
    vals[m], grads[m] = jax.value_and_grad(losses.invariance_loss)(f, ids, m)
  np.testing.assert_allclose(vals["pairwise"], vals["moments"], rtol=1e-5)
  np.testing.assert_allclose(grads["pairwise"], grads["moments"], atol=1e-6, rtol=1e-4)
  assert float(jnp.max(jnp.abs(grads["moments"]))) > 0


def test_jit_and_copies_identical_give_zero():
  f = jnp.repeat(jax.random.normal(jax.random.key(0), (4, 10)), 3, axis=0)
  ids = jnp.repeat(jnp.arange(4), 3)
  for m in losses.METHODS:
    assert float(jax.jit(losses.invariance_loss, static_argnums=2)(f, ids, m)) == \
        pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", losses.METHODS)
def test_constant_layer_is_zero_with_zero_gradient(method):
  f = jnp.full((8, 4, 4, 3), 0.7)
  ids = jnp.repeat(jnp.arange(2), 4)
  val, grad = jax.value_and_grad(losses.invariance_loss)(f, ids, method)
  assert float(val) == 0.0
  assert np.all(np.isfinite(grad)) and float(jnp.max(jnp.abs(grad))) == 0.0


def _population_batch(key, k, m, dim=2048, sigma=0.5):
  """K seeds x M copies: copy = seed mean + sigma * noise (distances concentrate)."""
  k1, k2 = jax.random.split(key)
  centres = jax.random.normal(k1, (k, 1, dim))
  f = (centres + sigma * jax.random.normal(k2, (k, m, dim))).reshape(k * m, dim)
  return f, jnp.repeat(jnp.arange(k), m)


@pytest.mark.parametrize("method", losses.METHODS)
def test_nearly_independent_of_batch_size_and_copies(method):
  """The paper's property: L_inv barely moves with B and M when self-pairs are out.

  Exactly, the within-seed mean does not depend on M; the all-pairs mean holds a
  within-seed share (M - 1) / (B - 1), the only dependence left. Counting self-pairs
  (the equation read literally) scales the numerator by (M - 1) / M instead.
  """
  layouts = [(16, 8), (32, 4), (64, 2), (8, 16), (8, 8), (32, 8)]
  vals, literal = [], []
  for i, (k, m) in enumerate(layouts):
    f, ids = _population_batch(jax.random.key(i), k, m)
    vals.append(float(jax.jit(losses.invariance_loss, static_argnums=2)(f, ids, method)))
    literal.append(literal_loss(np.asarray(f[:, :256]), np.asarray(ids)))
  vals, literal = np.array(vals), np.array(literal)
  assert vals.max() / vals.min() < 1.12, vals
  assert literal.max() / literal.min() > 1.5, literal  # what the exclusion prevents


def test_rejects_bad_input():
  f = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="method"):
    losses.invariance_loss(f, jnp.arange(4), "cosine")
  with pytest.raises(ValueError, match="seed_ids"):
    losses.invariance_loss(f, jnp.arange(3))
  with pytest.raises(ValueError, match="B >= 2"):
    losses.invariance_loss(jnp.zeros((1, 3)), jnp.arange(1))


@pytest.mark.parametrize("n,alpha,ratio", [(9, 0.1, 10.0), (12, 0.3, 5.0), (2, 0.1, 10.0)])
def test_layer_weights_exponential_law(n, alpha, ratio):
  w = np.asarray(losses.layer_weights(n, alpha, ratio))
  assert w.shape == (n,)
  np.testing.assert_allclose(w.sum(), alpha, rtol=1e-6)
  np.testing.assert_allclose(w[-1] / w[0], ratio, rtol=1e-5)
  steps = w[1:] / w[:-1]  # geometric: a constant factor per layer
  np.testing.assert_allclose(steps, ratio ** (1 / (n - 1)), rtol=1e-5)


def test_layer_weights_single_layer_and_errors():
  np.testing.assert_allclose(losses.layer_weights(1, 0.1), [0.1])
  with pytest.raises(ValueError):
    losses.layer_weights(0)


def test_total_loss_eq4():
  ce = jnp.float32(2.0)
  inv = {"a": jnp.float32(0.5), "b": jnp.float32(0.25)}
  w = losses.layer_weights(2, 0.1, 10.0)
  expected = 0.9 * 2.0 + float(w[0]) * 0.5 + float(w[1]) * 0.25
  assert float(losses.total_loss(ce, inv, w, 0.1)) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_matches_reference():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, 2])
  p = np.exp(np.asarray(logits))
  p /= p.sum(1, keepdims=True)
  ref = -np.mean(np.log(p[[0, 1], [0, 2]]))
  assert float(losses.cross_entropy(logits, labels)) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("method", losses.METHODS)
def test_gradient_matches_finite_differences(method):
  """jax.grad of L_inv against central differences of the float64 naive loop."""
  rng = np.random.default_rng(4)
  f = rng.normal(size=(6, 4))
  ids = np.array([0, 0, 1, 1, 2, 2])
  grad = np.asarray(jax.grad(losses.invariance_loss)(jnp.asarray(f, jnp.float32),
                                                     jnp.asarray(ids), method))
  eps = 1e-5
  fd = np.zeros_like(f)
  for idx in np.ndindex(*f.shape):
    up, down = f.copy(), f.copy()
    up[idx] += eps
    down[idx] -= eps
    fd[idx] = (naive_loss(up, ids) - naive_loss(down, ids)) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("n,alpha,ratio", [(9, 0.1, 10.0), (3, 0.3, 4.0)])
def test_layer_weight_laws_sum_to_alpha_and_have_their_shapes(n, alpha, ratio):
  w = {law: np.asarray(losses.layer_weights(n, alpha, ratio, law))
       for law in losses.WEIGHT_LAWS}
  for v in w.values():
    assert v.shape == (n,) and np.all(v > 0)
    np.testing.assert_allclose(v.sum(), alpha, rtol=1e-6)
  np.testing.assert_allclose(w["exponential"],
                             losses.layer_weights(n, alpha, ratio), rtol=1e-7)
  np.testing.assert_allclose(w["uniform"], alpha / n, rtol=1e-6)
  lin = w["linear"]
  np.testing.assert_allclose(np.diff(lin), np.diff(lin)[0], rtol=1e-4)  # equal steps
  np.testing.assert_allclose(lin[-1] / lin[0], ratio, rtol=1e-5)
  dec = w["decay"]
  np.testing.assert_allclose(dec[0] / dec[-1], ratio, rtol=1e-5)
  np.testing.assert_allclose(dec[1:] / dec[:-1], ratio ** (-1 / (n - 1)), rtol=1e-5)
  with pytest.raises(ValueError, match="valid laws"):
    losses.layer_weights(n, alpha, ratio, "cubic")


@pytest.mark.parametrize("layout", ["grouped", "seed ids"])
def test_moments_gradient_matches_autodiff_of_the_naive_form(layout):
  """The custom_vjp of the moments method against jax.grad of the pair loop."""
  rng = np.random.default_rng(11)
  for k, m in [(4, 4), (3, 2)]:
    f = jnp.asarray(rng.normal(size=(k * m, 3, 5)) * rng.uniform(0.1, 10)
                    + rng.normal(size=(1, 3, 5)), jnp.float32)
    ids = jnp.repeat(jnp.arange(k), m)
    if layout == "grouped":
      fn = functools.partial(losses.grouped_invariance_loss, copies=m,
                             method="moments")
    else:  # shuffled, so that the seeds' examples are not consecutive
      perm = rng.permutation(k * m)
      f, ids = f[perm], ids[perm]
      fn = functools.partial(losses.invariance_loss, seed_ids=ids, method="moments")
    val, grad = jax.jit(jax.value_and_grad(fn))(f)
    ref_val, ref_grad = jax.jit(jax.value_and_grad(helpers.naive_invariance_loss))(f, ids)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(ref_grad))))


@pytest.mark.parametrize("method", losses.METHODS)
def test_bfloat16_activations_match_the_float64_reference(method):
  """bf16 activations (half precision) are read as they are and summed in float32: the
  value is that of the float64 double loop over the same bf16 numbers, and the
  gradient, in bf16, that of autodiff of the float32 pair loop to bf16's precision."""
  rng = np.random.default_rng(5)
  k, m = 4, 4
  f = jnp.asarray(np.maximum(rng.normal(size=(k * m, 4, 4, 6)) + 0.5, 0) * 3.0,
                  jnp.bfloat16)  # post-ReLU-like: a common offset, exact zeros
  ids = jnp.repeat(jnp.arange(k), m)
  exact = np.asarray(f.astype(jnp.float32), np.float64)
  val, grad = jax.jit(jax.value_and_grad(
      lambda f: losses.grouped_invariance_loss(f, m, method)))(f)
  assert val.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(val, naive_loss(exact, np.asarray(ids)), rtol=2e-5)
  by_ids = jax.jit(losses.invariance_loss, static_argnums=2)(f, ids, method)
  np.testing.assert_allclose(by_ids,
                             naive_loss(exact, np.asarray(ids)), rtol=2e-5)
  ref = jax.jit(jax.grad(helpers.naive_invariance_loss))(f.astype(jnp.float32), ids)
  np.testing.assert_allclose(np.asarray(grad, np.float32), ref, rtol=1e-2,
                             atol=1e-2 * float(jnp.max(jnp.abs(ref))))


def test_moments_keeps_no_float32_copy_of_the_activations():
  """The moments method reads bf16 activations as they are: its compiled value and
  gradient hold no float32 copy of them (an older form cast, centred and scaled the
  whole layer). The per-seed form's temporaries are its [K, D] float32 seed sums;
  the one-read form keeps only [parts, D] vectors."""
  k, m, d = 16, 8, 2048
  f = jnp.zeros((k * m, d), jnp.bfloat16)
  for form, parts, most in (("per_seed", 1, 4 * k * m * d / 2),
                            ("one_read", 1, k * d * 4), ("one_read", 4, k * d * 4)):
    compiled = jax.jit(jax.value_and_grad(
        lambda f: losses.grouped_invariance_loss(f, m, "moments", parts, form))).lower(
            f).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert 0 < temp < most, (form, parts, temp)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_moments_value_and_gradient_bytes(dtype):
  """XLA's cost analysis of the moments method's value and gradient (issue 14's
  measure): the bytes it touches over the bytes of the activations, All-CNN-C's batch
  layout 16 x 8. The floor is 3 x: one read for the sums, one read and one write for
  the gradient. The one-read form comes within 10 % of it; the per-seed form writes
  and reads back its [K, D] float32 seed sums (4.88 x for bf16 All-CNN-C)."""
  k, m, d = 16, 8, 8192
  f = jnp.zeros((k * m, d), dtype)
  for form, parts, most in (("one_read", 1, 3.3), ("one_read", 4, 3.9),
                            ("per_seed", 1, 6.0)):
    compiled = jax.jit(jax.value_and_grad(
        lambda f: losses.grouped_invariance_loss(f, m, "moments", parts, form))).lower(
            f).compile()
    ratio = float(compiled.cost_analysis()["bytes accessed"]) / f.nbytes
    assert 2.9 < ratio < most, (form, parts, ratio)


@pytest.mark.parametrize("k,m", [(8, 4), (6, 2), (4, 8)])
def test_moments_forms_and_parts_match_the_pair_loop(k, m):
  """The grouped moments method in both forms, the one-read form's seeds merged in
  any number of parts (one seed per part included; a number that does not divide K
  is reduced), against autodiff of the pair loop: value and gradient, at an offset
  100 x the spread."""
  rng = np.random.default_rng(k * m)
  f = jnp.asarray(rng.normal(size=(k * m, 3, 5)) + 100.0 * rng.normal(size=(1, 3, 5)),
                  jnp.float32)
  ids = jnp.repeat(jnp.arange(k), m)
  ref_grad = jax.jit(jax.grad(helpers.naive_invariance_loss))(f, ids)
  cases = [("one_read", p) for p in sorted({1, 2, 3, k // 2, k, 5})] + [("per_seed", 1)]
  for form, parts in cases:
    val, grad = jax.jit(jax.value_and_grad(functools.partial(
        losses.grouped_invariance_loss, copies=m, method="moments", parts=parts,
        form=form)))(f)
    np.testing.assert_allclose(val, naive_loss(np.asarray(f), np.asarray(ids)),
                               rtol=1e-4, err_msg=f"{form}, parts={parts}")
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-3,
                               atol=1e-3 * float(jnp.max(jnp.abs(ref_grad))),
                               err_msg=f"{form}, parts={parts}")
  with pytest.raises(ValueError, match="parts >= 1"):
    losses.grouped_invariance_loss(f, m, "moments", 0)
  with pytest.raises(ValueError, match="valid forms"):
    losses.grouped_invariance_loss(f, m, "moments", 1, "fused")


def test_moment_parts_and_form():
  """One part per device (a divisor of K); the per-seed form on a CPU only."""
  assert [losses.moment_parts(16, d) for d in (1, 2, 8, 16)] == [1, 2, 8, 16]
  assert losses.moment_parts(6, 4) == 2
  assert losses.moment_form("cpu") == "per_seed"
  assert losses.moment_form("gpu") == losses.moment_form("tpu") == "one_read"


@pytest.mark.parametrize("method,form,parts,small", [
    ("moments", "one_read", 1, losses.SMALL_LAYER), ("moments", "one_read", 1, 12),
    ("moments", "one_read", 2, losses.SMALL_LAYER), ("moments", "per_seed", 1, 0),
    ("pairwise", "one_read", 1, 0)])
def test_every_layer_at_once_matches_each_layer_alone(method, form, parts, small,
                                                      monkeypatch):
  """`grouped_invariance_losses` (the train step's: in the one-read form one reduction
  and one pass of arithmetic for every layer) against the pair loop, layer by layer:
  layers of different sizes (so padded to the longest) and scales (1e-12 .. 1e12, an
  offset 100 x the spread), bf16 and float32, the value and the gradient of a
  weighted sum of the losses with respect to each layer. The one-read form reads
  small layers of one dtype together: here the float32 layers a, c and d (15, 12
  and 1 features), or with `small` = 12 only c and d."""
  monkeypatch.setattr(losses, "SMALL_LAYER", small)
  rng = np.random.default_rng(parts + len(form))
  k, m = 4, 4
  ids = jnp.repeat(jnp.arange(k), m)
  shapes = {"a": ((3, 5), 1e-12, jnp.float32), "b": ((7,), 1.0, jnp.bfloat16),
            "c": ((2, 2, 3), 1e12, jnp.float32), "d": ((1,), 1e3, jnp.float32)}
  feats = {name: jnp.asarray(scale * (rng.normal(size=(k * m, *shape))
                                      + 100.0 * rng.normal(size=(1, *shape))), dtype)
           for name, (shape, scale, dtype) in shapes.items()}
  weights = {name: float(w) for name, w in zip(feats, rng.uniform(0.5, 2.0, len(feats)))}

  def weighted(fs):
    got = losses.grouped_invariance_losses(fs, m, method, parts, form)
    assert list(got) == list(fs)
    return sum(weights[n] * v for n, v in got.items()), got

  (_, got), grads = jax.jit(jax.value_and_grad(weighted, has_aux=True))(feats)
  for name, f in feats.items():
    exact = np.asarray(f.astype(jnp.float32), np.float64)
    assert got[name].dtype == jnp.float32 and grads[name].dtype == f.dtype
    np.testing.assert_allclose(got[name], naive_loss(exact, np.asarray(ids)), rtol=2e-4,
                               err_msg=name)
    # The pair loop's gradient, at unit scale (L_inv's gradient scales as 1 / scale).
    scale = float(jnp.max(jnp.abs(f.astype(jnp.float32))))
    unit = f.astype(jnp.float32) / scale
    ref = weights[name] * jax.grad(helpers.naive_invariance_loss)(unit, ids) / scale
    g = np.asarray(grads[name], np.float32)
    assert np.all(np.isfinite(g)), name
    tol = 2e-2 if f.dtype == jnp.bfloat16 else 2e-3
    np.testing.assert_allclose(g * scale, ref * scale, rtol=tol,
                               atol=tol * float(jnp.max(jnp.abs(ref * scale))),
                               err_msg=name)


def test_every_layer_at_once_checks_its_input():
  f = jnp.zeros((8, 3))
  assert losses.grouped_invariance_losses({}, 4, "moments") == {}
  with pytest.raises(ValueError, match="one batch size"):
    losses.grouped_invariance_losses({"a": f, "b": jnp.zeros((4, 3))}, 4, "moments")
  with pytest.raises(ValueError, match="copies >= 2 dividing"):
    losses.grouped_invariance_losses({"a": f}, 3, "moments")
  with pytest.raises(ValueError, match="valid methods"):
    losses.grouped_invariance_losses({"a": f}, 4, "cosine")


# The class denominator ("class": the authors' training code divides by the mean
# distance over the pairs of the same class, not over every pair) ----------------------

SEED_CLASSES = {
    "classes of 1 to 3 seeds": np.array([3, 1, 3, 7, 1, 3]),
    "every seed its own class": np.array([0, 1, 2, 3, 4, 5]),
    "large and negative labels": np.array([10**6, -2, -2, 10**6, 5, 10**6]),
}


@pytest.mark.parametrize("method", losses.METHODS)
@pytest.mark.parametrize("name", list(SEED_CLASSES))
def test_class_denominator_matches_the_pair_loop_in_value_and_gradient(method, name):
  """Grouped (every form) and seed-id layouts (shuffled) against the float64 double
  loop and jax.grad of the JAX pair loop, with a shared offset of 20 (cancellation)."""
  sc, m = SEED_CLASSES[name], 4
  k = len(sc)
  rng = np.random.default_rng(k + len(name))
  f = jnp.asarray(rng.normal(size=(k * m, 3, 5)) * rng.uniform(0.1, 10) + 20.0,
                  jnp.float32)
  ids, cls = np.repeat(np.arange(k), m), np.repeat(sc, m)
  ref = jax.jit(jax.value_and_grad(helpers.naive_invariance_loss))
  ref_val, ref_grad = ref(f - 20.0, jnp.asarray(ids), jnp.asarray(cls))
  f64 = np.asarray(f, np.float64)
  pair_mean = lambda mask: np.mean([np.mean((f64[i] - f64[j]) ** 2)
                                    for i, j in itertools.product(range(k * m), repeat=2)
                                    if i != j and mask[i] == mask[j]])
  np.testing.assert_allclose(ref_val, pair_mean(ids) / pair_mean(cls), rtol=1e-5)
  # (every seed its own class: L = 1 whatever the activations, a gradient of 0)
  tol = dict(rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref_grad))) + 1e-8)
  for form in losses.MOMENT_FORMS:
    val, grad = jax.jit(jax.value_and_grad(functools.partial(
        losses.grouped_invariance_loss, copies=m, method=method, form=form,
        seed_classes=jnp.asarray(sc))))(f)
    np.testing.assert_allclose(val, ref_val, rtol=2e-5, err_msg=form)
    np.testing.assert_allclose(grad, ref_grad, **tol, err_msg=form)
  perm = rng.permutation(k * m)
  val, grad = jax.jit(jax.value_and_grad(functools.partial(
      losses.invariance_loss, seed_ids=jnp.asarray(ids[perm]), method=method,
      classes=jnp.asarray(cls[perm]))))(f[perm])
  np.testing.assert_allclose(val, ref_val, rtol=2e-5)
  np.testing.assert_allclose(grad, ref_grad[perm], **tol)


@pytest.mark.parametrize("method", losses.METHODS)
def test_class_denominator_with_unequal_seeds_in_any_order(method):
  """Seed-id layout, seeds of 1 to 4 examples interleaved (a singleton seed has no
  pair of its own), classes of several seeds: value and gradient of the pair loop."""
  ids = LAYOUTS["unequal groups"]  # seeds 7 (4 examples), 3 (2), 9 (4), 1 (2)
  cls = np.array([{7: 0, 3: 1, 9: 0, 1: 1}[i] for i in ids])
  rng = np.random.default_rng(21)
  f = jnp.asarray(rng.normal(size=(len(ids), 6)) * 3.0 + 5.0, jnp.float32)
  val, grad = jax.value_and_grad(losses.invariance_loss)(
      f, jnp.asarray(ids), method, jnp.asarray(cls))
  ref_val, ref_grad = jax.value_and_grad(helpers.naive_invariance_loss)(
      f - 5.0, jnp.asarray(ids), jnp.asarray(cls))
  np.testing.assert_allclose(val, ref_val, rtol=2e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4,
                             atol=1e-5 * float(jnp.max(jnp.abs(ref_grad))))
  ids, cls = np.array([0, 0, 1, 2, 2, 2, 3, 4]), np.array([0, 0, 1, 0, 0, 0, 1, 1])
  f = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)  # "with singletons"
  np.testing.assert_allclose(
      losses.invariance_loss(f, jnp.asarray(ids), method, jnp.asarray(cls)),
      helpers.naive_invariance_loss(f, jnp.asarray(ids), jnp.asarray(cls)), rtol=2e-5)


@pytest.mark.parametrize("method", losses.METHODS)
def test_class_denominator_of_one_class_is_the_batch_denominator(method):
  """One class over the batch gives Eq. 3 as the paper writes it; seeds of different
  classes raise the loss, since same-class pairs are closer than pairs in general."""
  rng = np.random.default_rng(3)
  k, m = 8, 4
  centres = rng.normal(size=(2, 1, 30)) * 5  # two classes far apart
  sc = np.repeat([0, 1], k // 2)
  f = jnp.asarray((centres[sc] + rng.normal(size=(k, 1, 30))
                   + 0.3 * rng.normal(size=(k, m, 30))).reshape(k * m, 30), jnp.float32)
  batch = losses.grouped_invariance_loss(f, m, method)
  one = losses.grouped_invariance_loss(f, m, method, seed_classes=jnp.zeros(k, jnp.int32))
  two = losses.grouped_invariance_loss(f, m, method, seed_classes=jnp.asarray(sc))
  np.testing.assert_allclose(one, batch, rtol=1e-5)
  assert float(two) > 3 * float(batch)


def test_class_denominator_every_layer_at_once_and_its_checks():
  rng = np.random.default_rng(4)
  feats = {"a": jnp.asarray(rng.normal(size=(12, 4, 4, 2)), jnp.bfloat16),
           "b": jnp.asarray(rng.normal(size=(12, 7)), jnp.float32)}
  sc = jnp.asarray([1, 0, 1])
  got = losses.grouped_invariance_losses(feats, 4, "moments", seed_classes=sc)
  for name, f in feats.items():
    ref = helpers.naive_invariance_loss(f, jnp.repeat(jnp.arange(3), 4),
                                        jnp.repeat(sc, 4))
    np.testing.assert_allclose(got[name], ref, rtol=2e-5, err_msg=name)
  # The class sums are products with a same-class matrix: at full float32 precision,
  # not a GPU's default (operands rounded to 10 bits, which would spoil the deviations).
  text = jax.jit(lambda f: losses.grouped_invariance_loss(
      f, 4, "moments", seed_classes=sc)).lower(feats["b"]).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert dots and all("precision = [HIGHEST, HIGHEST]" in line for line in dots)
  with pytest.raises(ValueError, match=r"seed_classes must have shape \[3\]"):
    losses.grouped_invariance_loss(feats["b"], 4, "moments", seed_classes=jnp.zeros(12))
  with pytest.raises(ValueError, match="classes must have shape"):
    losses.invariance_loss(feats["b"], jnp.arange(12), "moments", jnp.zeros(3))
