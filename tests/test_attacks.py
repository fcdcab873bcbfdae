"""FGSM and PGD: against foolbox, the eps-ball, and what attacks must do to a model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from invjax import attacks
from tests import helpers


def _mlp(key, dim, classes=4, hidden=16):
  k1, k2 = jax.random.split(key)
  w1 = jax.random.normal(k1, (dim, hidden)) / np.sqrt(dim)
  w2 = jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden)
  return lambda x: jax.nn.relu(x.reshape(x.shape[0], -1) @ w1) @ w2


@pytest.fixture(scope="module")
def random_problem():
  key = jax.random.key(0)
  x = jax.random.uniform(jax.random.fold_in(key, 1), (8, 4, 4, 3))
  y = jax.random.randint(jax.random.fold_in(key, 2), (8,), 0, 4)
  return _mlp(key, 48), x, y


def test_fgsm_and_pgd_match_foolbox(random_problem):
  fb = pytest.importorskip("foolbox")
  logits_fn, x, y = random_problem
  model = fb.JAXModel(logits_fn, bounds=(0, 1))
  eps, step = 8 / 255, 2 / 255
  _, (theirs,), _ = fb.attacks.FGSM()(model, x, y, epsilons=[eps])
  np.testing.assert_allclose(attacks.fgsm(logits_fn, x, y, eps), theirs, atol=1e-6)
  pgd = fb.attacks.LinfPGD(abs_stepsize=step, steps=10, random_start=False)
  _, (theirs,), _ = pgd(model, x, y, epsilons=[eps])
  ours = attacks.pgd(logits_fn, x, y, eps, step, 10)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  assert float(jnp.max(jnp.abs(ours - x))) > 0.5 * eps  # it moved


@pytest.mark.parametrize("eps", [0.0, 2 / 255, 8 / 255, 0.3])
def test_pgd_stays_in_the_eps_ball_and_the_pixel_range(random_problem, eps):
  logits_fn, x, y = random_problem
  x = x.at[0].set(0.0).at[1].set(1.0)  # images at the bounds
  keys = jax.random.split(jax.random.key(3), x.shape[0])
  for adv in (attacks.pgd(logits_fn, x, y, eps, eps / 4 + 1e-3, 5, keys),
              attacks.fgsm(logits_fn, x, y, eps)):
    assert float(jnp.max(jnp.abs(adv - x))) <= eps + 1e-6
    assert float(jnp.min(adv)) >= 0.0 and float(jnp.max(adv)) <= 1.0
  if eps == 0:
    np.testing.assert_array_equal(attacks.pgd(logits_fn, x, y, 0.0, 0.01, 3, keys), x)


def test_random_start_of_an_image_does_not_depend_on_its_batch():
  x = jnp.full((6, 2, 2, 1), 0.5)
  keys = jax.random.split(jax.random.key(0), 6)
  a = attacks.random_start(keys, x, 0.1)
  b = attacks.random_start(keys[2:4], x[2:4], 0.1)
  np.testing.assert_array_equal(a[2:4], b)
  assert float(jnp.max(jnp.abs(a - x))) <= 0.1 + 1e-7 and float(jnp.std(a)) > 0


def test_on_a_trained_model_accuracy_falls_with_eps_and_pgd_is_stronger():
  x, y = helpers.toy_images(256, size=8, classes=4)
  x = jnp.asarray(x, jnp.float32) / 255.0
  y = jnp.asarray(y)
  # Train the MLP's weights: a small model that classifies the toy images well.
  k1, k2 = jax.random.split(jax.random.key(1))
  params = {"w1": jax.random.normal(k1, (192, 32)) / np.sqrt(192),
            "w2": jax.random.normal(k2, (32, 4)) / np.sqrt(32)}
  apply = lambda p, z: jax.nn.relu(z.reshape(z.shape[0], -1) @ p["w1"]) @ p["w2"]
  opt = optax.adam(0.01)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        apply(p, x), y))
    g = jax.grad(loss)(params)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state

  for _ in range(200):
    params, state = step(params, state)
  logits_fn = lambda z: apply(params, z)
  acc = lambda z: float(jnp.mean(jnp.argmax(logits_fn(z), -1) == y))
  clean = acc(x)
  assert clean > 0.95
  keys = jax.random.split(jax.random.key(2), len(x))
  fgsm = jax.jit(lambda e: attacks.fgsm(logits_fn, x, y, e))
  pgd = jax.jit(lambda e: attacks.pgd(logits_fn, x, y, e, e / 4, 10, keys))
  eps_grid = [e / 255 for e in (0, 8, 48, 64, 80, 96)]
  a_fgsm = [acc(fgsm(e)) for e in eps_grid]
  a_pgd = [acc(pgd(e)) for e in eps_grid]
  assert a_fgsm[0] == clean and a_pgd[0] == clean
  assert all(b <= a for a, b in zip(a_pgd, a_pgd[1:]))
  assert all(b <= a for a, b in zip(a_fgsm, a_fgsm[1:]))
  assert all(p <= f for p, f in zip(a_pgd, a_fgsm))
  assert a_pgd[-1] < a_fgsm[-1] < clean - 0.2  # both work; PGD strictly stronger here
  assert fgsm._cache_size() == 1 and pgd._cache_size() == 1  # one program for all eps
