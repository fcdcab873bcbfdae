"""The optimizer on one vector of every parameter (steps.create_optimizer) and the
per-parameter layout checkpoints keep of its state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from invjax import checkpoints
from invjax import flat_state
from invjax import steps


def _tree(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)),
                   "bias": jax.random.normal(k2, (4,))},
          "scale": jax.random.normal(k3, (5,))}


def test_the_flat_optimizer_takes_the_steps_of_optax_sgd():
  """Five Nesterov-momentum steps under a schedule, from random gradients: the same
  parameters as optax.sgd applied per parameter, and its state per parameter equal."""
  lr = optax.piecewise_constant_schedule(0.1, {2: 0.1})
  flat, ref = steps.create_optimizer(lr, 0.9, True), optax.sgd(lr, 0.9, nesterov=True)
  params = _tree(jax.random.key(0))
  p1, s1, p2, s2 = params, flat.init(params), params, ref.init(params)
  for i in range(5):
    grads = _tree(jax.random.key(i + 1))
    u1, s1 = flat.update(grads, s1, p1)
    u2, s2 = ref.update(grads, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  per_param = flat_state.opt_state_per_param(s1, p1)
  assert jax.tree.structure(per_param) == jax.tree.structure(s2)
  for a, b in zip(jax.tree.leaves(per_param), jax.tree.leaves(s2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  back = flat_state.opt_state_flat(per_param, p1)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(s1)):
    np.testing.assert_array_equal(a, b)


def _state(tx, key):
  params = _tree(key)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  grads = _tree(jax.random.fold_in(key, 1))
  state = state.apply_gradients(grads=grads)  # a trace that is not all zeros
  return state.replace(step=jnp.asarray(state.step))  # an array, as in training


def test_checkpoints_keep_the_state_per_parameter_both_ways(tmp_path):
  """A state trained flat is written per parameter: it restores into a target of
  optax.sgd's own layout and back into the flat one, equal; and a checkpoint written
  per parameter (before the flat optimizer) restores into the flat layout."""
  lr = lambda step: 0.1
  flat_state = _state(steps.create_optimizer(lr), jax.random.key(0))
  old_state = _state(optax.sgd(lr, 0.9, nesterov=True), jax.random.key(0))
  for name, state in (("flat", flat_state), ("per_param", old_state)):
    ckpts = checkpoints.Checkpoints(str(tmp_path / name))
    ckpts.save(1, state, force=True)
    ckpts.close()
  # Both checkpoints hold the same per-parameter layout and values.
  plain = checkpoints.Checkpoints(str(tmp_path / "flat"))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                         sharding=a.sharding), old_state)
  as_old = plain.manager.restore(1, args=checkpoints.ocp.args.StandardRestore(abstract))
  for a, b in zip(jax.tree.leaves(as_old.opt_state), jax.tree.leaves(old_state.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  plain.close()
  for name in ("flat", "per_param"):
    ckpts = checkpoints.Checkpoints(str(tmp_path / name))
    restored = ckpts.restore(flat_state)
    ckpts.close()
    assert jax.tree.structure(restored) == jax.tree.structure(flat_state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(flat_state)):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_model_of_many_tensors_keeps_its_update_per_tensor(monkeypatch):
  """Above FLAT_UPDATE_MOST_TENSORS the state is optax.sgd's own, per parameter, and
  the steps the same."""
  monkeypatch.setattr(steps, "FLAT_UPDATE_MOST_TENSORS", 2)
  lr = lambda step: 0.1
  tx, ref = steps.create_optimizer(lr), optax.sgd(lr, 0.9, nesterov=True)
  params = _tree(jax.random.key(0))  # 3 tensors
  state = tx.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(ref.init(params))
  grads = _tree(jax.random.key(1))
  u1, _ = tx.update(grads, state, params)
  u2, _ = ref.update(grads, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(a, b)
  monkeypatch.setattr(steps, "FLAT_UPDATE_MOST_TENSORS", 3)
  assert jax.tree.structure(tx.init(params)) != jax.tree.structure(ref.init(params))
  # A TPU's runs (flat_update=False): optax.sgd's own layout at any size, the one
  # checkpoints keep (so a GPU's checkpoint restores there as it is, and back).
  per_tensor = steps.create_optimizer(lr, flat_update=False)
  assert jax.tree.structure(per_tensor.init(params)) == jax.tree.structure(
      ref.init(params))
