"""Tests for invjax/augment.py against naive numpy references.

Conventions (module docstring): images float32 [N, H, W, C] in [0, 1]; forward matrix
A = [[f zx cos t, -zy sin(t + phi), tx W], [zx sin t, zy cos(t + phi), ty H]] in centred
(x right, y down) pixel coordinates; output pixel q samples the input at
c + L^-1 (q - c - t), bilinear, coordinates clamped to the image ('nearest'), then
contrast, brightness and clipping to [0, 1].
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from invjax import augment

TRUNC2_STD = 0.8796256610342398  # std of a standard normal truncated at +-2

# Compiled once per shape; the eager API is exercised in test_augment_* below.
_apply = jax.jit(augment.apply)
_augment = jax.jit(augment.augment, static_argnames=("ranges", "scoring"))
N, H, W, C = 4, 12, 10, 3  # the common (non-square) batch shape


# ---------------------------------------------------------------------------
# Naive numpy references.
# ---------------------------------------------------------------------------

def _params(n=1, **kw):
  """AugmentParams of batch n; each keyword a scalar or a length-n sequence."""
  base = augment.AugmentParams.identity(n)._asdict()
  for k, v in kw.items():
    base[k] = jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,))
  return augment.AugmentParams(**base)


def _ref_warp_one(img, flip, tx, ty, zx, zy, theta, phi):
  """Loops over output pixels: pull from c + L^-1 (q - c - t), clamp, bilinear; then,
  for flip -1, the result mirrored left to right (the warped image's mirror image)."""
  if flip < 0:
    return _ref_warp_one(img, 1.0, tx, ty, zx, zy, theta, phi)[:, ::-1]
  img = np.asarray(img, np.float64)
  h, w, _ = img.shape
  lin = np.array([[zx * math.cos(theta), -zy * math.sin(theta + phi)],
                  [zx * math.sin(theta), zy * math.cos(theta + phi)]])
  inv = np.linalg.inv(lin)
  t = np.array([tx * w, ty * h])
  c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
  out = np.empty_like(img)
  for i in range(h):  # row = y
    for j in range(w):  # column = x
      sx, sy = c + inv @ (np.array([j, i], np.float64) - c - t)
      sx = min(max(sx, 0.0), w - 1.0)
      sy = min(max(sy, 0.0), h - 1.0)
      x0, y0 = int(math.floor(sx)), int(math.floor(sy))
      x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
      wx, wy = sx - x0, sy - y0
      out[i, j] = ((1 - wy) * ((1 - wx) * img[y0, x0] + wx * img[y0, x1])
                   + wy * ((1 - wx) * img[y1, x0] + wx * img[y1, x1]))
  return out


def _ref_photometric(x, gamma, delta):
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=(-3, -2), keepdims=True)
  return np.clip(gamma * (x - mean) + mean + delta, 0.0, 1.0)


def _ref_apply(images, p):
  p = {k: np.asarray(v, np.float64) for k, v in p._asdict().items()}
  outs = []
  for n in range(images.shape[0]):
    warped = _ref_warp_one(images[n], p["flip"][n], p["tx"][n], p["ty"][n], p["zx"][n],
                           p["zy"][n], p["theta"][n], p["phi"][n])
    outs.append(_ref_photometric(warped, p["gamma"][n], p["delta"][n]))
  return np.stack(outs)


def _rand_images(seed, shape):
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


# ---------------------------------------------------------------------------
# 1-6: apply() geometry and photometry.
# ---------------------------------------------------------------------------

def test_identity_params_return_image():
  images = _rand_images(0, (N, H, W, C))
  out = _apply(jnp.asarray(images), augment.AugmentParams.identity(N))
  assert out.shape == images.shape
  np.testing.assert_allclose(np.asarray(out), images, rtol=0, atol=1e-6)


