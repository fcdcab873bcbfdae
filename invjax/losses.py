"""The invariance loss of the paper (Eq. 1, 3, 4) and the classification loss.

Every function here is pure JAX and works on one layer's activations `features` [B, ...]
(flattened to D values per example) with `seed_ids` [B]: examples with the same id are
augmented copies of the same seed image. The equations come first; below them, the two
ways of computing Eq. 3: "pairwise" (the [B, B] distance matrix) and "moments" (O(B D),
the train step's default, with its own gradient).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

METHODS = ("pairwise", "moments")
# What Eq. 3 divides by: the mean distance over every pair of the batch ("batch", as the
# paper writes it) or over the pairs of the same class ("class", as the authors' training
# code computes it; their batch generator hands the loss a same-class mask).
DENOMINATORS = ("batch", "class")


# Eq. 1: the distance of two activations, the mean squared difference of their D values.
def distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """d(a, b) = (1 / D) sum_d (a_d - b_d)^2 over the last axis (D values)."""
  return jnp.sum((a - b) ** 2, axis=-1) / a.shape[-1]


# Eq. 3: L_inv of one layer, within-seed over all-pairs mean distance.
def invariance_loss(features: jax.Array, seed_ids: jax.Array,
                    method: str = "pairwise",
                    classes: jax.Array | None = None) -> jax.Array:
  """L_inv of one layer (Eq. 3), a float32 scalar.

  mean{d(x_i, x_j): i != j, same seed} / mean{d(x_i, x_j): i != j}, with d of Eq. 1.
  Self-pairs are left out of both means, so the value depends neither on the batch
  size nor on the number of copies M. 0 when every example has the same activations.
  With `classes`, the denominator's pairs are only those of the same class:
  mean{d(x_i, x_j): i != j, same class} (the "class" denominator, DENOMINATORS).

  Args:
    features: [B, ...] activations of one layer; B >= 2.
    seed_ids: int [B]; equal ids mark copies of the same seed image. Any integers.
    method: "pairwise" (the |B| x |B| distance matrix from matrix products) or
      "moments" (the same value in O(B D) from per-seed and batch means).
    classes: None, or int [B], each example's class (the copies of a seed share
      theirs; "moments" takes a seed's class from its first example).
  """
  _check_method(method)
  if features.ndim < 2 or features.shape[0] < 2:
    raise ValueError("invariance_loss needs features of shape [B, ...] with B >= 2, "
                     f"got {features.shape}.")
  if seed_ids.shape != (features.shape[0],):
    raise ValueError(f"seed_ids must have shape [{features.shape[0]}], "
                     f"got {seed_ids.shape}.")
  if classes is not None and classes.shape != seed_ids.shape:
    raise ValueError(f"classes must have shape {seed_ids.shape}, got {classes.shape}.")
  fn = _loss_pairwise if method == "pairwise" else _loss_moments
  return fn(features, seed_ids, classes)


def grouped_invariance_loss(features: jax.Array, copies: int,
                            method: str = "pairwise", parts: int = 1,
                            form: str = "one_read",
                            seed_classes: jax.Array | None = None) -> jax.Array:
  """L_inv for a batch laid out as consecutive groups: examples k*M .. k*M + M - 1 are
  the copies of seed k. Equal to `invariance_loss(features, repeat(arange(K), M))`
  (with `classes=repeat(seed_classes, M)` where seed_classes are given).

  It needs no seed ids. The train step computes every layer's at once
  (`grouped_invariance_losses`).

  Args:
    features: [B, ...] activations of one layer, B = K * copies.
    copies: M, the copies of each seed.
    method: "pairwise" or "moments".
    parts: with "moments" in the one-read form, the seeds' moments are merged within
      `parts` equal runs of consecutive seeds first (`moment_parts`): with the batch
      split over devices, one part per device, so that each device merges its own
      seeds and the devices exchange only sums of [D] vectors (all-reduce). The value
      is the same for any number of parts; one that does not divide K is reduced to
      one that does.
    form: how "moments" is computed (MOMENT_FORMS, the same value and gradient):
      "one_read" reads the activations once for the value and once more for the
      gradient, with no per-seed array in memory; "per_seed" writes each seed's sums,
      [K, D] float32 arrays, and reads them back (`moment_form` says which suits a
      platform).
    seed_classes: None (the denominator is every pair of the batch) or int [K], each
      seed's class (the denominator is the pairs of the same class). "moments"
      computes the class denominator in the per-seed form, whatever `form` says.
  """
  _check_grouped(features.shape[0], copies, method, parts, form)
  b = features.shape[0]
  if seed_classes is not None and seed_classes.shape != (b // copies,):
    raise ValueError(f"seed_classes must have shape [{b // copies}] (one per seed), got "
                     f"{seed_classes.shape}.")
  if method == "pairwise":
    classes = None if seed_classes is None else jnp.repeat(seed_classes, copies)
    return _loss_pairwise(features, jnp.repeat(jnp.arange(b // copies), copies), classes)
  if form == "one_read" and seed_classes is None:
    return _grouped_moments(copies, math.gcd(b // copies, parts), (features,))[0]
  flat = features.reshape(b, -1)
  if seed_classes is not None:
    return _class_moments(copies, flat, *_NO_GROUPS, seed_classes)
  return _moments(copies, flat, *_NO_GROUPS)


def grouped_invariance_losses(features: Mapping[str, jax.Array], copies: int,
                              method: str = "pairwise", parts: int = 1,
                              form: str = "one_read",
                              seed_classes: jax.Array | None = None
                              ) -> dict[str, jax.Array]:
  """{layer: L_inv} of every layer of one batch, {layer: [B, ...]}: for each layer what
  `grouped_invariance_loss` gives, with the same arguments.

  In the one-read moments form, the layers' losses are made together: each layer's
  activations are read once as there, and then one reduction and one pass of scalar
  arithmetic serve every layer, where layer by layer each takes kernels of its own on
  a GPU (the step's form; see "The train step's layout" below).
  """
  if not features:
    return {}
  sizes = {k: v.shape[0] for k, v in features.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"grouped_invariance_losses needs one batch size for every layer, "
                     f"got {sizes}.")
  b = next(iter(sizes.values()))
  _check_grouped(b, copies, method, parts, form)
  if method == "moments" and form == "one_read" and seed_classes is None:
    values = _grouped_moments(copies, math.gcd(b // copies, parts),
                              tuple(features.values()))
    return {k: values[i] for i, k in enumerate(features)}
  return {k: grouped_invariance_loss(v, copies, method, parts, form, seed_classes)
          for k, v in features.items()}


def _check_grouped(b: int, copies: int, method: str, parts: int, form: str) -> None:
  _check_method(method)
  if copies < 2 or b % copies:
    raise ValueError(f"grouped_invariance_loss needs copies >= 2 dividing the batch "
                     f"({b}), got copies={copies}.")
  if parts < 1:
    raise ValueError(f"grouped_invariance_loss needs parts >= 1, got {parts}.")
  if form not in MOMENT_FORMS:
    raise ValueError(f"moments form {form!r} is unknown; valid forms are "
                     f"{list(MOMENT_FORMS)}.")


MOMENT_FORMS = ("one_read", "per_seed")


def moment_parts(seeds: int, devices: int = 1) -> int:
  """The `parts` for grouped_invariance_loss: K seeds split over `devices`, one part
  per device."""
  return max(math.gcd(seeds, devices), 1)


def moment_form(platform: str) -> str:
  """The moments form for a platform: "one_read", but "per_seed" on a CPU.

  Inside a training step XLA:CPU fuses each layer's batch norm and ReLU into the
  one-read form's gradient, which reads every activation M times (for its seed's
  mean), and so computes them M times: on All-CNN-C at width 1/4 (16 x 8, float32)
  the loss took 126 ms of a 650 ms step against 21 ms of 498 ms in the per-seed form
  (`python -m experiments.profile_step`). Alone, the one-read form moves fewer bytes.
  """
  return "per_seed" if platform == "cpu" else "one_read"


# Eq. 4: the training loss, the cross-entropy and each layer's L_inv, weighted.
def total_loss(ce: jax.Array, inv_losses: Mapping[str, jax.Array],
               weights: jax.Array, alpha: float,
               class_losses: Mapping[str, jax.Array] | None = None,
               class_weights: jax.Array | None = None,
               class_alpha: float = 0.0) -> jax.Array:
  """Eq. 4: (1 - alpha) * L_obj + sum_l alpha_l * L_inv_l (layers in depth order).

  With a class-invariance term (not in the paper; the authors' code has it): L_cls_l is
  Eq. 3 with the examples' classes in place of their seeds, weighted by class_weights
  (summing to class_alpha), and the cross-entropy weighs 1 - alpha - class_alpha.
  """
  loss = (1.0 - alpha - class_alpha) * ce
  if inv_losses:
    loss = loss + jnp.sum(weights * jnp.stack(list(inv_losses.values())))
  if class_losses:
    loss = loss + jnp.sum(class_weights * jnp.stack(list(class_losses.values())))
  return loss


# How alpha is shared out over the L sown layers (t = l / (L - 1), l = 0 .. L - 1, the
# first layer l = 0); each law is normalised to sum to alpha.
WEIGHT_LAWS = {
    "exponential": lambda t, r: r ** t,  # Eq. 4: the deepest weighs r x the first
    "linear": lambda t, r: 1.0 + (r - 1.0) * t,  # the deepest weighs r x the first
    "uniform": lambda t, r: jnp.ones_like(t),  # every layer alpha / L
    "decay": lambda t, r: r ** -t,  # the first weighs r x the deepest
}


def layer_weights(num_layers: int, alpha: float = 0.1, ratio: float = 10.0,
                  law: str = "exponential") -> jax.Array:
  """Eq. 4's layer weights alpha_l, summing to alpha, by one of WEIGHT_LAWS.

  The paper's law is "exponential": weights[l] ~ ratio ** (l / (L - 1)), so the deepest
  layer weighs `ratio` times the first.
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
  if law not in WEIGHT_LAWS:
    raise ValueError(f"layer weight law {law!r} is unknown; valid laws are "
                     f"{list(WEIGHT_LAWS)}.")
  if num_layers == 1:
    return jnp.array([alpha], jnp.float32)
  t = jnp.arange(num_layers, dtype=jnp.float32) / (num_layers - 1)
  w = WEIGHT_LAWS[law](t, jnp.asarray(ratio, jnp.float32))
  return alpha * w / jnp.sum(w)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy (L_obj), in float32."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


# How Eq. 3 is computed --------------------------------------------------------------

def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"invariance loss method {method!r} is unknown; "
                     f"valid methods are {list(METHODS)}.")


