"""The fused batch norm (invjax/models/batch_norm.py) against flax's and a naive
definition: outputs, gradients, running statistics, variables; and how a config picks it."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invjax import build as build_lib
from invjax import config_lib
from invjax import errors
from invjax import models
from invjax import workdirs
from invjax.models import batch_norm
from tests import helpers


def _naive(x, scale, bias, eps=1e-5):
  """BN over every axis but the last, by its definition (two-pass variance)."""
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.mean((x - mean) ** 2, axes)
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias, mean, var


def _inputs(shape, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  c = shape[-1]
  x = (jax.random.normal(k[0], shape) * 3.0 + 1.5).astype(dtype)
  scale = jax.random.uniform(k[1], (c,), minval=0.5, maxval=2.0)
  bias = jax.random.normal(k[2], (c,))
  weights = jax.random.normal(k[3], shape)  # of the loss sum(weights * y)
  return x, scale, bias, weights


def _layer(kind, train, dtype):
  """ReLU(BN(x)) of `kind` wrapped in a module, so that its variables are those of one
  BatchNorm_0 as in the models."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return batch_norm.norm_relu(kind, train, dtype)(x)
  return Net()


def _train(kind, x, scale, bias, weights, dtype, stats=None):
  """(y, new batch_stats, d loss / d (x, scale, bias)) of one training-mode call."""
  net = _layer(kind, True, dtype)
  if stats is None:
    stats = {"BatchNorm_0": {"mean": jnp.zeros(x.shape[-1]),
                             "var": jnp.ones(x.shape[-1])}}

  def loss(x, scale, bias):
    params = {"BatchNorm_0": {"scale": scale, "bias": bias}}
    y, new = net.apply({"params": params, "batch_stats": stats}, x,
                       mutable=["batch_stats"])
    return jnp.sum(weights * y.astype(jnp.float32)), (y, new["batch_stats"])

  (_, (y, new)), grads = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
  return y, new, grads


@pytest.mark.parametrize("shape", [(16, 5, 5, 7), (24, 3), (6, 4, 4, 33)])
def test_fused_matches_flax_and_the_definition_in_float32(shape):
  x, scale, bias, w = _inputs(shape, jnp.float32)
  ours = _train("fused", x, scale, bias, w, jnp.float32)
  flax = _train("flax", x, scale, bias, w, jnp.float32)
  naive_y, mean, var = _naive(x, scale, bias)
  np.testing.assert_allclose(ours[0], jnp.maximum(naive_y, 0), atol=2e-5)
  np.testing.assert_allclose(ours[0], flax[0], atol=2e-6)
  # Running statistics: 0.9 old + 0.1 batch (biased variance), as flax's.
  np.testing.assert_allclose(ours[1]["BatchNorm_0"]["mean"], 0.1 * mean, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(ours[1]["BatchNorm_0"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               ours[1], flax[1])
  # Gradients: the written backward pass against autodiff of flax's and of the naive.
  naive_grads = jax.grad(lambda *a: jnp.sum(w * jnp.maximum(_naive(*a)[0], 0)),
                         argnums=(0, 1, 2))(x, scale, bias)
  for got, want in ((ours[2], flax[2]), (ours[2], naive_grads)):
    for g, h in zip(got, want):
      np.testing.assert_allclose(g, h, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(h))))


def test_fused_matches_flax_on_bfloat16_activations():
  x, scale, bias, w = _inputs((32, 6, 6, 16), jnp.bfloat16, seed=3)
  ours = _train("fused", x, scale, bias, w, jnp.bfloat16)
  flax = _train("flax", x, scale, bias, w, jnp.bfloat16)
  assert ours[0].dtype == flax[0].dtype == jnp.bfloat16
  ours_y, flax_y = (np.asarray(a, np.float32) for a in (ours[0], flax[0]))
  np.testing.assert_allclose(ours_y, flax_y, atol=1e-2, rtol=1e-2)  # bf16 rounding
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               ours[1], flax[1])
  assert ours[2][0].dtype == jnp.bfloat16
  for g, h in zip(ours[2], flax[2]):
    g, h = np.asarray(g, np.float32), np.asarray(h, np.float32)
    assert np.abs(g - h).max() <= 2e-2 * np.abs(h).max(), (np.abs(g - h).max(),
                                                           np.abs(h).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_evaluation_is_flax_arithmetic_exactly(dtype):
  x, scale, bias, _ = _inputs((8, 4, 4, 5), dtype, seed=1)
  variables = {"params": {"BatchNorm_0": {"scale": scale, "bias": bias}},
               "batch_stats": {"BatchNorm_0": {"mean": jnp.linspace(-1, 2, 5),
                                               "var": jnp.linspace(0.1, 3, 5)}}}
  ours = jax.jit(_layer("fused", False, dtype).apply)(variables, x)
  flax = jax.jit(_layer("flax", False, dtype).apply)(variables, x)
  assert ours.dtype == flax.dtype == dtype
  np.testing.assert_array_equal(np.asarray(ours, np.float32),
                                np.asarray(flax, np.float32))


@pytest.mark.parametrize("name,fields", [("allcnn", {"width": 0.25}),
                                         ("wrn", {"depth": 10, "widen": 1}),
                                         ("densenet", {"depth": 10, "growth": 4})])
def test_models_have_the_same_variables_with_either(name, fields):
  """A checkpoint or record of one loads into the other: same names, shapes, dtypes
  and initial values."""
  x = jnp.zeros((2, 32, 32, 3))
  init = {kind: jax.jit(models.create(name, 10, batch_norm_impl=kind, **fields).init)(
      jax.random.key(0), x) for kind in batch_norm.IMPLEMENTATIONS}
  assert (jax.tree.structure(init["flax"]) == jax.tree.structure(init["fused"]))
  jax.tree.map(np.testing.assert_array_equal, init["flax"], init["fused"])


def test_a_model_step_with_either_gives_the_same_loss_and_gradients():
  m = {kind: models.create("wrn", 10, depth=10, widen=1, batch_norm_impl=kind)
       for kind in batch_norm.IMPLEMENTATIONS}
  x = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3))
  labels = jnp.arange(8) % 10
  variables = m["flax"].init(jax.random.key(0), x)

  def loss(params, model):
    logits, new = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats", "intermediates"])
    ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])
    return ce, new["batch_stats"]

  out = {kind: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
      variables["params"], model) for kind, model in m.items()}
  (l1, s1), g1 = out["flax"]
  (l2, s2), g2 = out["fused"]
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               s1, s2)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale), g1, g2)


