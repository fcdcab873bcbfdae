"""The jit-compiled steps: training with the invariance loss, evaluation, the L_inv probe.

Pure JAX (plus flax and optax): no TensorFlow, tfds, clu or orbax.

A training batch arrives as K uint8 seed images. On device, each is repeated M times,
every copy gets its own random augmentation (dm-pix), and the loss of Eq. 4 is computed
from the sown activations: (1 - alpha) * cross-entropy + sum_l alpha_l * L_inv_l.
Copies of a seed are consecutive, so when the seeds are sharded over devices, the copies
of a seed sit on one device with their activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from invjax import augment
from invjax import losses
from invjax import models


class TrainState(train_state.TrainState):
  batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything the steps need from the run's configuration (hashable, static)."""
  copies: int  # M
  alpha: float
  alpha_ratio: float
  loss_method: str
  ranges: augment.AugmentRanges
  num_layers: int
  top5: bool = False


def create_learning_rate_fn(base: float, boundaries_epochs, decay: float,
                            steps_per_epoch: int) -> optax.Schedule:
  """Piecewise constant: `base`, multiplied by `decay` at each boundary epoch."""
  return optax.piecewise_constant_schedule(
      base, {int(round(b * steps_per_epoch)): decay for b in boundaries_epochs})


def create_optimizer(lr_fn: optax.Schedule, momentum: float = 0.9,
                     nesterov: bool = True) -> optax.GradientTransformation:
  """SGD with Nesterov momentum; no weight decay (the paper uses none)."""
  return optax.sgd(lr_fn, momentum=momentum, nesterov=nesterov)


def create_train_state(key: jax.Array, model: nn.Module, image_shape,
                       tx: optax.GradientTransformation) -> TrainState:
  variables = jax.jit(lambda k: model.init(
      k, jnp.zeros((1, *image_shape), jnp.float32), train=False))(key)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def expand_seeds(seed_images: jax.Array, labels: jax.Array, copies: int):
  """K seeds -> B = K * M consecutive copies, their labels and seed ids."""
  k = seed_images.shape[0]
  tile = lambda a: jnp.broadcast_to(a[:, None], (k, copies, *a.shape[1:])).reshape(
      k * copies, *a.shape[1:])
  x, y, ids = tile(seed_images), tile(labels), tile(jnp.arange(k))
  return x, y, ids


def _accuracy(logits, labels, top5: bool) -> dict[str, jax.Array]:
  out = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
  if top5:
    out["top5"] = jnp.mean(_in_top5(logits, labels))
  return out


def _in_top5(logits, labels):
  top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  return jnp.any(top == labels[:, None], axis=-1)


def make_train_step(cfg: StepConfig) -> Callable:
  """(state, seed_images uint8 [K,H,W,C], labels [K], key) -> (state, metrics)."""
  weights = losses.layer_weights(cfg.num_layers, cfg.alpha, cfg.alpha_ratio)
  measure_inv = cfg.copies > 1  # L_inv needs copies in the batch

  def train_step(state: TrainState, seed_images, labels, key):
    x, y, _ = expand_seeds(seed_images, labels, cfg.copies)
    x = augment.augment(key, to_float(x), cfg.ranges)

    def loss_fn(params):
      logits, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          mutable=["batch_stats", "intermediates"])
      ce = losses.cross_entropy(logits, y)
      inv = {}
      if measure_inv:
        feats = models.sown(updates["intermediates"])
        inv = {k: losses.grouped_invariance_loss(v, cfg.copies, cfg.loss_method)
               for k, v in feats.items()}
      if cfg.alpha > 0:
        loss = losses.total_loss(ce, inv, weights, cfg.alpha)
      else:  # L_inv is only measured: keep it out of the gradient.
        inv = jax.lax.stop_gradient(inv)
        loss = ce
      return loss, (updates["batch_stats"], logits, ce, inv)

    (loss, (batch_stats, logits, ce, inv)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss, "cross_entropy": ce,
               **_accuracy(logits, y, cfg.top5),
               **{f"inv_loss/{k}": v for k, v in inv.items()}}
    return new_state, metrics

  return train_step


def eval_logits(state: TrainState, images: jax.Array, mutable=False):
  """Eval-mode forward pass (running batch-norm statistics) of float images."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        images, train=False, mutable=mutable)


def make_eval_step(top5: bool, ranges: augment.AugmentRanges | None = None) -> Callable:
  """(state, images uint8, labels, mask[, key]) -> sums of correct predictions and loss.

  With `ranges`, the step takes a key and scores the images after a scoring
  transformation (Eq. 2's: the halved ranges at their extremes), one per image: the
  accuracy of the model on transformed test images.
  """

  def eval_step(state, images, labels, mask, key=None):
    x = to_float(images)
    if ranges is not None:
      x = augment.augment(key, x, ranges, scoring=True)
    logits = eval_logits(state, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    out = {"count": jnp.sum(mask),
           "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
           "cross_entropy": jnp.sum(ce * mask)}
    if top5:
      out["correct5"] = jnp.sum(_in_top5(logits, labels) * mask)
    return out

  return eval_step


def features(state: TrainState, images: jax.Array) -> dict[str, jax.Array]:
  """{"pixels": images, **sown layers} of float images, eval mode, in depth order."""
  _, updates = eval_logits(state, images, mutable=["intermediates"])
  return {"pixels": images, **models.sown(updates["intermediates"])}


def make_probe_step(cfg: StepConfig, probe_copies: int) -> Callable:
  """(state, seed_images uint8, key) -> {layer: L_inv}, eval mode, never optimised.

  With a fixed batch and key, the curves over training (Figure 5) reflect the model
  alone; the baseline (M = 1) gets the same measurement as the invariance model.
  """

  def probe_step(state, seed_images, key):
    x, _, _ = expand_seeds(seed_images, jnp.zeros(seed_images.shape[0], jnp.int32),
                           probe_copies)
    x = augment.augment(key, to_float(x), cfg.ranges)
    feats = features(state, x)
    feats.pop("pixels")
    return {k: losses.grouped_invariance_loss(v, probe_copies, cfg.loss_method)
            for k, v in feats.items()}

  return probe_step