def _flat(features: jax.Array) -> jax.Array:
  f = features.reshape(features.shape[0], -1).astype(jnp.float32)
  # Distances do not change under a shift; centring on the batch mean keeps the
  # ||a||^2 - 2 a.b + ||b||^2 expansion from cancelling catastrophically when the
  # activations share a large common part (ReLU outputs do).
  return f - jnp.mean(f, axis=0, keepdims=True)


def _normalised(f: jax.Array) -> jax.Array:
  """Centred flat features divided by their largest magnitude, held constant.

  L_inv is a ratio of distances, unchanged by a positive scale of the activations, and
  so is its gradient once the scale is held constant (stop_gradient): L(f / s) = L(f)
  and d/df L(f / s) = L'(f). Without this, activations of order 1e-11 have squared
  distances of order 1e-22 whose square, in the quotient rule, underflows float32 and
  makes the gradient NaN; order 1e20 overflows.
  """
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(f)))
  return f / jnp.where(scale > 0, scale, 1.0)


def _distances(f: jax.Array) -> jax.Array:
  """Eq. 1 for every pair of rows of f [B, D]: [B, B], from ||a||^2 - 2 a.b + ||b||^2
  (matrix products, no [B, B, D] array).

  The squared norms are the Gram matrix's diagonal, not a sum of their own: two equal
  rows then come out exactly 0 apart, as a.a and a.b are the same sum taken the same
  way (a matrix product computes its entries alike). A separate sum
  rounds differently and left equal rows ~1e-7 apart, so a denominator made only of
  such pairs (the class denominator with one seed per class) gave a loss of 1 for 0/0.
  """
  gram = f @ f.T
  sq = jnp.diagonal(gram)
  d = (sq[:, None] + sq[None, :] - 2.0 * gram) / f.shape[1]
  return jnp.maximum(d, 0.0)


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den == 0 (then num == 0 too: all activations equal).

  A layer whose activations are the same for every example of the batch (a dead or
  constant layer) has no distances at all; its loss is defined as 0 with zero gradient.
  """
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _loss_pairwise(features, seed_ids, classes=None):
  d = _distances(_normalised(_flat(features)))
  b = d.shape[0]
  off_diag = ~jnp.eye(b, dtype=bool)
  same = (seed_ids[:, None] == seed_ids[None, :]) & off_diag
  within = jnp.sum(jnp.where(same, d, 0.0)) / jnp.maximum(jnp.sum(same), 1)
  pairs = off_diag if classes is None else (classes[:, None] == classes[None, :]) & off_diag
  between = jnp.sum(jnp.where(pairs, d, 0.0)) / jnp.maximum(jnp.sum(pairs), 1)
  return _safe_ratio(within, between)


# The moments method ------------------------------------------------------------------
#
# For a set S of n vectors with mean mu, sum_{i, j in S} ||f_i - f_j||^2 equals
# 2 n sum_{i in S} ||f_i - mu||^2; self-pairs add 0, so dividing by n (n - 1) pairs gives
# the mean over i != j. So Eq. 3 needs only each seed's sum of squared deviations from
# its mean (within) and the batch's (between), O(B D), no B x B matrix:
#
#   within = sum_k 2 n_k ss_k / sum_k n_k (n_k - 1) / D,  between = 2 ss / (B - 1) / D
#
# with ss_k = sum_{i in k} ||f_i - mu_k||^2 and ss = sum_i ||f_i - mu||^2
# = sum_k ss_k + sum_k n_k ||mu_k - mu||^2.
#
# The gradient is elementwise (custom_vjp), with a_k = 4 n_k / (sum n (n - 1) D) and
# b = 4 / ((B - 1) D):
#
#   dL/df_i = [(a_k - L b) (f_i - mu) - a_k (mu_k - mu)] / between
#
# No square of a distance appears, so nothing under- or overflows at any scale
# (1e-12 .. 1e12), and every term is a deviation from a mean, of the size of the
# activations' spread whatever their offset.


def _merge_moments(a, b):
  """Chan et al.'s merge of (count, mean, sum of squared deviations), and a plain sum."""
  na, ma, qa, sa = a
  nb, mb, qb, sb = b
  fa, fb = na.astype(jnp.float32), nb.astype(jnp.float32)
  n = jnp.maximum(fa + fb, 1.0)
  d = mb - ma
  return na + nb, ma + d * (fb / n), qa + qb + d * d * (fa * fb / n), sa + sb


