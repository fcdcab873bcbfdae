"""The seed order: which training images are the seeds of each step.

The training set is read as an endless stream of passes, each in the order of a
permutation made from (config.seed, pass); step s takes the next K positions. So the
seeds of any step follow from the step number alone, on the host or on the device.
Pure JAX and numpy: the data pipeline and the jitted step both read it from here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SHUFFLE_STREAM = 3  # fold_in(key(config.seed), 3) orders the training set


def pass_permutation(key: jax.Array, pass_index, num_examples: int) -> jax.Array:
  """The order of the training set in pass `pass_index`: a permutation of
  0 .. num_examples - 1 determined by (key, pass_index), int32."""
  return jax.random.permutation(jax.random.fold_in(key, pass_index),
                                num_examples).astype(jnp.int32)


def seed_indices(perms: jax.Array, first_pass, step0, num_steps: int,
                 seeds_per_step: int) -> jax.Array:
  """[num_steps, K] training-set indices of the seeds of steps step0 .. step0 + S - 1.

  The training set is read as an endless stream of passes, each in the order of its
  permutation; step s takes stream positions s*K .. s*K + K - 1. `perms` [2, N] holds
  the permutations of passes `first_pass` and `first_pass + 1`, which must cover the
  steps asked for. Works on numpy and jax arrays alike.
  """
  n = perms.shape[1]
  xp = jnp if isinstance(perms, jax.Array) else np
  pos = ((step0 + xp.arange(num_steps))[:, None] * seeds_per_step
         + xp.arange(seeds_per_step)[None, :])
  return perms[pos // n - first_pass, pos % n]


class SeedSchedule:
  """Which training images are the seeds of each step.

  The training set is read in passes, each in the order of a fresh permutation made on
  the device from (seed, pass) (`pass_permutation`); step s takes the next
  `seeds_per_step` positions of that endless stream (`seed_indices`). So the seeds
  of any step follow from the step number alone: a resumed run sees exactly the seeds
  the uninterrupted run would have. With M copies per seed, an epoch of N / B steps
  covers N / M distinct seeds.

  `window(step0, num_steps)` gives what a program of several steps needs on the device:
  the index of the first pass it touches and the permutations of that pass and the next
  ([2, N] int32, made once per pass). `indices(step)` is the same on the host.
  """

  def __init__(self, num_examples: int, seeds_per_step: int, seed: int,
               sharding=None):
    if seeds_per_step > num_examples:
      raise ValueError(f"{seeds_per_step} seed images per step but only "
                       f"{num_examples} training images.")
    self.n = num_examples
    self.k = seeds_per_step
    key = jax.random.fold_in(jax.random.key(seed), SHUFFLE_STREAM)
    n = num_examples
    self._pair_fn = jax.jit(
        lambda p: jnp.stack([pass_permutation(key, p, n),
                             pass_permutation(key, p + 1, n)]),
        out_shardings=sharding)
    self._pair: tuple[int, jax.Array] | None = None
    self._host: tuple[int, np.ndarray] | None = None

  def window(self, step0: int, num_steps: int) -> tuple[int, jax.Array]:
    first = step0 * self.k // self.n
    last = ((step0 + num_steps) * self.k - 1) // self.n
    if last > first + 1:
      raise ValueError(f"{num_steps} steps of {self.k} seeds span more than two passes "
                       f"over {self.n} training images; take fewer steps per program.")
    if self._pair is None or self._pair[0] != first:
      self._pair = (first, self._pair_fn(first))
    return self._pair

  def host_indices(self, step0: int, num_steps: int) -> np.ndarray:
    """int64 [S, K]: the training-set indices of the seeds of steps step0 .. step0 +
    S - 1, on the host (the window's permutations fetched once per pass)."""
    first, perms = self.window(step0, num_steps)
    if self._host is None or self._host[0] != first:
      self._host = (first, np.asarray(jax.device_get(perms)))
    return seed_indices(self._host[1], first, step0, num_steps,
                        self.k).astype(np.int64)

  def indices(self, step: int) -> np.ndarray:
    """int64 [K]: the training-set indices of step `step`'s seeds, on the host."""
    return self.host_indices(step, 1)[0]
