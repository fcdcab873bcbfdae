"""The jitted train step: batch layout, Eq. 4 as optimised, and learning."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from invjax import augment
from invjax import config_lib
from invjax import losses
from invjax import models
from invjax import seed_order
from invjax import steps
from tests import helpers

SHAPE = (16, 16, 3)


def _setup(copies, alpha, method="pairwise", classes=4, batch_norm="flax"):
  m = models.create("allcnn", classes, layers=helpers.TINY_LAYERS,
                    batch_norm_impl=batch_norm)
  layers = list(models.layer_shapes(m, SHAPE))
  cfg = steps.StepConfig(copies=copies, alpha=alpha, alpha_ratio=10.0,
                         loss_method=method, ranges=augment.AugmentRanges(),
                         num_layers=len(layers))
  state = steps.create_train_state(jax.random.key(0), m, SHAPE,
                                   optax.sgd(0.05, momentum=0.9, nesterov=True))
  return m, cfg, state, layers


def _seeds(k, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(0, 256, (k, *SHAPE)), jnp.uint8),
          jnp.asarray(rng.integers(0, classes, k), jnp.int32))


def _forward_again(state, cfg, seeds, labels, key):
  """The train step's forward pass redone here: (logits, sown features, labels, seed
  ids) of the augmented batch of copies, train mode."""
  x, y, ids = steps.expand_seeds(seeds, labels, cfg.copies)
  x = augment.augment(key, steps.to_float(x), cfg.ranges)
  logits, upd = state.apply_fn(
      {"params": state.params, "batch_stats": state.batch_stats}, x, train=True,
      mutable=["batch_stats", "intermediates"])
  return logits, models.sown(upd["intermediates"]), y, ids


def test_initial_state_is_one_program_equal_to_the_op_by_op_construction():
  """create_train_state lowers one program (made op by op, the optimizer's buffers of
  each distinct parameter shape lowered one each), and makes the same state."""
  m = models.create("allcnn", 4, layers=((8, 3, 1, "SAME"), (12, 3, 2, "SAME"),
                                         (16, 1, 1, "VALID")))
  tx = optax.sgd(0.05, momentum=0.9, nesterov=True)
  lowered = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(event)

  key = jax.random.key(3)
  jax.clear_caches()
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    state = steps.create_train_state(key, m, SHAPE, tx)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(lowered) == 1
  variables = m.init(key, jnp.zeros((1, *SHAPE)), train=False)
  eager = steps.TrainState.create(apply_fn=m.apply, params=variables["params"],
                                  batch_stats=variables["batch_stats"], tx=tx)
  assert jax.tree.structure(state) == jax.tree.structure(eager)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(state.step) == 0 and jnp.issubdtype(state.step.dtype, jnp.integer)


def test_expand_seeds_layout():
  x = jnp.arange(3 * 2).reshape(3, 2)
  xb, yb, ids = steps.expand_seeds(x, jnp.array([5, 6, 7]), 4)
  assert xb.shape == (12, 2)
  np.testing.assert_array_equal(ids, np.repeat(np.arange(3), 4))
  np.testing.assert_array_equal(yb, np.repeat([5, 6, 7], 4))
  np.testing.assert_array_equal(xb, np.repeat(np.asarray(x), 4, axis=0))


def test_loss_is_eq4_over_the_augmented_batch():
  """The optimised loss equals (1 - alpha) CE + sum_l alpha_l L_inv_l recomputed here."""
  _, cfg, state, layers = _setup(copies=4, alpha=0.3)
  seeds, labels = _seeds(4)
  key = jax.random.key(3)
  new_state, metrics = jax.jit(steps.make_train_step(cfg))(state, seeds, labels, key)
  # Recompute from scratch: same augmentation, same forward pass.

  @jax.jit
  def recompute(state):
    logits, feats, y, ids = _forward_again(state, cfg, seeds, labels, key)
    inv = [losses.invariance_loss(feats[l], ids) for l in layers]  # the seed-id form
    w = losses.layer_weights(len(layers), 0.3, 10.0)
    ce = losses.cross_entropy(logits, y)
    return 0.7 * ce + jnp.sum(w * jnp.stack(inv)), inv

  expected, inv = recompute(state)
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
  for l, v in zip(layers, inv):
    assert float(metrics[f"inv_loss/{l}"]) == pytest.approx(float(v), rel=1e-5)
  assert int(new_state.step) == 1


@functools.lru_cache(maxsize=None)  # several tests compare the same few updates
def _updated_params(copies, alpha, method="pairwise"):
  _, cfg, state, _ = _setup(copies, alpha, method)
  seeds, labels = _seeds(16 // copies)
  new, metrics = jax.jit(steps.make_train_step(cfg))(state, seeds, labels,
                                                      jax.random.key(5))
  return new.params, metrics


def test_alpha_zero_measures_but_does_not_optimise_inv_loss():
  p0, m0 = _updated_params(copies=4, alpha=0.0, method="pairwise")
  assert float(m0["loss"]) == pytest.approx(float(m0["cross_entropy"]))
  assert "inv_loss/conv1" in m0
  # The L_inv method cannot change a CE-only update...
  p1, _ = _updated_params(copies=4, alpha=0.0, method="moments")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p0, p1)
  # ... while alpha > 0 does change it.
  p2, _ = _updated_params(copies=4, alpha=0.5, method="pairwise")
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p0, p2)
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_moments_default_trains_as_pairwise_does():
  """The O(B D) form is the default; a whole step with it (real activations, grouped
  layout, gradients through every layer) gives the pairwise form's parameters."""
  assert config_lib.base_config().loss_method == "moments"
  pairwise, mp = _updated_params(copies=4, alpha=0.5, method="pairwise")
  moments, mm = _updated_params(copies=4, alpha=0.5, method="moments")
  for k in mp:
    assert float(mm[k]) == pytest.approx(float(mp[k]), rel=1e-5), k
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               moments, pairwise)
  ce_only, _ = _updated_params(copies=4, alpha=0.0, method="moments")
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), moments, ce_only)
  assert max(jax.tree.leaves(diff)) > 1e-4  # the loss term did act


