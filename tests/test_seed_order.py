"""The seed order: the permutation of each pass and the seeds of each step, on the host
and on the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invjax import seed_order


def test_seed_indices_on_device_equal_the_host_formula():
  rng = np.random.default_rng(0)
  perms = np.stack([rng.permutation(10), rng.permutation(10)]).astype(np.int32)
  # passes 3 and 4 of a 10-image set, 4 seeds per step: steps 8..11 cover 32..47
  host = seed_order.seed_indices(perms, 3, 8, 3, 4)
  dev = jax.jit(lambda p, f, s: seed_order.seed_indices(p, f, s, 3, 4))(
      jnp.asarray(perms), 3, 8)
  np.testing.assert_array_equal(host, dev)
  stream = np.concatenate([perms[0], perms[1]])  # positions 30..49
  np.testing.assert_array_equal(host.ravel(), stream[2:14])



def _concat(sched, steps):
  return np.concatenate([sched.indices(s) for s in steps])


@pytest.mark.parametrize("n,k", [(12, 4), (10, 4), (7, 3), (5, 5)])
def test_seed_schedule_passes_are_permutations(n, k):
  sched = seed_order.SeedSchedule(n, k, seed=0)
  passes = 4
  steps = range(-(-passes * n // k))  # enough steps to cover `passes` passes
  for s in steps:
    idx = sched.indices(s)
    assert idx.shape == (k,) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < n
  stream = _concat(sched, steps)
  perms = [stream[p * n:(p + 1) * n] for p in range(passes)]
  for perm in perms:
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
  # Different passes use different permutations (n >= 5: a collision is very unlikely).
  assert not all(np.array_equal(perms[0], q) for q in perms[1:])
  assert len({tuple(q) for q in perms}) >= 3


def test_seed_schedule_pass_boundary():
  sched = seed_order.SeedSchedule(10, 4, seed=3)
  s0, s1, s2 = sched.indices(0), sched.indices(1), sched.indices(2)
  first8 = np.concatenate([s0, s1])
  assert len(set(first8.tolist())) == 8
  pass0 = np.concatenate([first8, s2[:2]])
  np.testing.assert_array_equal(np.sort(pass0), np.arange(10))
  # s2[2:] are the first two positions of pass 1, continued by step 3 and 4.
  pass1 = np.concatenate([s2[2:], sched.indices(3), sched.indices(4)])
  np.testing.assert_array_equal(np.sort(pass1), np.arange(10))
  assert not np.array_equal(pass0, pass1)


def test_seed_schedule_deterministic_and_order_independent():
  a = seed_order.SeedSchedule(10, 4, seed=7)
  expected = [a.indices(s).copy() for s in range(40)]  # 16 passes, past the cache size
  b = seed_order.SeedSchedule(10, 4, seed=7)
  for s in [39, 0, 17, 3, 25, 1, 38, 2]:  # resumed / random order, new instance
    np.testing.assert_array_equal(b.indices(s), expected[s], err_msg=f"step {s}")
  # Returned arrays do not alias the cached permutation.
  got = a.indices(0)
  got[:] = -1
  np.testing.assert_array_equal(a.indices(0), expected[0])


def test_seed_schedule_seeds_differ():
  a = _concat(seed_order.SeedSchedule(20, 5, seed=0), range(8))
  b = _concat(seed_order.SeedSchedule(20, 5, seed=1), range(8))
  assert not np.array_equal(a, b)


def test_seed_schedule_rejects_too_many_seeds():
  with pytest.raises(ValueError, match="11"):
    seed_order.SeedSchedule(10, 11, seed=0)
  seed_order.SeedSchedule(10, 10, seed=0)  # exactly n is fine
