"""Linear CKA and RSA (invjax/similarity.py) against naive NumPy references in float64,
and their known properties."""

import numpy as np
import pytest

from invjax import similarity as sim


def cka_reference(x, y):
  """Linear CKA from the whole N x N centred Gram matrices, as defined."""
  x = x.reshape(len(x), -1).astype(np.float64)
  y = y.reshape(len(y), -1).astype(np.float64)
  h = np.eye(len(x)) - 1.0 / len(x)
  k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
  return np.sum(k * l) / (np.linalg.norm(k) * np.linalg.norm(l))


def rsa_reference(x, y):
  """Pearson correlation of the upper triangles of the correlation-distance RDMs."""
  rdm = lambda a: 1.0 - np.corrcoef(a.reshape(len(a), -1).astype(np.float64))
  upper = np.triu_indices(len(x), 1)
  return np.corrcoef(rdm(x)[upper], rdm(y)[upper])[0, 1]


def _pair(seed, n=37, dx=(5, 4), dy=7):
  """Related random activations: y is a noisy linear map of x."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, *dx)) + 0.5
  y = x.reshape(n, -1) @ rng.normal(size=(x[0].size, dy)) + rng.normal(size=(n, dy))
  return x.astype(np.float32), y.astype(np.float32)


# Blocks of 8 of 37 images or 20 features: several, the last padded.
@pytest.mark.parametrize("dims", [(5, 4), (300,)])  # feature form, sample form
def test_linear_cka_matches_reference(dims):
  x, y = _pair(0, dx=dims)
  assert sim.linear_cka(x, y, 8) == pytest.approx(cka_reference(x, y), rel=1e-5)
  assert sim.linear_cka(x, y, 1024) == pytest.approx(cka_reference(x, y), rel=1e-5)


def test_rsa_matches_reference():
  x, y = _pair(1)
  assert sim.rsa(x, y, 8) == pytest.approx(rsa_reference(x, y), rel=1e-5)


@pytest.mark.parametrize("measure,ref", [("cka", cka_reference), ("rsa", rsa_reference)])
def test_similarity_matrix_matches_reference(measure, ref):
  rng = np.random.default_rng(2)
  x, y = _pair(2, n=29)
  rows = {"x": x, "noise": rng.normal(size=(29, 40)).astype(np.float32)}
  cols = {"y": y, "x": x, "wide": rng.normal(size=(29, 3, 3, 20)).astype(np.float32)}
  got = sim.similarity_matrix(rows, cols, measure, block=8)
  want = np.array([[ref(a, b) for b in cols.values()] for a in rows.values()])
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [(6,), (80,)])
def test_cka_properties(dims):
  """CKA(X, X) = 1; invariant to an orthogonal transform and an isotropic scaling of
  either side (and to a shift, by the centring)."""
  x, y = _pair(3, n=31, dx=dims)
  rng = np.random.default_rng(4)
  q, _ = np.linalg.qr(rng.normal(size=(y.shape[1], y.shape[1])))
  assert sim.linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
  base = sim.linear_cka(x, y)
  assert sim.linear_cka(x, y @ q.astype(np.float32)) == pytest.approx(base, rel=1e-5)
  assert sim.linear_cka(3.7 * x, y) == pytest.approx(base, rel=1e-5)
  assert sim.linear_cka(x, 0.01 * y + 5.0) == pytest.approx(base, rel=1e-5)
  # ... but not to a non-isotropic scaling.
  scale = np.linspace(0.1, 3.0, y.shape[1], dtype=np.float32)
  assert abs(sim.linear_cka(x, y * scale) - base) > 1e-3
  m = sim.similarity_matrix({"x": x, "y": y}, {"x": x, "y": y})
  np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
  np.testing.assert_allclose(m, m.T, rtol=1e-6)


def test_rsa_properties():
  """RSA of a layer with itself is 1; the correlation distance ignores a per-image
  shift and scale, and an orthogonal map that keeps the per-image mean (here, a
  permutation of the features); it is symmetric."""
  x, y = _pair(5)
  flat = x.reshape(len(x), -1)
  rng = np.random.default_rng(6)
  assert sim.rsa(x, x) == pytest.approx(1.0, abs=1e-6)
  base = sim.rsa(x, y)
  assert sim.rsa(y, x) == pytest.approx(base, rel=1e-6)
  per_image = flat * rng.uniform(0.5, 2, (len(x), 1)) + rng.normal(size=(len(x), 1))
  assert sim.rsa(per_image.astype(np.float32), y) == pytest.approx(base, rel=1e-5)
  assert sim.rsa(flat[:, rng.permutation(flat.shape[1])], y) == pytest.approx(
      base, rel=1e-5)
  # ... but a different per-feature scaling changes it.
  assert abs(sim.rsa(flat * np.linspace(0.1, 3, flat.shape[1]), y) - base) > 1e-3


def test_constant_layer_and_bad_input():
  x, _ = _pair(7)
  flat = np.ones((len(x), 4), np.float32)
  assert np.isnan(sim.linear_cka(x, flat))
  with pytest.raises(ValueError, match="same images"):
    sim.linear_cka(x, x[:-1])
  with pytest.raises(ValueError, match="same images"):
    sim.similarity_matrix({"a": x}, {"b": x[:-1]})
  with pytest.raises(ValueError, match="valid measures"):
    sim.similarity_matrix({"a": x}, {"b": x}, "cca")
  with pytest.raises(ValueError, match="at least 2 images"):
    sim.linear_cka(x[:1], x[:1])