def test_same_batch_step_without_measuring_inv_loss():
  _, cfg, state, _ = _setup(copies=4, alpha=0.0, method="moments")
  seeds, labels = _seeds(4)
  bare = dataclasses.replace(cfg, measure_inv=False)
  args = (state, seeds, labels, jax.random.key(5))
  new, metrics = jax.jit(steps.make_train_step(bare))(*args)
  assert not any(k.startswith("inv_loss/") for k in metrics)
  measured, _ = jax.jit(steps.make_train_step(cfg))(*args)
  jax.tree.map(np.testing.assert_array_equal, new.params, measured.params)
  forced = dataclasses.replace(cfg, alpha=0.3, measure_inv=False)  # alpha > 0 needs it
  _, m = jax.jit(steps.make_train_step(forced))(*args)
  assert "inv_loss/conv1" in m


@pytest.mark.parametrize("data_on_device,unroll,batch_norm,rows,platform", [
    (True, False, "fused", False, "gpu"), (True, False, "fused", True, "gpu"),
    (True, False, "fused", True, "tpu"), (False, True, "flax", False, "gpu")])
def test_chunk_of_steps_equals_single_steps(data_on_device, unroll, batch_norm, rows,
                                            platform):
  """3 steps in one program (looped as on a GPU, with its fused batch norm and the
  kernels in cuDNN's layout in one vector in the loop, or as on a TPU, per parameter;
  or unrolled as on a CPU; seeds gathered on device, from the images or from them as
  rows, or given) = the same 3 steps one by one."""
  _, cfg, state, _ = _setup(copies=4, alpha=0.3, method="moments",
                            batch_norm=batch_norm)
  x, y = _seeds(12, seed=1)
  perms = jnp.stack([jnp.arange(12, dtype=jnp.int32)[::-1],
                     jnp.arange(12, dtype=jnp.int32)])
  key = jax.random.key(9)
  single = jax.jit(steps.make_train_step(cfg))
  expected, singles = state, []
  for s in range(2, 5):  # steps 2, 3, 4 take positions 8..19: across the pass end
    idx = seed_order.seed_indices(np.asarray(perms), 0, s, 1, 4)[0]
    expected, m = single(expected, x[idx], y[idx], jax.random.fold_in(key, s))
    singles.append(m)
  chunk = jax.jit(steps.make_train_chunk(cfg, 3, 4, data_on_device=data_on_device,
                                         unroll=unroll, platform=platform,
                                         image_shape=x.shape[1:] if rows else None))
  if data_on_device:
    got, metrics = chunk(state, x.reshape(len(x), -1) if rows else x, y, perms, 0, 2, key)
  else:
    idx = seed_order.seed_indices(np.asarray(perms), 0, 2, 3, 4)
    got, metrics = chunk(state, x[idx], y[idx], 2, key)
  # Every metric, in its dtype (a loop carries them packed in one vector).
  assert set(metrics) == set(singles[0]) and len(metrics) > 3
  for k, v in metrics.items():
    assert v.shape == (3,) and v.dtype == singles[0][k].dtype, (k, v.shape, v.dtype)
    np.testing.assert_allclose(v, [m[k] for m in singles], rtol=1e-5, err_msg=k)
  for a, b in ((got.params, expected.params), (got.opt_state, expected.opt_state)):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)
  assert int(got.step) == 3