# The train step's layout: seeds in consecutive groups of M copies (the grouped form).
#
# Written for the fewest kernels as well as the fewest bytes: a GPU step of a small
# network is bound by launching its kernels (on an H200 each kernel the loss added cost
# 3.4-4 us of step time), and XLA makes each reduction it cannot fuse, and each scalar
# division, a kernel of its own. Compiled for an H200 (`python -m
# experiments.kernel_census`, bfloat16), the loss adds 24 kernels to All-CNN-C's step
# (9 layers) and 18 to WRN-28-10's; made layer by layer, it added 50 and 60 (and its
# first version 87 and 132, for an H100).
#
# Forward, one read of each layer's activations in their own dtype (bf16 stays bf16 in
# memory), everything in float32, in P parts of K / P consecutive seeds (one or more
# per device):
#   - per seed k and feature d, from its M copies at once and in registers: the
#     deviations from the seed's first copy, e_i = f_i - f_0 (exactly 0 when the copies
#     are equal, at any offset), the seed's mean f_0 + sum e / M and ss_kd = sum e^2 -
#     (sum e)^2 / M;
#   - Chan's merge of (M, mu_kd, 0) over the seeds of each part (one reduction) gives
#     the part's mean and the sum of squares of its seeds' means about it per feature,
#     and a plain sum of ss_kd the within-seed one; their sum is the part's total:
#     [P, D] vectors. The parts' are merged with their means shifted by the first
#     part's (with the batch split over devices, the only values devices exchange);
#   - one reduction of every layer's two [D] vectors gives each layer's two scalar
#     sums, and one pass of arithmetic every layer's loss and the two coefficients of
#     its gradient, so that the backward pass divides by nothing.
# Where XLA fuses the per-seed arithmetic into the reduction, no [K, D] array is
# written: the program touches the activations three times in all (this read; the
# gradient's read of them and its write). It does for All-CNN-C's five larger layers,
# not for its four smallest (it prefers a thread per seed and feature there), and
# only for two when ss_kd was also the merge's starting sum of squares (an operand
# read twice): All-CNN-C's invariance step launched 146 kernels then, 143 after. The
# layers of at most SMALL_LAYER features are read together, as one (`_all_layer_sums`):
# All-CNN-C's three smallest (conv7-conv9) then take two kernels where they took two
# each, 138 a step.
# Backward, one elementwise pass per layer: mu_k is recomputed from the M copies where
# the gradient is written; the batch mean mu [D] and two scalars are kept from the
# forward pass.


