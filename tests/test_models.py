"""Models: published sizes, sown layers (names, shapes, depth order), the registry."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invjax import models
from invjax.models import allcnn
from invjax.models import layers


def test_allcnn_c_parameter_count_matches_published():
  m = models.create("allcnn", num_classes=10)
  n = models.param_count(m, (32, 32, 3))
  assert abs(n - 1.37e6) / 1.37e6 < 0.02, n


def test_allcnn_sown_layers_names_and_shapes():
  m = models.create("allcnn", num_classes=10)
  shapes = models.layer_shapes(m, (32, 32, 3))
  assert shapes == {
      "conv1": (32, 32, 96), "conv2": (32, 32, 96), "conv3": (16, 16, 96),
      "conv4": (16, 16, 192), "conv5": (16, 16, 192), "conv6": (8, 8, 192),
      "conv7": (6, 6, 192), "conv8": (6, 6, 192), "conv9": (6, 6, 10)}


def test_sown_activations_are_post_relu_and_logits_pool_the_last():
  m = models.create("allcnn", num_classes=10, width=0.125)
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
  v = jax.jit(lambda: m.init(jax.random.key(1), x, train=False))()
  logits, st = jax.jit(lambda v: m.apply(v, x, train=False,
                                         mutable=["intermediates"]))(v)
  feats = models.sown(st["intermediates"])
  assert all(float(jnp.min(f)) >= 0.0 for f in feats.values())
  np.testing.assert_allclose(logits, jnp.mean(feats["conv9"], axis=(1, 2)), rtol=1e-6)


def test_depth_order_survives_more_than_nine_layers():
  """"conv10" sorts before "conv2"; layer_shapes must keep the sow order."""
  layers = allcnn.CIFAR_LAYERS + ((8, 1, 1, "VALID"), (8, 1, 1, "VALID"))
  m = models.create("allcnn", num_classes=3, width=0.125, layers=layers)
  names = list(models.layer_shapes(m, (32, 32, 3)))
  assert names == [f"conv{i}" for i in range(1, 12)]


def test_width_scales_hidden_channels_only():
  m = models.create("allcnn", num_classes=7, width=0.25)
  shapes = models.layer_shapes(m, (32, 32, 3))
  assert shapes["conv1"][-1] == 24 and shapes["conv4"][-1] == 48
  assert shapes["conv9"][-1] == 7


def test_registry_errors_name_the_field():
  with pytest.raises(ValueError, match="config.model.name='resnet'.*allcnn"):
    models.create("resnet", 10)
  with pytest.raises(ValueError, match="depth"):
    models.create("allcnn", 10, depth=3)


@pytest.mark.parametrize("name,published", [("wrn", 36.5e6), ("densenet", 0.77e6)])
def test_parameter_counts_match_published(name, published):
  n = models.param_count(models.create(name, num_classes=10), (32, 32, 3))
  assert abs(n - published) / published < 0.02, n


def test_wrn_28_10_sows_its_12_residual_blocks():
  shapes = models.layer_shapes(models.create("wrn", num_classes=10), (32, 32, 3))
  widths = [160] * 4 + [320] * 4 + [640] * 4
  sizes = [32] * 4 + [16] * 4 + [8] * 4
  assert shapes == {f"block{i + 1}": (s, s, w)
                    for i, (s, w) in enumerate(zip(sizes, widths))}


def test_densenet_bc_sows_stem_and_dense_blocks():
  shapes = models.layer_shapes(models.create("densenet", num_classes=10), (32, 32, 3))
  # 24 stem channels; each block adds 16 x 12; transitions halve the channels.
  assert shapes == {"stem": (32, 32, 24), "dense1": (32, 32, 216),
                    "dense2": (16, 16, 300), "dense3": (8, 8, 342)}


@pytest.mark.parametrize("strides,padding,dtype", [
    ((1, 1), "SAME", jnp.float32), ((2, 2), "VALID", jnp.float32),
    ((2, 2), "SAME", jnp.bfloat16)])
def test_conv_is_flax_conv_without_bias(strides, padding, dtype):
  """layers.Conv: flax.linen.Conv's parameter (name, shape, value from the same key)
  and its output, bit for bit, without tracing the initialiser at every apply."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 5))
  ours = layers.Conv(7, (3, 3), strides=strides, padding=padding, dtype=dtype)
  flax_conv = nn.Conv(7, (3, 3), strides=strides, padding=padding, use_bias=False,
                      dtype=dtype, kernel_init=nn.initializers.he_normal())
  v_ours, v_flax = ours.init(jax.random.PRNGKey(1), x), flax_conv.init(
      jax.random.PRNGKey(1), x)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
  np.testing.assert_array_equal(v_ours["params"]["kernel"], v_flax["params"]["kernel"])
  np.testing.assert_array_equal(ours.apply(v_flax, x), flax_conv.apply(v_flax, x))
  traced = []
  def counting_init(key, shape, dtype):
    traced.append(shape)
    return nn.initializers.he_normal()(key, shape, dtype)
  counted = layers.Conv(7, (3, 3), kernel_init=counting_init)
  variables = counted.init(jax.random.PRNGKey(1), x)
  jax.jit(counted.apply)(variables, x)
  assert len(traced) == 1  # at init only
  wrong = {"params": {"kernel": jnp.zeros((3, 3, 4, 7))}}
  with pytest.raises(ValueError, match=r"kernel has shape \(3, 3, 4, 7\) where the "
                     r"model makes \(3, 3, 5, 7\)"):
    ours.apply(wrong, x)