def test_baseline_step_has_no_inv_metrics():
  _, m = _updated_params(copies=1, alpha=0.0)
  assert not any(k.startswith("inv_loss/") for k in m)


def test_optimising_the_invariance_loss_lowers_it():
  """Same seeds, keys and steps with alpha = 0.8 and alpha = 0: the optimised model's
  L_inv at the deepest layer ends clearly lower (mean of the last 40 of 200 steps).
  At alpha = 0 it is measured with the same step (stop_gradient), so the comparison is
  like for like. The drop is slow, a property of the loss: ~0.88 -> ~0.73 here."""
  x, y = helpers.toy_images(32, size=SHAPE[0])
  seeds, labels = jnp.asarray(x), jnp.asarray(y, jnp.int32)
  last = {}
  for alpha in (0.0, 0.8):
    _, cfg, state, layers = _setup(copies=4, alpha=alpha, method="moments")
    step = jax.jit(steps.make_train_step(cfg), donate_argnums=0)
    values = []
    for i in range(200):
      sl = slice(4 * (i % 8), 4 * (i % 8) + 4)
      state, m = step(state, seeds[sl], labels[sl], jax.random.key(i))
      values.append(m[f"inv_loss/{layers[-1]}"])
    last[alpha] = float(np.mean(jax.device_get(values[-40:])))
  assert last[0.8] < 0.9 * last[0.0], last


def test_eval_step_masks_padding():
  _, cfg, state, _ = _setup(copies=1, alpha=0.0, classes=12)
  images, labels = _seeds(6, classes=12)
  mask = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
  out = jax.jit(steps.make_eval_step(top5=True))(state, images, labels, mask)
  logits = np.asarray(steps.eval_logits(state, steps.to_float(images)))
  labels = np.asarray(labels)
  correct = np.sum((np.argmax(logits, -1) == labels)[:4])
  rank = np.sum(logits > logits[np.arange(6), labels][:, None], axis=1)
  assert float(out["count"]) == 4 and float(out["correct"]) == correct
  assert float(out["correct5"]) == np.sum((rank < 5)[:4])


def test_top5_with_fewer_than_five_classes_counts_every_label():
  _, cfg, state, _ = _setup(copies=1, alpha=0.0, classes=4)
  images, labels = _seeds(6)
  out = jax.jit(steps.make_eval_step(top5=True))(state, images, labels, jnp.ones(6))
  assert float(out["correct5"]) == 6


def test_probe_step_is_deterministic_and_per_layer():
  _, cfg, state, layers = _setup(copies=1, alpha=0.0)
  seeds, labels = _seeds(4)
  probe = jax.jit(steps.make_probe_step(cfg, probe_copies=4))
  a = probe(state, seeds, labels, jax.random.key(0))
  b = probe(state, seeds, labels, jax.random.key(0))
  other = probe(state, seeds, (labels + 1) % 4, jax.random.key(0))
  assert set(a) == {f"{m}/{l}" for m in ("inv_loss", "inv_loss_same_class")
                    for l in layers}
  for k in a:
    assert 0.0 < float(a[k]) < 2.0 and float(a[k]) == float(b[k])
  for l in layers:  # the batch denominator reads no labels
    assert float(other[f"inv_loss/{l}"]) == float(a[f"inv_loss/{l}"])


