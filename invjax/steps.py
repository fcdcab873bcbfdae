"""The jit-compiled steps: training with the invariance loss, evaluation, the L_inv probe.

Pure JAX (plus flax and optax): no TensorFlow, tfds, clu or orbax.

A training batch arrives as K uint8 seed images. On device, each is repeated M times,
every copy gets its own random augmentation (invjax/augment.py), and the loss of Eq. 4 is
computed from the sown activations: (1 - alpha) * cross-entropy + sum_l alpha_l * L_inv_l.
Copies of a seed are consecutive, so when the seeds are sharded over devices, the copies
of a seed sit on one device with their activations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from invjax import augment
from invjax import flat_state
from invjax import losses
from invjax import models
from invjax import seed_order


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
  # With alpha = 0 and copies > 1, still compute L_inv per layer for the metrics
  # (outside the gradient). The benchmark turns it off to time the bare same-batch step.
  measure_inv: bool = True
  weight_law: str = "exponential"  # losses.WEIGHT_LAWS
  # Weight of the class-invariance term (Eq. 3 with classes in place of seeds), shared
  # over the layers by the same law; 0 = off.
  class_alpha: float = 0.0
  # How the moments method is computed (losses.MOMENT_FORMS; losses.moment_form gives
  # the platform's), and in how many runs of consecutive seeds the one-read form
  # merges first (losses.moment_parts: one per device, so devices exchange only sums).
  moments_form: str = "one_read"
  loss_parts: int = 1
  # What Eq. 3 divides by (losses.DENOMINATORS): every pair of the batch ("batch", the
  # paper's text) or the pairs of the same class ("class", the authors' code). The
  # probe measures both (PROBE_METRICS).
  denominator: str = "batch"
  # alpha's schedule (config.alpha_boundaries, in steps): from each of these steps on,
  # alpha and every alpha_l are multiplied by alpha_decay once more; () = constant.
  alpha_steps: tuple[int, ...] = ()
  alpha_decay: float = 1.0


def alpha_scale(cfg: StepConfig, step: jax.Array) -> jax.Array:
  """alpha(step) / alpha: alpha_decay ** (how many of alpha_steps are <= step), where
  `step` counts the steps done before this one (as the learning rate's schedule)."""
  passed = jnp.sum(jnp.asarray(step) >= jnp.asarray(cfg.alpha_steps, jnp.int32))
  return jnp.asarray(cfg.alpha_decay, jnp.float32) ** passed


def boundary_steps(boundaries_epochs, steps_per_epoch: int) -> tuple[int, ...]:
  """A schedule's boundaries (epochs) as the step counts they fall on: the learning
  rate's and alpha's."""
  return tuple(int(round(b * steps_per_epoch)) for b in boundaries_epochs)


def create_learning_rate_fn(base: float, boundaries_epochs, decay: float,
                            steps_per_epoch: int) -> optax.Schedule:
  """Piecewise constant: `base`, multiplied by `decay` at each boundary epoch."""
  return optax.piecewise_constant_schedule(
      base, {s: decay for s in boundary_steps(boundaries_epochs, steps_per_epoch)})


FLAT_UPDATE_MOST_TENSORS = 128


def create_optimizer(lr_fn: optax.Schedule, momentum: float = 0.9,
                     nesterov: bool = True,
                     flat_update: bool = True) -> optax.GradientTransformation:
  """SGD with Nesterov momentum; no weight decay (the paper uses none).

  For a model of at most FLAT_UPDATE_MOST_TENSORS parameter tensors, on one vector of
  every parameter (optax.flatten): an elementwise update over P tensors is P sets of
  kernels on a GPU, over one vector a few. A deviceless compile for an H100/H200
  (experiments/kernel_census.py) counted All-CNN-C's step (27 tensors) 199 -> 181
  kernels and WRN-28-10's (80) 536 -> 500; DenseNet-BC-100's (299) launched as many
  either way (XLA splits a concatenation of that many) and compiled 16 s longer, so it
  keeps the update per tensor. The same arithmetic on the same numbers either way, so
  the same results. Checkpoints keep the state per parameter
  (`flat_state.opt_state_per_param`). Inside the step loop every model's update is now
  on one vector (`flat_state.flat_parameters`), and off a CPU a run keeps its state in
  that layout between programs (`flat_state.enter_and_leave`). `flat_update=False`
  keeps every model's update per tensor, as a TPU's runs do
  (`flat_state.vector_in_loop`).
  """
  per_tensor = optax.sgd(lr_fn, momentum=momentum, nesterov=nesterov)
  flat = optax.flatten(per_tensor)
  pick = lambda tree: (flat if flat_update and
                       len(jax.tree.leaves(tree)) <= FLAT_UPDATE_MOST_TENSORS
                       else per_tensor)
  return optax.GradientTransformation(
      lambda params: pick(params).init(params),
      lambda updates, state, params=None: pick(updates).update(updates, state, params))


def create_train_state(key: jax.Array, model: nn.Module, image_shape,
                       tx: optax.GradientTransformation) -> TrainState:
  """The initial state, made by one compiled program: the optimizer's state too (made
  op by op, its buffers of each distinct parameter shape would each compile a program
  of their own: about 100 for DenseNet-BC, 2.5 s on a CPU at every start)."""

  def create(k):
    variables = model.init(k, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables.get("batch_stats", {}), tx=tx)

  return jax.jit(create)(key)


def train_state_shapes(model: nn.Module, image_shape, tx: optax.GradientTransformation,
                       sharding) -> TrainState:
  """The initial state's shapes and dtypes (jax.ShapeDtypeStruct leaves, placed by
  `sharding`), traced but not computed: what a checkpoint restores into."""
  shapes = jax.eval_shape(lambda: create_train_state(jax.random.key(0), model,
                                                     image_shape, tx))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding,
                                                     weak_type=a.weak_type), shapes)


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
  weights = losses.layer_weights(cfg.num_layers, cfg.alpha, cfg.alpha_ratio,
                                  cfg.weight_law)
  class_weights = losses.layer_weights(cfg.num_layers, cfg.class_alpha, cfg.alpha_ratio,
                                        cfg.weight_law)
  # L_inv needs copies in the batch; at alpha = 0 it is measured only if asked.
  measure_inv = cfg.copies > 1 and (cfg.alpha > 0 or cfg.measure_inv)
  scheduled = bool(cfg.alpha_steps) and cfg.alpha > 0

  def train_step(state: TrainState, seed_images, labels, key):
    # The named scopes label the step's parts in the compiled program's op metadata
    # (experiments/profile_step.py attributes a profile's kernels by them).
    with jax.named_scope("expand_seeds"):
      x, y, _ = expand_seeds(seed_images, labels, cfg.copies)
      x = to_float(x)
    with jax.named_scope("augment"):
      x = augment.augment(key, x, cfg.ranges)
    scale = alpha_scale(cfg, state.step) if scheduled else 1.0  # alpha(t) / alpha

    def loss_fn(params):
      logits, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          mutable=["batch_stats", "intermediates"])
      ce = losses.cross_entropy(logits, y)
      inv = {}
      if measure_inv:
        feats = models.sown(updates["intermediates"])
        with jax.named_scope("invariance_loss"):
          inv = losses.grouped_invariance_losses(feats, cfg.copies, cfg.loss_method,
                                                 cfg.loss_parts, cfg.moments_form,
                                                 _seed_classes(cfg, labels))
      cls = {}
      if cfg.class_alpha > 0:
        with jax.named_scope("invariance_loss"):
          cls = {k: losses.invariance_loss(v, y, cfg.loss_method)
                 for k, v in models.sown(updates["intermediates"]).items()}
      if cfg.alpha == 0:  # L_inv is only measured: keep it out of the gradient.
        inv = jax.lax.stop_gradient(inv)
      loss = losses.total_loss(ce, inv if cfg.alpha > 0 else {}, weights * scale,
                               cfg.alpha * scale, cls, class_weights, cfg.class_alpha)
      return loss, (updates["batch_stats"], logits, ce, inv, cls)

    (loss, (batch_stats, logits, ce, inv, cls)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    with jax.named_scope("optimizer"):
      new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss, "cross_entropy": ce,
               **_accuracy(logits, y, cfg.top5),
               **({"alpha": cfg.alpha * scale} if scheduled else {}),
               **{f"inv_loss/{k}": v for k, v in inv.items()},
               **{f"class_inv_loss/{k}": v for k, v in cls.items()}}
    return new_state, metrics

  return train_step


