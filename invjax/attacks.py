"""White-box L-inf attacks on images in the [0, 1] pixel space: FGSM and PGD.

Pure JAX. An attack takes `logits_fn` (float images [B, H, W, C] in [0, 1] -> logits),
the clean images and their labels, and returns adversarial images that stay within
`eps` of the clean ones in every pixel (L-inf) and within [0, 1].

  FGSM: x' = clip(x + eps * sign(grad_x CE(x, y)))
  PGD:  x_0 = x (+ uniform noise in [-eps, eps], the random start), then `num_steps`
        times x_{t+1} = proj(x_t + step_size * sign(grad_x CE(x_t, y))), where proj
        clips to the eps-ball around x and to [0, 1].

`eps` and `step_size` are traced values, so one compiled program serves every eps.
The loss is the summed cross-entropy of the batch: each image's gradient is its own
(the sign does not depend on the batch size).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LogitsFn = Callable[[jax.Array], jax.Array]

ATTACKS = ("fgsm", "pgd")


def input_gradient(logits_fn: LogitsFn, images: jax.Array,
                   labels: jax.Array) -> jax.Array:
  """d/dx of the summed cross-entropy, per image (float32, the images' shape)."""
  def loss(x):
    logits = logits_fn(x).astype(jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return jax.grad(loss)(images)


def project(x: jax.Array, clean: jax.Array, eps) -> jax.Array:
  """x clipped to the L-inf ball of radius eps around `clean`, then to [0, 1]."""
  return jnp.clip(jnp.clip(x, clean - eps, clean + eps), 0.0, 1.0)


def fgsm(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array,
         eps) -> jax.Array:
  """Fast gradient sign method: one step of size eps."""
  g = input_gradient(logits_fn, images, labels)
  return project(images + eps * jnp.sign(g), images, eps)


def random_start(keys: jax.Array, images: jax.Array, eps) -> jax.Array:
  """Uniform noise in [-eps, eps] added to each image from its own key (keys [B]), so
  that an image's start does not depend on the batch it is in; clipped to [0, 1]."""
  noise = jax.vmap(lambda k, x: jax.random.uniform(k, x.shape, x.dtype, -1.0, 1.0))(
      keys, images)
  return jnp.clip(images + eps * noise, 0.0, 1.0)


def pgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, eps,
        step_size, num_steps: int, keys: jax.Array | None = None) -> jax.Array:
  """Projected gradient descent (ascent on the loss) with sign steps.

  Args:
    logits_fn, images, labels: as for `fgsm`.
    eps: radius of the L-inf ball (e.g. 8 / 255).
    step_size: size of each sign step (e.g. 2 / 255).
    num_steps: number of steps (static).
    keys: one PRNG key per image for the random start; None starts at the clean
      images (deterministic).
  """
  x = images if keys is None else random_start(keys, images, eps)

  def step(_, x):
    g = input_gradient(logits_fn, x, labels)
    return project(x + step_size * jnp.sign(g), images, eps)

  return jax.lax.fori_loop(0, num_steps, step, x)
