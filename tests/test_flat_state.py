"""invjax/flat_state.py: the train state in the step loop's one-vector layout and back."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from invjax import flat_state
from invjax import models
from invjax import steps
from tests import helpers

SHAPE = (16, 16, 3)


def test_kernels_lie_out_first_in_the_loop_on_a_gpu_only():
  """cuDNN's filter layout in the loop's vector on a GPU, the parameters' own elsewhere
  (a TPU's convolutions read another), as a chunk's devices say."""
  assert [flat_state.filters_out_first(p) for p in ("gpu", "cuda", "rocm", "cpu", "tpu")] == [
      True, True, True, False, False]
  mesh = jax.make_mesh((1,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  assert flat_state.platform_of(sharding) == flat_state.platform_of(None) == "cpu"


@pytest.mark.parametrize("out_first", [False, True])
@pytest.mark.parametrize("most_tensors", [0, 1000])  # per tensor / optax.flatten
def test_flat_parameters_give_back_the_state_as_it_was(most_tensors, out_first,
                                                       monkeypatch):
  """The step loop's one-vector state (flat_state.flat_parameters) and back: the same
  parameters and optimizer state in the same layout, bit for bit; the model run on
  the vector gives the same logits. With `out_first`, a convolution's kernel and its
  momentum lie in the vectors with the output axis first."""
  monkeypatch.setattr(steps, "FLAT_UPDATE_MOST_TENSORS", most_tensors)
  m = models.create("allcnn", 4, layers=helpers.TINY_LAYERS)
  tx = steps.create_optimizer(optax.constant_schedule(0.1))
  state = steps.create_train_state(jax.random.key(0), m, SHAPE, tx)
  state = state.replace(opt_state=jax.tree.map(  # momentum buffers that are not zeros
      lambda a: a + 0.5 + jnp.arange(a.size).reshape(a.shape) / a.size if a.ndim else a,
      state.opt_state))
  flat, back = flat_state.flat_parameters(state, out_first)
  n = sum(p.size for p in jax.tree.leaves(state.params))
  assert flat.params["vector"].shape == (n,)
  assert all(a.ndim in (0, 1) for a in jax.tree.leaves(flat.opt_state))
  # Where the first convolution's kernel and its momentum lie in the vectors.
  kernel = state.params["Conv_0"]["kernel"]
  trace = flat_state.opt_state_per_param(state.opt_state, state.params)[0].trace
  paths = [jax.tree_util.keystr(k) for k, _ in
           jax.tree_util.tree_leaves_with_path(state.params)]
  before = paths.index("['Conv_0']['kernel']")
  start = sum(p.size for p in jax.tree.leaves(state.params)[:before])
  order = (3, 0, 1, 2) if out_first else (0, 1, 2, 3)
  momentum = flat.opt_state[0].trace  # the vector, or optax.sgd's {"vector": vector}
  momentum = momentum["vector"] if isinstance(momentum, dict) else momentum
  for vector, tensor in ((flat.params["vector"], kernel),
                         (momentum, trace["Conv_0"]["kernel"])):
    np.testing.assert_array_equal(vector[start:start + kernel.size],
                                  jnp.transpose(tensor, order).ravel())
  again = back(flat)
  assert jax.tree.structure(again.opt_state) == jax.tree.structure(state.opt_state)
  jax.tree.map(np.testing.assert_array_equal, again.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, again.opt_state, state.opt_state)
  x = jax.random.uniform(jax.random.key(1), (2, *SHAPE))
  logits = lambda s: s.apply_fn({"params": s.params, "batch_stats": s.batch_stats}, x)
  np.testing.assert_array_equal(logits(flat), logits(state))