# Several steps per program: the data on device ---------------------------------------

def make_train_chunk(cfg: StepConfig, num_steps: int, seeds_per_step: int,
                     batch_sharding=None, data_on_device: bool = True,
                     unroll: bool = True, platform: str | None = None,
                     loop_state: bool = False,
                     image_shape: Sequence[int] | None = None) -> Callable:
  """`num_steps` training steps in one program (lax.scan over `make_train_step`).

  Step s augments with key fold_in(key, s), so a chunk of S steps gives the same result
  as S single steps and a resumed run as the uninterrupted one.

  data_on_device=True:
    (state, x_train uint8 [N, H, W, C], y_train [N], perms [2, N], first_pass, step0,
     key) -> (state, metrics stacked [S]). The whole training set is an argument that
    stays on the device; each step gathers its seeds by `seed_order.seed_indices`.
    Nothing is read from the host inside the step loop. With `image_shape`, x_train is
    the images as rows, uint8 [N, H * W * C], as `programs.TrainPrograms` keeps them
    on the devices: a TPU stores an array's two minor axes in tiles, and a program
    gathering from [N, 32, 32, 3] first copied the whole set into another tiling
    (CIFAR-10: 614 MB a chip, at every dispatch; `experiments/tpu_compile.py`);
    rows need no copy, and a step's K gathered rows become images. On a CPU or GPU
    both are the same bytes.
  data_on_device=False:
    (state, seeds uint8 [S, K, H, W, C], labels [S, K], step0, key) -> the same; the
    host gathered the batches.

  `batch_sharding` (a NamedSharding over the batch axis) splits each step's seeds over
  the devices: each device gathers, augments and runs only its own seeds.

  `unroll=True` writes the S steps out as straight-line code; False keeps one loop
  body. XLA:CPU runs a train step inside a loop about 15 times slower than outside one
  (measured: All-CNN-C at width 1/4, batch 128), so on CPU unroll; elsewhere a loop
  keeps the compile time from growing with S. The loop carries the parameters and the
  optimizer's buffers as one vector each (`flat_state.flat_parameters`; on a GPU,
  `platform` or else the devices of `batch_sharding` or JAX's default, with the
  convolution kernels in cuDNN's layout; on a TPU as they are,
  `flat_state.vector_in_loop`) and its metrics as one vector a step; the state comes
  out as it went in. `loop_state=True` (with unroll=False): the state goes
  in and comes out already in that layout (`flat_state.enter_and_leave`), so the
  program converts nothing.
  """
  step_fn = make_train_step(cfg)

  def constrain(a):
    return a if batch_sharding is None else jax.lax.with_sharding_constraint(
        a, batch_sharding)

  def scan(state, fetch, step0, key):
    def body(state, i):
      x, y = fetch(i)
      return step_fn(state, constrain(x), constrain(y), jax.random.fold_in(key, step0 + i))
    if not unroll:
      # The step's scalar metrics travel the loop as one vector: a GPU writes each
      # stacked output of a loop with a kernel of its own at every step (one per
      # metric: 12 of All-CNN-C's invariance step), one vector with one.
      names, dtypes = [], []

      def packed(state, i):
        state, m = body(state, i)
        names[:], dtypes[:] = list(m), [jnp.result_type(v) for v in m.values()]
        return state, jnp.stack([jnp.asarray(v, jnp.float32) for v in m.values()])

      on = platform or flat_state.platform_of(batch_sharding)
      if loop_state or not flat_state.vector_in_loop(on):
        flat, back = state, lambda s: s
      else:
        flat, back = flat_state.flat_parameters(state, flat_state.filters_out_first(on))
      flat, rows = jax.lax.scan(packed, flat, jnp.arange(num_steps))
      return back(flat), {k: rows[:, j].astype(d)
                          for j, (k, d) in enumerate(zip(names, dtypes))}
    # Straight-line code: a Python loop (a fully unrolled lax.scan can still leave a
    # while loop of one trip that XLA:CPU does not always remove).
    metrics = []
    for i in range(num_steps):
      state, m = body(state, jnp.int32(i))
      metrics.append(m)
    return state, jax.tree.map(lambda *v: jnp.stack(v), *metrics)

  if data_on_device:
    def chunk(state, x_train, y_train, perms, first_pass, step0, key):
      with jax.named_scope("seed_gather"):
        idx = seed_order.seed_indices(perms, first_pass, step0, num_steps,
                                        seeds_per_step)

      def fetch(i):
        with jax.named_scope("seed_gather"):
          x = x_train[idx[i]]
          return (x if image_shape is None else x.reshape(-1, *image_shape),
                  y_train[idx[i]])
      return scan(state, fetch, step0, key)
  else:
    def chunk(state, seeds, labels, step0, key):
      return scan(state, lambda i: (seeds[i], labels[i]), step0, key)
  return chunk