def test_flip_mirrors_width_axis():
  images = _rand_images(1, (N, H, W, C))
  out = _apply(jnp.asarray(images), _params(N, flip=-1.0))
  np.testing.assert_allclose(np.asarray(out), images[:, :, ::-1], rtol=0, atol=1e-6)
  # Not a vertical mirror nor a no-op.
  assert not np.allclose(np.asarray(out), images[:, ::-1], atol=1e-3)
  assert not np.allclose(np.asarray(out), images, atol=1e-3)


def test_a_flipped_copy_is_the_mirror_image_of_the_unflipped_one():
  # With rotation, shear, scale and translation too: a flip mirrors the warped image
  # and does not distort it (its linear part keeps the unflipped one's |determinant|).
  rng = np.random.default_rng(5)
  images = _rand_images(5, (N, H, W, C))
  kw = _random_warp_params(rng, N)
  mirrored = np.asarray(_apply(jnp.asarray(images), _params(N, **kw)))
  kw["flip"] = np.ones(N)
  plain = np.asarray(_apply(jnp.asarray(images), _params(N, **kw)))
  np.testing.assert_allclose(mirrored, plain[:, :, ::-1], rtol=0, atol=1e-5)
  assert not np.allclose(mirrored, plain, atol=1e-3)
  det = lambda f: np.linalg.det(np.asarray(augment.forward_matrix(
      _params(N, **{**kw, "flip": f * np.ones(N)}), H, W))[:, :, :2])
  np.testing.assert_allclose(det(-1.0), -det(1.0), rtol=1e-5)


@pytest.mark.parametrize("size", [8, 9])
def test_rotation_quarter_turn_is_clockwise_on_screen(size):
  images = _rand_images(2, (1, size, size, 3))
  out = np.asarray(_apply(jnp.asarray(images), _params(1, theta=math.pi / 2)))
  expected = np.rot90(images[0], k=-1, axes=(0, 1))
  np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-5)
  # The other sense must not match (guards against a sign error passing by accident).
  assert not np.allclose(out[0], np.rot90(images[0], k=1, axes=(0, 1)), atol=1e-3)


def test_rotation_moves_point_right_of_centre_below_it():
  # Single bright pixel right of the centre of a 9x9 image: at (row 4, col 6).
  img = np.zeros((1, 9, 9, 3), np.float32)
  img[0, 4, 6, :] = 1.0
  out = np.asarray(_apply(jnp.asarray(img), _params(1, theta=math.pi / 2)))
  assert np.unravel_index(np.argmax(out[0, ..., 0]), (9, 9)) == (6, 4)
  assert out[0, 6, 4, 0] == pytest.approx(1.0, abs=1e-5)