@pytest.mark.parametrize("batch_norm", ["flax", "fused"])
def test_densenet_widened_bottlenecks_are_the_same_function(batch_norm):
  """Padding the bottlenecks' inputs and kernels with zero channels to the block's
  width changes no parameter and, in float32, neither the logits, the sown layers,
  the batch statistics nor the gradients beyond rounding."""
  kw = dict(num_classes=10, depth=16, growth=6, batch_norm_impl=batch_norm)
  plain = models.create("densenet", **kw)
  wide = models.create("densenet", widen_bottlenecks=True, **kw)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3))
  # Inits and gradients jitted, offsets drawn by NumPy: op by op, this test took
  # 24-28 s of a 2-core suite.
  init = lambda model: jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(1), x)
  variables, wide_variables = init(plain), init(wide)
  # The same tree, shapes and (the same key) values: checkpoints load either way.
  assert jax.tree.structure(variables) == jax.tree.structure(wide_variables)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(wide_variables)):
    np.testing.assert_array_equal(a, b)
  convs = sorted(k for k in variables["params"] if k.startswith("Conv_"))
  assert convs == sorted(f"Conv_{i}" for i in range(len(convs)))  # flax's own names
  # Non-zero batch-norm offsets, so a padded channel that leaked through a ReLU shows.
  rng = np.random.default_rng(2)
  variables = jax.tree.map(lambda v: v + 0.1 * rng.normal(size=v.shape).astype(v.dtype),
                           variables)

  def run(model, params):
    logits, state = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats", "intermediates"])
    return jnp.sum(logits * jnp.arange(10.0)), (logits, state)

  outs = {}
  for name, model in (("plain", plain), ("wide", wide)):
    outs[name] = jax.jit(jax.grad(functools.partial(run, model), has_aux=True))(
        variables["params"])
  (g0, (l0, s0)), (g1, (l1, s1)) = outs["plain"], outs["wide"]
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  evaluate = lambda model: jax.jit(functools.partial(model.apply, train=False))
  np.testing.assert_allclose(evaluate(wide)(variables, x), evaluate(plain)(variables, x),
                             rtol=1e-5, atol=1e-5)  # and with the running averages
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,depth", [("wrn", 27), ("densenet", 99)])
def test_depth_that_does_not_fit_is_refused(name, depth):
  with pytest.raises(ValueError, match="config.model.depth"):
    models.layer_shapes(models.create(name, num_classes=10, depth=depth), (32, 32, 3))


# ---------------------------------------------------------------------------
# Tiny ImageNet variants
# ---------------------------------------------------------------------------

def test_allcnn_tinyimagenet_has_three_more_layers_and_a_stride_2_first_conv():
  m = models.create("allcnn", num_classes=200, layers="tinyimagenet")
  shapes = models.layer_shapes(m, (64, 64, 3))
  assert shapes == {
      "conv1": (32, 32, 96), "conv2": (32, 32, 96), "conv3": (16, 16, 96),
      "conv4": (16, 16, 256), "conv5": (16, 16, 256), "conv6": (8, 8, 256),
      "conv7": (8, 8, 384), "conv8": (8, 8, 384), "conv9": (4, 4, 384),
      "conv10": (4, 4, 1024), "conv11": (4, 4, 1024), "conv12": (4, 4, 200)}
  assert len(shapes) == len(models.layer_shapes(
      models.create("allcnn", num_classes=200), (64, 64, 3))) + 3


def _allcnn_params_by_hand(layers, in_channels, num_classes):
  """Convolution kernels (no bias) plus batch norm's scale and offset, per layer."""
  total, c_in = 0, in_channels
  for features, kernel, _, _ in list(layers) + [(num_classes, 1, 1, "VALID")]:
    total += kernel * kernel * c_in * features + 2 * features
    c_in = features
  return total