def eval_logits(state: TrainState, images: jax.Array, mutable=False):
  """Eval-mode forward pass (running batch-norm statistics) of float images."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        images, train=False, mutable=mutable)


def make_eval_step(top5: bool) -> Callable:
  """(state, images uint8, labels, mask) -> sums of correct predictions and loss."""

  def eval_step(state, images, labels, mask):
    return classification_sums(eval_logits(state, to_float(images)), labels, top5, mask)

  return eval_step


def classification_sums(logits, labels, top5: bool, mask=None) -> dict[str, jax.Array]:
  """Sums over a batch: "count", "correct", "cross_entropy" (and "correct5")."""
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  out = {"count": jnp.sum(mask),
         "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
         "cross_entropy": jnp.sum(ce * mask)}
  if top5:
    out["correct5"] = jnp.sum(_in_top5(logits, labels) * mask)
  return out


def features(state: TrainState, images: jax.Array) -> dict[str, jax.Array]:
  """{"pixels": images, **sown layers} of float images, eval mode, in depth order."""
  return features_and_logits(state, images)[0]


def features_and_logits(state: TrainState, images: jax.Array):
  """(features as `features` gives them, logits) from one eval-mode forward pass."""
  logits, updates = eval_logits(state, images, mutable=["intermediates"])
  return {"pixels": images, **models.sown(updates["intermediates"])}, logits


def _seed_classes(cfg: StepConfig, labels):
  """The seeds' labels where Eq. 3's denominator is the same-class pairs, else None."""
  return labels if cfg.denominator == "class" else None


# The probe's measurements, by Eq. 3's denominator (losses.DENOMINATORS): logged as
# probe/<name>/<layer>.
PROBE_METRICS = {"batch": "inv_loss", "class": "inv_loss_same_class"}


def probe_metric_prefix(denominator: str) -> str:
  """The logged probe metrics of a denominator: "probe/<name>/" + layer."""
  return f"probe/{PROBE_METRICS[denominator]}/"


def make_probe_step(cfg: StepConfig, probe_copies: int) -> Callable:
  """(state, seed_images uint8 [K,H,W,C], labels [K], key) -> {"inv_loss/<layer>":
  L_inv, "inv_loss_same_class/<layer>": L_inv with the class denominator}, eval mode,
  never optimised.

  With a fixed batch and key, the curves over training (Figure 5) reflect the model
  alone; the baseline (M = 1) gets the same measurements as the invariance model, and
  every run both denominators', whichever it trains with, so that any two runs can be
  compared either way.
  """

  def probe_step(state, seed_images, labels, key):
    x, _, _ = expand_seeds(seed_images, labels, probe_copies)
    x = augment.augment(key, to_float(x), cfg.ranges)
    feats = features(state, x)
    feats.pop("pixels")
    out = {}
    for denominator, name in PROBE_METRICS.items():
      inv = losses.grouped_invariance_losses(
          feats, probe_copies, cfg.loss_method, cfg.loss_parts, cfg.moments_form,
          labels if denominator == "class" else None)
      out |= {f"{name}/{layer}": v for layer, v in inv.items()}
    return out

  return probe_step