@pytest.mark.parametrize("method", ["moments", "pairwise"])
def test_class_denominator_step_and_probe_divide_by_same_class_pairs(method):
  """With denominator "class", the step's loss is Eq. 4 with Eq. 3 over the pairs of
  the same class (the naive definition, recomputed here); the probe measures both
  denominators, a baseline's (M = 1) included."""
  _, cfg, state, layers = _setup(copies=2, alpha=0.2, method=method)
  cfg = dataclasses.replace(cfg, denominator="class")
  seeds, labels = _seeds(8, seed=3)
  key = jax.random.key(5)
  _, metrics = jax.jit(steps.make_train_step(cfg))(state, seeds, labels, key)

  @jax.jit
  def recompute(state):
    logits, feats, y, ids = _forward_again(state, cfg, seeds, labels, key)
    inv = jnp.stack([helpers.naive_invariance_loss(feats[l], ids, y) for l in layers])
    w = losses.layer_weights(len(layers), 0.2, 10.0)
    return 0.8 * losses.cross_entropy(logits, y) + jnp.sum(w * inv), inv

  expected, inv = recompute(state)
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
  for l, v in zip(layers, inv):
    assert float(metrics[f"inv_loss/{l}"]) == pytest.approx(float(v), rel=1e-5)

  # The probe logs both denominators, a baseline's (M = 1, batch) too.
  base = dataclasses.replace(cfg, copies=1, alpha=0.0, denominator="batch")
  got = jax.jit(steps.make_probe_step(base, probe_copies=4))(state, seeds, labels, key)
  x, y, ids = steps.expand_seeds(seeds, labels, 4)
  feats = steps.features(state, augment.augment(key, steps.to_float(x), cfg.ranges))
  for l in layers:
    ref = helpers.naive_invariance_loss(feats[l], ids, y)
    assert float(got[f"inv_loss_same_class/{l}"]) == pytest.approx(float(ref), rel=1e-4)
    ref = helpers.naive_invariance_loss(feats[l], ids)
    assert float(got[f"inv_loss/{l}"]) == pytest.approx(float(ref), rel=1e-4)


def test_alpha_schedule_is_eq4_with_alpha_scaled_from_each_boundary():
  """With alpha_steps=(2, 4) and alpha_decay=0.5, the steps done at step counts 1, 2
  and 4 are those of constant alpha 0.4, 0.2 and 0.1 (loss, parameters), and log the
  alpha they used; alpha_decay 0 leaves the cross-entropy's update alone."""
  _, cfg, state, _ = _setup(copies=4, alpha=0.4)
  seeds, labels = _seeds(4)
  key = jax.random.key(7)
  sched = dataclasses.replace(cfg, alpha_steps=(2, 4), alpha_decay=0.5)
  compiled = functools.lru_cache(maxsize=None)(
      lambda c: jax.jit(steps.make_train_step(c)))
  run = lambda c, s: compiled(c)(s, seeds, labels, key)
  assert "alpha" not in run(cfg, state)[1]
  for count, alpha in ((1, 0.4), (2, 0.2), (3, 0.2), (4, 0.1), (9, 0.1)):
    at = state.replace(step=jnp.asarray(count, state.step.dtype))
    got, m = run(sched, at)
    want, m_const = run(dataclasses.replace(cfg, alpha=alpha), at)
    assert float(m["alpha"]) == pytest.approx(alpha)
    assert float(m["loss"]) == pytest.approx(float(m_const["loss"]), rel=1e-6), count
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 got.params, want.params)
  off = dataclasses.replace(cfg, alpha_steps=(1,), alpha_decay=0.0)
  got, m = run(off, state.replace(step=jnp.asarray(1, state.step.dtype)))
  assert float(m["loss"]) == pytest.approx(float(m["cross_entropy"]), rel=1e-6)
  ce_only, _ = run(dataclasses.replace(cfg, alpha=0.0), state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got.params, ce_only.params)


def test_learning_rate_schedule_piecewise():
  lr = steps.create_learning_rate_fn(0.1, (2, 3), 0.2, steps_per_epoch=10)
  np.testing.assert_allclose([lr(0), lr(19), lr(20), lr(29), lr(30), lr(100)],
                             [0.1, 0.1, 0.02, 0.02, 0.004, 0.004], rtol=1e-6)