def test_integer_translation_shifts_right_and_down():
  h, w = H, W
  images = _rand_images(3, (N, h, w, C))
  out = np.asarray(_apply(jnp.asarray(images), _params(N, tx=2.0 / w, ty=1.0 / h)))
  # Interior: output[y, x] == input[y - 1, x - 2].
  np.testing.assert_allclose(out[:, 1:, 2:], images[:, :-1, :-2], rtol=0, atol=1e-5)
  # Edges ('nearest'): the first row / first two columns repeat the input's edge.
  np.testing.assert_allclose(out[:, 0, 2:], images[:, 0, :-2], rtol=0, atol=1e-5)
  np.testing.assert_allclose(out[:, 1:, 0], images[:, :-1, 0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(out[:, 1:, 1], images[:, :-1, 0], rtol=0, atol=1e-5)


def _random_warp_params(rng, n):
  sgn = lambda: rng.choice([-1.0, 1.0], size=n)
  return dict(
      flip=-np.ones(n),  # all mirrored; also checked with +1 below
      tx=sgn() * rng.uniform(0.03, 0.15, n),
      ty=sgn() * rng.uniform(0.03, 0.15, n),
      zx=rng.uniform(0.8, 1.25, n),
      zy=rng.uniform(0.8, 1.25, n),
      theta=sgn() * rng.uniform(0.1, 0.6, n),
      phi=sgn() * rng.uniform(0.05, 0.3, n),
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_general_warp_matches_naive_reference(seed):
  rng = np.random.default_rng(100 + seed)
  n = N
  images = _rand_images(seed, (N, H, W, C))
  kw = _random_warp_params(rng, n)
  kw["flip"][0] = 1.0  # one unflipped example in the batch
  p = _params(n, **kw)
  # Sanity: all geometric parameters nonzero / non-identity.
  assert all(np.all(np.abs(kw[k]) > 0.02) for k in ("tx", "ty", "theta", "phi"))
  out = np.asarray(_apply(jnp.asarray(images), p))
  ref = _ref_apply(images, p)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_full_pipeline_matches_naive_reference():
  rng = np.random.default_rng(7)
  n = N
  images = _rand_images(11, (N, H, W, C))
  kw = _random_warp_params(rng, n)
  kw["flip"] = np.array([1.0, -1.0, 1.0, -1.0])
  kw["gamma"] = np.array([0.6, 1.4, 1.2, 0.8])
  kw["delta"] = np.array([0.2, -0.2, 0.1, -0.05])
  p = _params(n, **kw)
  out = np.asarray(_apply(jnp.asarray(images), p))
  np.testing.assert_allclose(out, _ref_apply(images, p), rtol=0, atol=1e-4)


def test_contrast_and_brightness_with_identity_geometry():
  n = N
  images = _rand_images(4, (N, H, W, C))
  images[1, ..., 2] *= 0.2  # channel means differ clearly
  gamma = np.array([0.5, 1.5, 1.3, 0.7], np.float32)
  delta = np.array([0.25, -0.25, 0.1, 0.0], np.float32)
  out = np.asarray(_apply(jnp.asarray(images), _params(n, gamma=gamma, delta=delta)))
  mean = images.astype(np.float64).mean(axis=(1, 2), keepdims=True)
  expected = np.clip(gamma[:, None, None, None] * (images - mean) + mean
                     + delta[:, None, None, None], 0.0, 1.0)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
  # Clipping really happens in this case, and values stay in [0, 1].
  assert out.min() == 0.0 and out.max() == 1.0


def test_batch_equals_per_image_application():
  rng = np.random.default_rng(5)
  n = N
  images = _rand_images(6, (N, H, W, C))
  kw = _random_warp_params(rng, n)
  kw["gamma"] = np.array([0.7, 1.0, 1.3, 0.9])
  kw["delta"] = np.array([0.1, 0.0, -0.1, 0.05])
  p = _params(n, **kw)
  batch = np.asarray(_apply(jnp.asarray(images), p))
  for i in range(n):
    pi = augment.AugmentParams(*[v[i:i + 1] for v in p])
    single = np.asarray(_apply(jnp.asarray(images[i:i + 1]), pi))
    np.testing.assert_allclose(batch[i], single[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# The warp against dm-pix's affine_transform (order 1, mode "nearest"), the 3-D
# interpolation it replaced, as the naive reference.
# ---------------------------------------------------------------------------

_warp = jax.jit(augment.warp)


_pix_warp = jax.jit(augment.dm_pix_warp)


def _random_pulls(rng, h, w):
  """Pull matrices [8, 2, 3] ((y, x) order): the identity, a mirror, a half turn,
  random ones with large rotations, scales of 0.3 to 3 and shifts that sample far
  outside the image, and one that lands wholly outside it."""
  cy, cx = (h - 1) / 2, (w - 1) / 2
  pulls = [np.array([[1.0, 0, 0], [0, 1, 0]]),
           np.array([[1.0, 0, 0], [0, -1, w - 1]]),  # x -> W - 1 - x
           np.array([[-1.0, 0, h - 1], [0, -1, w - 1]])]  # half turn
  for _ in range(4):
    t = rng.uniform(-math.pi, math.pi)
    lin = (np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
           @ np.diag(rng.uniform(0.3, 3.0, 2)) + rng.normal(0, 0.3, (2, 2)))
    shift = rng.uniform(-0.7, 0.7, 2) * (h, w)
    off = np.array([cy, cx]) + shift - lin @ np.array([cy, cx])
    pulls.append(np.concatenate([lin, off[:, None]], axis=1))
  pulls.append(np.array([[0.5, 0.2, 3 * h], [-0.1, 1.0, -2 * w]]))  # all outside
  return np.stack(pulls).astype(np.float32)


@pytest.mark.parametrize("shape", [(12, 10, 3), (7, 9, 5)])
def test_warp_matches_dm_pix_float32(shape):
  h, w, c = shape
  rng = np.random.default_rng(h)
  pulls = _random_pulls(rng, h, w)
  images = _rand_images(20 + h, (len(pulls), h, w, c))
  out = np.asarray(_warp(jnp.asarray(images), jnp.asarray(pulls)))
  ref = np.asarray(_pix_warp(jnp.asarray(images), jnp.asarray(pulls)))
  assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
  # The cases the matrices were chosen for: exact identity and mirror, a half turn,
  # samples outside the image taking its edge's values.
  np.testing.assert_array_equal(out[0], images[0])
  np.testing.assert_array_equal(out[1], images[1][:, ::-1])
  np.testing.assert_allclose(out[2], images[2][::-1, ::-1], rtol=0, atol=1e-6)
  # (Outside, the weights of the clamped corners add up to 1 only up to rounding.)
  np.testing.assert_allclose(out[-1], np.broadcast_to(images[-1][-1:, :1], out[-1].shape),
                             rtol=0, atol=1e-6)
  for i in range(3, 7):  # the random ones are neither the image nor constant
    assert np.max(np.abs(out[i] - images[i])) > 0.1 and np.std(out[i]) > 0.05


def test_warp_matches_dm_pix_bfloat16():
  h, w, c = 12, 10, 3
  pulls = jnp.asarray(_random_pulls(np.random.default_rng(3), h, w))
  images = jnp.asarray(_rand_images(30, (pulls.shape[0], h, w, c)), jnp.bfloat16)
  out = np.asarray(_warp(images, pulls).astype(jnp.float32))
  ref = _pix_warp(images, pulls)
  assert _warp(images, pulls).dtype == jnp.bfloat16 and ref.dtype == jnp.bfloat16
  ref = np.asarray(ref.astype(jnp.float32))
  # Both interpolate in float32 and round to bfloat16: equal, but where float32's last
  # bit decides the rounding, one bfloat16 step apart (2^-8 below 1).
  np.testing.assert_allclose(out, ref, rtol=0, atol=2.0 ** -8)
  assert np.mean(out == ref) > 0.99
  np.testing.assert_array_equal(out[0], np.asarray(images[0].astype(jnp.float32)))


def test_pull_matrix_inverts_the_forward_matrix():
  rng = np.random.default_rng(8)
  h, w = 12, 10
  p = _params(N, **_random_warp_params(rng, N))
  fwd = np.asarray(augment.forward_matrix(p, h, w), np.float64)
  pull = np.asarray(augment.pull_matrix(augment.forward_matrix(p, h, w), h, w))
  c = np.array([(w - 1) / 2, (h - 1) / 2])
  for n in range(N):  # pull then push: output pixel (i, j) comes back to itself
    for i, j in [(0, 0), (3, 7), (h - 1, w - 1)]:
      y, x = pull[n, :, :2] @ np.array([i, j]) + pull[n, :, 2]
      back = c + fwd[n, :, :2] @ (np.array([x, y]) - c) + fwd[n, :, 2]
      np.testing.assert_allclose(back, [j, i], rtol=0, atol=1e-4)
  # The (h, w, c) form holds the same matrix, batched or one at a time.
  hwc = np.asarray(augment.pull_matrix_hwc(jnp.asarray(fwd, jnp.float32), h, w))
  np.testing.assert_array_equal(hwc[:, :2, :2], pull[:, :, :2])
  np.testing.assert_array_equal(hwc[:, :2, 3], pull[:, :, 2])
  np.testing.assert_array_equal(hwc[:, 2], np.broadcast_to([0, 0, 1, 0], (N, 4)))
  np.testing.assert_array_equal(
      hwc[1], augment.pull_matrix_hwc(jnp.asarray(fwd[1], jnp.float32), h, w))


@jax.jit
def _apply_with_pix(images, params):
  """augment.apply with dm-pix's warp in place of augment.warp."""
  _, h, w, _ = images.shape
  warped = augment.dm_pix_warp(
      images, augment.pull_matrix(augment.forward_matrix(params, h, w), h, w))
  identity = augment.AugmentParams.identity(images.shape[0])
  geometry = ("flip", "tx", "ty", "zx", "zy", "theta", "phi")
  return augment.apply(warped, params._replace(
      **{k: getattr(identity, k) for k in geometry}))


@pytest.mark.parametrize("scoring,cutout", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_apply_matches_apply_with_dm_pix_warp(scoring, cutout):
  ranges = augment.AugmentRanges(cutout=cutout)
  sampler = augment.sample_scoring_params if scoring else augment.sample_params
  p = sampler(jax.random.PRNGKey(21), 8, ranges)
  images = jnp.asarray(_rand_images(22, (8, H, W, C)))
  out = np.asarray(_apply(images, p))
  np.testing.assert_allclose(out, np.asarray(_apply_with_pix(images, p)), rtol=0,
                             atol=1e-5)
  assert np.max(np.abs(out - np.asarray(images))) > 0.1


# ---------------------------------------------------------------------------
# 7-8: parameter sampling.
# ---------------------------------------------------------------------------

_DEFAULT_CENTRES_HALVES = {
    # name: (centre, half-width) for the default AugmentRanges
    "tx": (0.0, 0.1),
    "ty": (0.0, 0.1),
    "zx": (1.0, 0.15),
    "zy": (1.0, 0.15),
    "theta": (0.0, math.radians(22.5)),
    "phi": (0.0, 0.15),
    "gamma": (1.0, 0.5),
    "delta": (0.0, 0.25),
}


@pytest.fixture(scope="module")
def training_samples():
  n = 200_000
  p = augment.sample_params(jax.random.PRNGKey(0), n, augment.AugmentRanges())
  return n, {k: np.asarray(v, np.float64) for k, v in p._asdict().items()}


@pytest.mark.parametrize("name", sorted(_DEFAULT_CENTRES_HALVES))
def test_sample_params_truncated_normal(training_samples, name):
  n, p = training_samples
  centre, half = _DEFAULT_CENTRES_HALVES[name]
  v = p[name]
  assert v.shape == (n,)
  eps = 1e-6
  assert v.min() >= centre - half - eps and v.max() <= centre + half + eps
  # The range is actually used (not a narrower distribution).
  assert v.min() < centre - 0.9 * half and v.max() > centre + 0.9 * half
  expected_std = (half / 2.0) * TRUNC2_STD
  assert abs(v.mean() - centre) < 5 * expected_std / math.sqrt(n)
  assert v.std() == pytest.approx(expected_std, rel=0.02)


def test_sample_params_flip_and_independence(training_samples):
  n, p = training_samples
  assert set(np.unique(p["flip"])) == {-1.0, 1.0}
  assert abs(np.mean(p["flip"] == -1.0) - 0.5) < 0.01
  # The parameters are drawn independently of each other.
  names = sorted(_DEFAULT_CENTRES_HALVES) + ["flip"]
  corr = np.corrcoef(np.stack([p[k] for k in names]))
  off_diag = corr[~np.eye(len(names), dtype=bool)]
  assert np.max(np.abs(off_diag)) < 0.02


def test_sample_params_zero_half_width_gives_centre():
  ranges = augment.AugmentRanges(flip=0.0, translate=0.0, scale=0.0, rotation=0.0,
                                 shear=0.0, contrast=0.0, brightness=0.0)
  p = augment.sample_params(jax.random.PRNGKey(1), 1000, ranges)
  centres = {"flip": 1.0, "tx": 0.0, "ty": 0.0, "zx": 1.0, "zy": 1.0, "theta": 0.0,
             "phi": 0.0, "gamma": 1.0, "delta": 0.0}
  for k, c in centres.items():
    np.testing.assert_array_equal(np.asarray(getattr(p, k)), np.full(1000, c), err_msg=k)
  # flip probability 1 mirrors every image.
  p1 = augment.sample_params(jax.random.PRNGKey(1), 1000,
                             augment.AugmentRanges(flip=1.0))
  np.testing.assert_array_equal(np.asarray(p1.flip), -np.ones(1000))
  # Only one parameter switched on: the others stay at their centres.
  p2 = augment.sample_params(jax.random.PRNGKey(2), 1000, ranges.__class__(
      flip=0.0, translate=0.0, scale=0.0, rotation=10.0, shear=0.0, contrast=0.0,
      brightness=0.0))
  assert np.std(np.asarray(p2.theta)) > 0.02
  np.testing.assert_array_equal(np.asarray(p2.tx), np.zeros(1000))


def test_sample_scoring_params_extremes_of_halved_range():
  n = 200_000
  p = augment.sample_scoring_params(jax.random.PRNGKey(3), n, augment.AugmentRanges())
  p = {k: np.asarray(v, np.float64) for k, v in p._asdict().items()}
  signs = {}
  for name, (centre, half) in _DEFAULT_CENTRES_HALVES.items():
    v = p[name]
    lo, hi = centre - half / 2, centre + half / 2
    is_lo = np.abs(v - lo) < 1e-6
    is_hi = np.abs(v - hi) < 1e-6
    assert np.all(is_lo | is_hi), (name, np.unique(v)[:10])
    assert abs(is_hi.mean() - 0.5) < 0.01, name
    signs[name] = np.where(is_hi, 1.0, -1.0)
  assert set(np.unique(p["flip"])) == {-1.0, 1.0}
  assert abs(np.mean(p["flip"] == -1.0) - 0.5) < 0.01
  # Signs drawn independently per parameter.
  names = sorted(signs)
  corr = np.corrcoef(np.stack([signs[k] for k in names] + [p["flip"]]))
  assert np.max(np.abs(corr[~np.eye(len(names) + 1, dtype=bool)])) < 0.02


def test_sample_scoring_params_explicit_values():
  # Spot-check the literal extremes quoted for the default ranges.
  p = augment.sample_scoring_params(jax.random.PRNGKey(4), 5000, augment.AugmentRanges())
  expected = {"theta": math.radians(11.25), "zx": 0.075, "zy": 0.075, "tx": 0.05,
              "ty": 0.05, "phi": 0.075, "gamma": 0.25, "delta": 0.125}
  for name, dev in expected.items():
    centre = _DEFAULT_CENTRES_HALVES[name][0]
    got = np.unique(np.round(np.asarray(getattr(p, name), np.float64) - centre, 6))
    np.testing.assert_allclose(got, [-dev, dev], atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------
# 9: AugmentRanges.
# ---------------------------------------------------------------------------

def test_ranges_from_config_rejects_unknown_field():
  cfg = ml_collections.ConfigDict({"rotation": 10.0, "sheer": 0.1})
  with pytest.raises(ValueError, match="sheer"):
    augment.AugmentRanges.from_config(cfg)
  with pytest.raises(ValueError, match="bogus"):
    augment.AugmentRanges.from_config({"bogus": 1})


def test_ranges_from_config_sets_known_fields():
  cfg = ml_collections.ConfigDict({"rotation": 10, "flip": 0.0, "translate": 0.2})
  r = augment.AugmentRanges.from_config(cfg)
  assert r == augment.AugmentRanges(rotation=10.0, flip=0.0, translate=0.2)
  assert isinstance(r.rotation, float)
  assert augment.AugmentRanges.from_config({}) == augment.AugmentRanges()


def test_ranges_halved():
  r = augment.AugmentRanges(flip=0.3, translate=0.2, scale=0.4, rotation=30.0,
                            shear=0.6, contrast=0.8, brightness=0.1)
  h = r.halved()
  assert h == augment.AugmentRanges(flip=0.3, translate=0.1, scale=0.2, rotation=15.0,
                                    shear=0.3, contrast=0.4, brightness=0.05)


# ---------------------------------------------------------------------------
# 10: augment().
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("scoring", [False, True])
def test_augment_range_shape_keys_and_determinism(scoring):
  images = jnp.asarray(_rand_images(8, (N, H, W, C)))
  ranges = augment.AugmentRanges()
  k1, k2 = jax.random.PRNGKey(10), jax.random.PRNGKey(11)
  a = np.asarray(_augment(k1, images, ranges=ranges, scoring=scoring))
  a_again = np.asarray(_augment(k1, images, ranges=ranges, scoring=scoring))
  b = np.asarray(_augment(k2, images, ranges=ranges, scoring=scoring))
  assert a.shape == images.shape and a.dtype == np.float32
  assert a.min() >= 0.0 and a.max() <= 1.0
  np.testing.assert_array_equal(a, a_again)
  assert np.max(np.abs(a - b)) > 0.05
  assert np.max(np.abs(a - np.asarray(images))) > 0.05
  # Equals apply() with the parameters the matching sampler draws from the same key,
  # and the naive reference with those parameters.
  sampler = augment.sample_scoring_params if scoring else augment.sample_params
  p = sampler(k1, N, ranges)
  # (Float rounding only: in one program XLA may fuse the draw with the warp's matrix.)
  np.testing.assert_allclose(a, np.asarray(_apply(images, p)), rtol=0, atol=1e-5)
  np.testing.assert_allclose(a, _ref_apply(np.asarray(images), p), rtol=0, atol=1e-4)


def test_augment_eager_equals_jit():
  images = jnp.asarray(_rand_images(13, (N, H, W, C)))
  ranges = augment.AugmentRanges()
  key = jax.random.PRNGKey(14)
  eager = np.asarray(augment.augment(key, images, ranges))
  np.testing.assert_allclose(eager, np.asarray(_augment(key, images, ranges=ranges)),
                             rtol=0, atol=1e-5)
  np.testing.assert_array_equal(eager, np.asarray(augment.augment(key, images, ranges)))


def test_augment_gives_each_image_its_own_parameters():
  one = _rand_images(9, (1, H, W, C))
  images = jnp.asarray(np.repeat(one, N, axis=0))
  out = np.asarray(_augment(jax.random.PRNGKey(12), images,
                            ranges=augment.AugmentRanges()))
  for i in range(1, N):
    assert np.max(np.abs(out[i] - out[0])) > 0.05


def test_augment_each_does_not_depend_on_the_batch_around_an_image(scoring=True):
  """augment_each: image i's transformation is that of its own key, split(key, n)[i],
  so padding the batch changes nothing (which augment's batched draws do). Scoring
  parameters, as the analysis uses it; training ones differ only in the sampler."""
  images = jnp.asarray(_rand_images(15, (N, H, W, C)))
  ranges = augment.AugmentRanges()
  key = jax.random.PRNGKey(16)
  each = jax.jit(augment.augment_each, static_argnames=("ranges", "scoring"))
  whole = np.asarray(each(key, images, ranges, scoring=scoring))
  part = np.asarray(each(key, images[:N - 2], ranges, scoring=scoring))
  np.testing.assert_allclose(part, whole[:N - 2], rtol=0, atol=1e-6)
  keys = jax.random.split(key, N)
  for i in (0, N - 1):  # and it is apply() with the sampler's draw from keys[i]
    sampler = augment.sample_scoring_params if scoring else augment.sample_params
    p = sampler(keys[i], 1, ranges)
    np.testing.assert_allclose(whole[i:i + 1], np.asarray(_apply(images[i:i + 1], p)),
                               rtol=0, atol=1e-6)
  batched = np.asarray(_augment(key, images[:N - 2], ranges=ranges, scoring=scoring))
  moved = np.asarray(_augment(key, images, ranges=ranges, scoring=scoring))[:N - 2]
  assert np.max(np.abs(batched - moved)) > 0.05  # the batched draws would differ
  assert np.max(np.abs(whole - np.asarray(images))) > 0.05


# ---------------------------------------------------------------------------
# Cutout and the named presets.
# ---------------------------------------------------------------------------

def _ref_cutout(img, cut, cy, cx):
  """Loops over pixels: those of the square (side round(cut * min(H, W)), top-left
  round(centre - side / 2)) take the image's mean colour."""
  img = np.asarray(img, np.float64)
  h, w, _ = img.shape
  side = round(cut * min(h, w))
  top, left = round(cy * h - side / 2), round(cx * w - side / 2)
  mean = img.mean(axis=(0, 1))
  out = img.copy()
  for i in range(h):
    for j in range(w):
      if top <= i < top + side and left <= j < left + side:
        out[i, j] = mean
  return out


@pytest.mark.parametrize("cut,cy,cx", [(0.5, 0.5, 0.5), (0.3, 0.05, 0.9), (1.0, 0.2, 0.7)])
def test_cutout_matches_reference(cut, cy, cx):
  images = np.random.default_rng(0).uniform(size=(1, H, W, C)).astype(np.float32)
  out = _apply(jnp.asarray(images), _params(1, cut=cut, cy=cy, cx=cx))
  np.testing.assert_allclose(out[0], _ref_cutout(images[0], cut, cy, cx), atol=1e-6)
  assert np.sum(np.any(np.asarray(out[0]) != images[0], axis=-1)) > 0


def test_cutout_draws_leave_the_other_parameters_unchanged_and_scoring_never_cuts():
  """The cut-out's draws (its centre, only where there is a square to cut) change no
  other parameter; without a cut-out, augmenting leaves it out of the program and
  gives the same images bit for bit."""
  key = jax.random.PRNGKey(4)
  plain = augment.sample_params(key, 500, augment.AugmentRanges())
  cut = augment.sample_params(key, 500, augment.AugmentRanges(cutout=0.5))
  images = jnp.asarray(np.random.default_rng(1).uniform(size=(500, H, W, C)), jnp.float32)
  np.testing.assert_array_equal(augment.augment(key, images, augment.AugmentRanges()),
                                augment.apply(images, plain, cutout=True))
  for name in augment.AugmentParams._fields:
    if name not in ("cut", "cy", "cx"):
      np.testing.assert_array_equal(getattr(plain, name), getattr(cut, name))
  np.testing.assert_array_equal(plain.cut, 0.0)
  np.testing.assert_array_equal(cut.cut, 0.5)
  assert 0.0 <= float(cut.cy.min()) and float(cut.cy.max()) <= 1.0
  assert abs(float(cut.cx.mean()) - 0.5) < 0.05 and float(jnp.std(cut.cx)) > 0.25
  scoring = augment.sample_scoring_params(key, 50, augment.AugmentRanges(cutout=0.5))
  np.testing.assert_array_equal(scoring.cut, 0.0)


def test_presets_set_every_range_and_name_themselves():
  from invjax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.apply_variant(config_lib.base_config(), "baseline,light")
  assert (c.variant, c.copies, c.augment_preset) == ("baseline", 1, "light")
  assert augment.AugmentRanges.from_config(c.augment) == augment.PRESETS["light"]
  c = config_lib.apply_variant(config_lib.base_config(), ",cutout")
  assert (c.variant, c.augment.cutout, c.augment.rotation) == ("invariance", 0.5, 0.0)
  assert augment.AugmentRanges.from_config(
      config_lib.base_config().augment) == augment.PRESETS["heavier"]
  with pytest.raises(ValueError, match="valid presets are"):
    config_lib.apply_variant(config_lib.base_config(), "baseline,strong")
  c.augment.cutout = 1.5
  with pytest.raises(ValueError, match=r"augment.cutout=1.5 must be a finite number in \[0, 1\]"):
    config_lib.validate(c)