def test_auto_is_flax_on_a_cpu_and_fused_elsewhere():
  assert batch_norm.implementation("auto", "cpu") == "flax"
  assert batch_norm.implementation("auto", "gpu") == "fused"
  assert batch_norm.implementation("auto", "tpu") == "fused"
  assert batch_norm.implementation("fused", "cpu") == "fused"
  config = config_lib.base_config()
  assert build_lib.create_model(config, 10, "cpu").batch_norm == "flax"
  assert build_lib.create_model(config, 10, "gpu").batch_norm == "fused"
  config.batch_norm = "flax"
  assert build_lib.create_model(config, 10, "gpu").batch_norm == "flax"


def test_a_bad_choice_is_refused_naming_the_field():
  config = config_lib.base_config()
  config.batch_norm = "cudnn"
  with pytest.raises(errors.ConfigError, match=r"config\.batch_norm.*'auto'"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="batch norm 'cudnn'"):
    models.create("allcnn", 10, batch_norm_impl="cudnn")


def test_a_run_resumes_with_another_choice(tmp_path):
  config = config_lib.base_config()
  (tmp_path / workdirs.CONFIG_FILE).write_text(config.to_json_best_effort())
  config.batch_norm = "fused"
  config.gpu_compile = "graph"  # also a choice of speed, not of what is computed
  assert workdirs.config_diff(config, str(tmp_path)) == {}
  workdirs.check_config(config, str(tmp_path))  # no error


SPLIT_OVER_DEVICES = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tests import test_batch_norm as t
x, scale, bias, w = t._inputs((16, 3, 3, 5), jnp.float32, seed=7)
one = t._train("fused", x, scale, bias, w, jnp.float32)
mesh = jax.make_mesh((4,), ("data",))
split = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
many = t._train("fused", split(x), scale, bias, split(w), jnp.float32)
leaves = lambda r: [np.asarray(a).ravel().tolist() for a in jax.tree.leaves(r)]
print(json.dumps([jax.device_count(), len(many[0].sharding.device_set),
                  leaves(one), leaves(many)]))
"""


def test_the_fused_statistics_are_over_the_whole_batch_split_over_devices():
  """The batch split over 4 devices (one jit, as the data-parallel step runs): the
  same outputs, running statistics and gradients as on one device."""
  env = dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""),
                                             "--xla_force_host_platform_device_count=4"]))
  out = subprocess.run([sys.executable, "-c", SPLIT_OVER_DEVICES, helpers.ROOT],
                       capture_output=True, text=True, env=env, timeout=300,
                       cwd=helpers.ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  devices, used, one, many = json.loads(out.stdout.strip().splitlines()[-1])
  assert devices == 4 and used == 4
  assert len(one) == len(many) == 6  # y, mean, var, dx, dscale, dbias
  for a, b in zip(one, many):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_the_fused_layer_vmaps_as_several_runs_in_one_program():
  """benchmark's stacked runs vmap the step over train states: each run's batch norm
  is its own (statistics, running averages, gradients)."""
  net = _layer("fused", True, jnp.float32)
  xs = jax.random.normal(jax.random.key(4), (3, 8, 4, 4, 6)) * jnp.arange(1.0, 4.0)[
      :, None, None, None, None]
  params = {"BatchNorm_0": {"scale": jnp.ones(6), "bias": jnp.zeros(6)}}
  stats = {"BatchNorm_0": {"mean": jnp.zeros(6), "var": jnp.ones(6)}}

  def run(x):
    def loss(p):
      y, new = net.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y)), new
    (_, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return new, grads

  stacked = jax.jit(jax.vmap(run))(xs)
  for i in range(3):
    alone = jax.jit(run)(xs[i])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
                 stacked, alone)