def test_allcnn_tinyimagenet_parameter_count_is_its_layers():
  m = models.create("allcnn", num_classes=200, layers="tinyimagenet")
  expected = _allcnn_params_by_hand(allcnn.LAYER_SETS["tinyimagenet"], 3, 200)
  assert models.param_count(m, (64, 64, 3)) == expected == 8_557_296


def test_wrn_on_64x64_images_keeps_its_blocks_at_four_times_the_area():
  shapes = models.layer_shapes(models.create("wrn", num_classes=200), (64, 64, 3))
  assert [shapes[f"block{i}"] for i in (1, 5, 9, 12)] == [
      (64, 64, 160), (32, 32, 320), (16, 16, 640), (16, 16, 640)]
  n = models.param_count(models.create("wrn", num_classes=200), (64, 64, 3))
  n10 = models.param_count(models.create("wrn", num_classes=10), (32, 32, 3))
  assert n - n10 == 190 * (640 + 1)  # only the classifier grows


def test_unknown_layer_set_and_bad_layer_entries_are_refused():
  with pytest.raises(ValueError, match=r"config.model.layers='imagenet'.*\['cifar', "
                     r"'cifar_authors', 'tinyimagenet'\]"):
    models.layer_shapes(models.create("allcnn", 10, layers="imagenet"), (32, 32, 3))
  with pytest.raises(ValueError, match="config.model.layers has the entry"):
    models.layer_shapes(models.create("allcnn", 10, layers=((8, 3, 1, "FULL"),)),
                        (32, 32, 3))


# ---------------------------------------------------------------------------
# Forward cost (describe)
# ---------------------------------------------------------------------------

def _conv_macs_by_hand(layers, size, in_channels, num_classes):
  """Every tap of every convolution: out_h * out_w * out_c * k * k * in_c."""
  total, c_in = 0, in_channels
  for features, kernel, stride, padding in list(layers) + [(num_classes, 1, 1, "VALID")]:
    size = -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1
    total += size * size * features * kernel * kernel * c_in
    c_in = features
  return total


@pytest.mark.parametrize("layers,size,classes", [
    ("cifar", 32, 10), ("tinyimagenet", 64, 200), (((5, 3, 2, "VALID"),), 9, 3)])
def test_dense_macs_counts_every_convolution_tap(layers, size, classes):
  from invjax import describe  # pylint: disable=g-import-not-at-top
  m = models.create("allcnn", num_classes=classes, layers=layers)
  spec = allcnn.layer_specs(layers)
  assert describe.dense_macs(m, (size, size, 3)) == _conv_macs_by_hand(
      spec, size, 3, classes)


# FACTS.md: forward cost per 32x32 image, GMAC.
PUBLISHED_GMAC = {"allcnn": 0.27, "wrn": 5.25, "densenet": 0.29}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMAC))
def test_forward_cost_agrees_with_published(name):
  from invjax import describe  # pylint: disable=g-import-not-at-top
  m = models.create(name, num_classes=10)
  published = PUBLISHED_GMAC[name] * 1e9
  dense = describe.dense_macs(m, (32, 32, 3))
  assert abs(dense - published) / published < 0.02, dense
  xla = describe.forward_flops(m, (32, 32, 3)) / 2  # XLA's cost analysis, FLOPs
  assert abs(xla - published) / published < 0.10, xla


def test_allcnn_authors_variants_glorot_uniform_and_conv7_same():
  """The authors' Keras All-CNN-C, one field each: Glorot-uniform kernels (bounded by
  sqrt(6 / (fan_in + fan_out)), variance a third of its square) and conv7 padded SAME,
  which keeps conv7-conv9 at 8x8; the same parameter shapes."""
  x = jnp.zeros((1, 32, 32, 3))
  he = allcnn.AllCNN(num_classes=10).init(jax.random.key(0), x)["params"]
  gl = allcnn.AllCNN(num_classes=10, kernel_init="glorot_uniform").init(
      jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, he) == jax.tree.map(jnp.shape, gl)
  k = np.asarray(gl["Conv_1"]["kernel"])  # 3x3, 96 -> 96
  limit = np.sqrt(6.0 / (9 * 96 + 9 * 96))
  assert np.abs(k).max() <= limit and np.var(k) == pytest.approx(limit**2 / 3, rel=0.05)
  assert np.var(np.asarray(he["Conv_1"]["kernel"])) == pytest.approx(
      2.0 / (9 * 96), rel=0.05)  # He-normal, the default
  shapes = models.layer_shapes(allcnn.AllCNN(num_classes=10, layers="cifar_authors"),
                               (32, 32, 3))
  assert [shapes[f"conv{i}"] for i in (6, 7, 8, 9)] == [
      (8, 8, 192), (8, 8, 192), (8, 8, 192), (8, 8, 10)]