def test_half_precision_computes_in_bfloat16_and_keeps_float32_state():
  """bfloat16 activations; float32 parameters, batch-norm statistics and losses; the
  loss close to the float32 one."""
  seeds, labels = _seeds(4)
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    m = models.create("allcnn", 4, dtype=dtype, layers=helpers.TINY_LAYERS)
    cfg = steps.StepConfig(copies=4, alpha=0.3, alpha_ratio=10.0, loss_method="moments",
                           ranges=augment.AugmentRanges(), num_layers=3)
    state = steps.create_train_state(jax.random.key(0), m, SHAPE, optax.sgd(0.05))
    x = steps.to_float(seeds)
    _, inter = jax.jit(lambda s: steps.eval_logits(s, x, mutable=["intermediates"]))(state)
    assert all(v[0].dtype == dtype for v in inter["intermediates"].values())
    new, metrics = jax.jit(steps.make_train_step(cfg))(state, seeds, labels,
                                                       jax.random.key(1))
    for tree in (new.params, new.batch_stats):
      assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    out[dtype] = metrics
  for k, v in out[jnp.float32].items():
    assert float(out[jnp.bfloat16][k]) == pytest.approx(float(v), rel=0.05, abs=0.02), k


@pytest.mark.parametrize("method", ["moments", "pairwise"])
def test_class_invariance_term_is_eq3_over_classes(method):
  """With class_alpha, the loss adds sum_l beta_l L_inv_l(classes), recomputed here from
  the naive definition, and CE weighs 1 - alpha - class_alpha."""
  _, cfg, state, layers = _setup(copies=2, alpha=0.2, method=method)
  cfg = dataclasses.replace(cfg, class_alpha=0.3, weight_law="linear")
  seeds, labels = _seeds(8)
  key = jax.random.key(5)
  _, metrics = jax.jit(steps.make_train_step(cfg))(state, seeds, labels, key)

  @jax.jit
  def recompute(state):
    logits, feats, y, ids = _forward_again(state, cfg, seeds, labels, key)
    inv = jnp.stack([helpers.naive_invariance_loss(feats[l], ids) for l in layers])
    cls = jnp.stack([helpers.naive_invariance_loss(feats[l], y) for l in layers])
    w = losses.layer_weights(len(layers), 0.2, 10.0, "linear")
    b = losses.layer_weights(len(layers), 0.3, 10.0, "linear")
    return (0.5 * losses.cross_entropy(logits, y) + jnp.sum(w * inv) + jnp.sum(b * cls),
            cls)

  expected, cls = recompute(state)
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
  for l, v in zip(layers, cls):
    assert float(metrics[f"class_inv_loss/{l}"]) == pytest.approx(float(v), rel=1e-5)
    assert 0 < float(v) < 2



@pytest.mark.parametrize("platform", ["cpu", "gpu"])  # the kernels' layout in the loop
def test_a_loop_of_per_tensor_updates_equals_single_steps(platform, monkeypatch):
  """create_optimizer's per-tensor update (a model of many tensors), looped on one
  vector, = the same steps one by one on the tree."""
  monkeypatch.setattr(steps, "FLAT_UPDATE_MOST_TENSORS", 0)
  m, cfg, _, _ = _setup(copies=4, alpha=0.3, method="moments")
  tx = steps.create_optimizer(optax.constant_schedule(0.05))
  state = steps.create_train_state(jax.random.key(0), m, SHAPE, tx)
  assert len(jax.tree.leaves(state.opt_state)) > 2  # per tensor
  x, y = _seeds(8, seed=2)
  perms = jnp.stack([jnp.arange(8, dtype=jnp.int32)] * 2)
  key = jax.random.key(5)
  single = jax.jit(steps.make_train_step(cfg))
  expected = state
  for s in range(2):
    idx = seed_order.seed_indices(np.asarray(perms), 0, s, 1, 4)[0]
    expected, _ = single(expected, x[idx], y[idx], jax.random.fold_in(key, s))
  chunk = jax.jit(steps.make_train_chunk(cfg, 2, 4, unroll=False, platform=platform))
  got, _ = chunk(state, x, y, perms, 0, 0, key)
  assert jax.tree.structure(got.opt_state) == jax.tree.structure(expected.opt_state)
  for a, b in ((got.params, expected.params), (got.opt_state, expected.opt_state)):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)