def _add(a, b):
  return tuple(u + v for u, v in zip(a, b))


def _layer_sums(copies, parts, x):
  """Of one layer's activations x [B, ...] (D features: ... flat or not): (per feature,
  float32, of x's feature shape each) the sum over seeds of the within-seed squared
  deviations, the batch's sum of squared deviations from its mean, and that mean."""
  b, features = x.shape[0], x.shape[1:]
  k = b // copies
  xg = x.reshape(parts, k // parts, copies, *features)  # splits the batch axis only
  first = xg[:, :, 0].astype(jnp.float32)  # [P, K / P, ...]
  e = [xg[:, :, i].astype(jnp.float32) - first for i in range(1, copies)]
  e_sum = sum(e)
  ss = jnp.maximum(sum(v * v for v in e) - e_sum * e_sum / copies, 0.0)
  if k == parts:  # one seed per part: nothing to merge
    mean, m2, within = (first + e_sum / copies)[:, 0], ss[:, 0], ss[:, 0]
  else:
    zero = jnp.float32(0)
    _, mean, between, within = jax.lax.reduce(  # [P, ...] each
        (jnp.full(ss.shape, copies, jnp.float32), first + e_sum / copies,
         jnp.zeros_like(ss), ss), (zero,) * 4, _merge_moments, (1,))
    m2 = within + between
  if parts == 1:
    return within[0], m2[0], mean[0]
  n = b / parts
  dm = mean - mean[:1]  # shifted by the first part's mean: of the size of the spread
  dm_sum = jnp.sum(dm, axis=0)
  total = jnp.sum(m2 + n * dm * dm, axis=0) - n * dm_sum * dm_sum / parts
  return jnp.sum(within, axis=0), total, mean[0] + dm_sum / parts


# Features (D) up to which layers are read together. Compiled for an H200, All-CNN-C's
# step launches 143 kernels with none, 138 at 8,192 (conv7-conv9) and 136 at 16,384
# (conv6 too), and the loss alone moves 404 MB either way (its kernels' operands and
# results, counted in XLA:GPU's optimised program, `python -m experiments.loss_cost
# --target=h200`). But XLA:CPU, whose count issue 14's bytes target takes, writes the
# joined layers out: its bytes for the loss rise from 3.43 x the activations to 3.76 x
# at 8,192 and 4.05 x at 16,384 (over the 4 x target). Every layer joined would spare
# WRN-28-10's step 10 kernels (317 -> 307) for 1 % more bytes on a GPU and 11.9 x on
# XLA:CPU.
SMALL_LAYER = 8192


def _all_layer_sums(copies, parts, xs):
  """`_layer_sums` of every layer of `xs`, as flat [D] vectors. The layers of at most
  SMALL_LAYER features are flattened and concatenated (those of one dtype together)
  and read in one pass: the sums are per feature, so they are the same, and where XLA
  made two kernels for each small layer (the per-seed arithmetic, then the merge over
  seeds) it makes two for them all. XLA:GPU reads the layers where they lie (the
  concatenation fuses into the read); XLA:CPU writes it out.

  The larger layers are read in their own shape, [B, H, W, C], and only their sums
  ([H, W, C], 1 / B of the data) flattened. A flattened [B, D] view costs nothing on a
  CPU or GPU (row-major arrays: a bitcast), but a TPU stores an array's two minor axes
  in tiles laid out for the convolutions, and there flattening is a copy, forward and
  backward: 164 MB a step on each of 8 v5e chips for All-CNN-C (float32), against the
  22 MB of its sown activations there (`python -m experiments.tpu_compile`)."""
  sums = {}
  groups = {}
  size = lambda x: math.prod(x.shape[1:])
  for i, x in enumerate(xs):
    if size(x) <= SMALL_LAYER:
      groups.setdefault(x.dtype, []).append(i)
  for group in groups.values():
    if len(group) < 2:
      continue
    joined = _layer_sums(copies, parts, jnp.concatenate(
        [xs[i].reshape(xs[i].shape[0], -1) for i in group], axis=1))
    start = 0
    for i in group:
      sums[i] = tuple(v[start:start + size(xs[i])] for v in joined)
      start += size(xs[i])
  flat = lambda vectors: tuple(v.reshape(-1) for v in vectors)
  return [sums[i] if i in sums else flat(_layer_sums(copies, parts, x))
          for i, x in enumerate(xs)]


def _grouped_moments_fwd(copies, parts, xs):
  """The forward pass of the grouped form, every layer at once: (L [layers],
  residuals for the gradient)."""
  b = xs[0].shape[0]
  sums = _all_layer_sums(copies, parts, xs)
  # The layers' two [D] vectors, zero-padded to the longest, reduced in one reduction
  # (XLA pads them in its input, writing nothing): [layers] each.
  dims = [math.prod(x.shape[1:]) for x in xs]
  longest = max(dims)
  pad = lambda v: jnp.pad(v, (0, longest - v.shape[0]))
  zero = jnp.float32(0)
  within_ss, total = jax.lax.reduce(
      (jnp.stack([pad(w) for w, _, _ in sums]), jnp.stack([pad(t) for _, t, _ in sums])),
      (zero, zero), _add, (1,))
  dim = jnp.asarray(dims, jnp.float32)
  pairs = jnp.float32(b * (copies - 1))
  within = 2.0 * copies * within_ss / pairs / dim
  between = 2.0 * jnp.maximum(total, within_ss) / (b - 1) / dim
  loss = _safe_ratio(within, between)
  # dL/df_i = [(a - L b) (f_i - mu) - a (mu_k - mu)] / between = c1 (f_i - mu) -
  # c2 (mu_k - mu), its two scalars made here.
  a = 4.0 * copies / (pairs * dim)
  inv = _safe_ratio(jnp.ones_like(between), between)
  c1, c2 = (a - loss * 4.0 / ((b - 1) * dim)) * inv, a * inv
  return loss, (xs, tuple(mu.reshape(x.shape[1:]) for x, (_, _, mu) in zip(xs, sums)),
                c1, c2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _grouped_moments(copies, parts, xs):
  """L_inv (Eq. 3) of each layer's activations in `xs` ([B, ...] each, seeds in
  consecutive groups of `copies`), [layers], by the moments method, each layer's sums
  merged in `parts` equal parts first."""
  return _grouped_moments_fwd(copies, parts, xs)[0]


def _grouped_moments_bwd(copies, parts, residuals, ct):
  del parts
  xs, mus, c1, c2 = residuals
  grads = []
  for layer, (x, mu) in enumerate(zip(xs, mus)):
    b = x.shape[0]
    f = x.reshape(b // copies, copies, *x.shape[1:]).astype(jnp.float32) - mu  # f_i - mu
    mu_k = (sum(f[:, i] for i in range(copies)) / copies)[:, None]  # mu_k - mu
    # Written c1 f - c2 mu_k rather than c2 (f - mu_k) + (c1 - c2) f: XLA then fuses
    # the whole gradient into one pass over the activations (on CPU, the other form
    # makes it write a float32 copy of them first). ct multiplies inside the pass:
    # (ct * c1) would be a kernel of its own on a GPU.
    grad = ct[layer] * (c1[layer] * f - c2[layer] * mu_k)
    grads.append(grad.reshape(x.shape).astype(x.dtype))
  return (tuple(grads),)


_grouped_moments.defvjp(_grouped_moments_fwd, _grouped_moments_bwd)


# Both layouts, per-seed form (the seed ids' form, and the grouped form's on a CPU): one
# read of the activations, in their own dtype (bf16 stays bf16 in memory), gives per
# seed k and feature d, in float32, the seed's mean c_kd (shifted by the batch's first
# example r_0, so its size is the spread of the activations, not their offset), its
# sum of squared deviations ss_kd, by Welford's (Chan's) merge of running means, and
# its sum of squares about r_0: one variadic reduction (segment sums for seed ids), free
# of the cancellation of sum-of-squares minus squared mean at any offset or scale
# (1e-12 .. 1e12); copies that are equal give ss = 0 exactly. Plain sums over the seeds
# of these [K, D] arrays (1 / M of the data each) give the rest; with the seeds split
# over devices, those are the only values the devices exchange (one all-reduce). The
# gradient reads the seeds' means back, so it reads each activation once.


def _loss_moments(features, seed_ids, classes=None):
  b = features.shape[0]
  _, first, group = jnp.unique(seed_ids, return_index=True, return_inverse=True, size=b)
  group = group.reshape(b)
  counts = jax.ops.segment_sum(jnp.ones((b,), jnp.int32), group, num_segments=b)
  if classes is not None:
    return _class_moments(0, features.reshape(b, -1), group, first, counts,
                          classes[first])
  return _moments(0, features.reshape(b, -1), group, first, counts)


def _from_first(copies, x, first):
  """Flat activations x [B, D] in float32 minus the batch's first example r_0:
  [K, copies, D] for seeds in consecutive groups of `copies`, else [B, D] (first[0] is
  r_0's index)."""
  b, dim = x.shape
  if copies:
    return (x.reshape(b // copies, copies, dim).astype(jnp.float32)
            - x[:1].astype(jnp.float32))
  return x.astype(jnp.float32) - x[first[:1]].astype(jnp.float32)


def _seed_moments(copies, x, group, first, counts):
  """Per seed slot k and feature d, float32, of flat activations x [B, D]:
  (c: the seed's mean - r_0, ss: its sum of squared deviations from its mean,
   q0: its sum of squared deviations from r_0), [G, D] each, and its count n_k
  ([G, 1], or M)."""
  b, dim = x.shape
  if copies:  # consecutive groups of `copies`: one reduction over the copies axis
    xs = _from_first(copies, x, first)
    count = jnp.int8 if copies < 128 else jnp.int32  # 1 byte per seed and feature
    zero = jnp.float32(0)
    _, c, ss, q0 = jax.lax.reduce(
        (jnp.ones(xs.shape, count), xs, jnp.zeros_like(xs), xs * xs),
        (count(0), zero, zero, zero), _merge_moments, (1,))
    return c, ss, q0, jnp.float32(copies)
  # Seed ids (not the train step's layout): segment sums of the activations shifted by
  # each seed's first example r_k, which keeps Q - S^2 / n free of cancellation.
  r0 = x[first[:1]].astype(jnp.float32)
  ref = x[first].astype(jnp.float32)  # [G, D], G = B slots, unused ones empty
  g = x.astype(jnp.float32) - ref[group]
  s = jax.ops.segment_sum(g, group, num_segments=b)
  q = jax.ops.segment_sum(g * g, group, num_segments=b)
  q0 = jax.ops.segment_sum((x.astype(jnp.float32) - r0) ** 2, group, num_segments=b)
  n = counts.astype(jnp.float32)[:, None]
  nn = jnp.maximum(n, 1.0)  # empty slots have s = q = 0
  return (ref - r0) + s / nn, jnp.maximum(q - s * s / nn, 0.0), q0, n


def _moments_parts(copies, x, group, first, counts):
  """The forward pass: (L, residuals for the gradient)."""
  b, dim = x.shape
  c, ss, q0, n = _seed_moments(copies, x, group, first, counts)
  # The sums over seeds: plain sums of the reduction's outputs, so that XLA reads each
  # once and, with the seeds split over devices, adds the devices' sums (all-reduce).
  c_mean = jnp.sum(c if copies else n * c, axis=0) * (n if copies else 1.0) / b  # [D]
  if copies:
    pairs = jnp.float32(b * (copies - 1))
    within_ss = jnp.sum(ss)
    within = 2.0 * copies * within_ss / pairs / dim
  else:
    pairs = jnp.maximum(jnp.sum(counts * (counts - 1)), 1).astype(jnp.float32)
    within_ss = jnp.sum(ss)
    within = jnp.sum(2.0 * n * ss) / pairs / dim
  # sum_i ||f_i - mu||^2 = sum_i ||f_i - r_0||^2 - B ||mu - r_0||^2 (r_0 is one of the
  # examples, so mu - r_0 is of the size of the spread: no cancellation to fear), and
  # at least the within-seed part.
  total_ss = jnp.maximum(jnp.sum(q0) - b * jnp.sum(c_mean * c_mean), within_ss)
  between = 2.0 * total_ss / (b - 1) / dim
  loss = _safe_ratio(within, between)
  return loss, (x, c, c_mean, loss, between, pairs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _moments(copies, x, group, first, counts):
  """L_inv (Eq. 3) of flat activations x [B, D] by the moments method.

  copies > 0: seeds in consecutive groups of `copies` (group, first, counts unused);
  copies = 0: example i belongs to seed slot group[i], whose first example is
  first[slot] and which holds counts[slot] examples.
  """
  return _moments_parts(copies, x, group, first, counts)[0]


def _moments_fwd(copies, x, group, first, counts):
  loss, res = _moments_parts(copies, x, group, first, counts)
  return loss, (res, group, first, counts)


def _moments_bwd(copies, residuals, ct):
  (x, c, c_mean, loss, between, pairs), group, first, counts = residuals
  b, dim = x.shape
  xs = _from_first(copies, x, first)
  if copies:
    mu = c[:, None]  # [K, 1, D]
    a = 4.0 * copies / (pairs * dim)
  else:
    mu = c[group]
    a = (4.0 * counts / (pairs * dim))[group][:, None]
  inv = _safe_ratio(ct, between)
  lb = loss * 4.0 / ((b - 1) * dim)
  # (a - L b) (f_i - mu_k) - L b (mu_k - mu), written to read mu_k once per element
  # (all shifted by r_0, so the terms are of the size of the activations' spread).
  grad = inv * ((a - lb) * xs - a * mu + lb * c_mean)
  return grad.reshape(b, dim).astype(x.dtype), None, None, None


_moments.defvjp(_moments_fwd, _moments_bwd)


# The class denominator ("class", DENOMINATORS), both layouts, from the per-seed sums:
# for a class c of n_c examples with mean mu_c, the sum over its ordered pairs is
# 2 n_c t_c, t_c = sum_{i in c} ||f_i - mu_c||^2 = sum_{k in c} t_k, t_k = ss_k + n_k
# ||mu_k - mu_c||^2 over the seeds k of c, so
#
#   between = sum_k 2 n_c(k) t_k / sum_k n_k (n_c(k) - 1) / D
#
# (one class holding the whole batch gives the batch denominator). With b_k = 4 n_c(k) /
# (sum_k n_k (n_c(k) - 1) D) and a_k as above, the gradient is elementwise again:
#
#   dL/df_i = [a_k (f_i - mu_k) - L b_k (f_i - mu_c(k))] / between.
#
# Each seed's class sums come from a product with the [G, G] same-class matrix (no
# sort, scatter or gather), in float32 at full precision (a GPU's default for a float32
# product rounds its operands to 10 bits). The seeds' means are shifted by the batch's
# first example, and the classes' means are weighted means of those, so every term is a
# deviation of the size of the spread. The [K, D] per-seed arrays are written, as in the
# per-seed form.


def _class_moments_parts(copies, x, group, first, counts, seed_class):
  """The forward pass: (L, residuals for the gradient). seed_class [G]: the class of
  each seed slot (any integers)."""
  _, dim = x.shape
  c, ss, _, n = _seed_moments(copies, x, group, first, counts)
  g = c.shape[0]
  n = jnp.broadcast_to(jnp.asarray(n, jnp.float32), (g, 1))  # [G, 1]; empty slots 0
  same = (seed_class[:, None] == seed_class[None, :]).astype(jnp.float32)  # [G, G]
  sums = lambda v: jnp.matmul(same, v, precision=jax.lax.Precision.HIGHEST)
  n_c = sums(n)  # [G, 1]: the examples of each seed's class
  class_mean = sums(n * c) / jnp.maximum(n_c, 1.0)  # mu_c(k) - r_0, [G, D]
  dev = c - class_mean
  t = jnp.sum(ss + n * dev * dev, axis=1, keepdims=True)  # [G, 1]
  class_pairs = jnp.maximum(jnp.sum(n * (n_c - 1.0)), 1.0)
  between = jnp.sum(2.0 * n_c * t) / class_pairs / dim
  pairs = jnp.maximum(jnp.sum(n * (n - 1.0)), 1.0)
  within = jnp.sum(2.0 * n * ss) / pairs / dim
  loss = _safe_ratio(within, between)
  a = 4.0 * n / (pairs * dim)  # [G, 1]
  b_c = 4.0 * n_c / (class_pairs * dim)  # [G, 1]
  return loss, (x, c, class_mean, a, b_c, loss, between)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _class_moments(copies, x, group, first, counts, seed_class):
  """L_inv (Eq. 3) with the class denominator, of flat activations x [B, D]; the
  layouts as in `_moments`, and seed_class [G] the class of each seed slot."""
  return _class_moments_parts(copies, x, group, first, counts, seed_class)[0]


def _class_moments_fwd(copies, x, group, first, counts, seed_class):
  loss, res = _class_moments_parts(copies, x, group, first, counts, seed_class)
  return loss, (res, group, first)


def _class_moments_bwd(copies, residuals, ct):
  (x, c, class_mean, a, b_c, loss, between), group, first = residuals
  xs = _from_first(copies, x, first)
  per_seed = (lambda v: v[:, None]) if copies else (lambda v: v[group])  # [K, 1, ...]
  grad = _safe_ratio(ct, between) * (
      per_seed(a) * (xs - per_seed(c)) - loss * per_seed(b_c) * (xs - per_seed(class_mean)))
  return grad.reshape(x.shape).astype(x.dtype), None, None, None, None


_class_moments.defvjp(_class_moments_fwd, _class_moments_bwd)


# The grouped layout needs no seed ids.
_NO_GROUPS = (np.zeros((0,), np.int32),) * 3
