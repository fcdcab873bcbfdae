"""Every config field is checked for its type and domain before anything compiles.

One row per field: values that must be refused and values that must pass. The test
fails for a field of `config_lib.base_config()` (or of a model) that has no row here,
so a new field gets its checks and its row together (one line each, here and in
`config_lib.FIELDS`).
"""

import dataclasses
import math

import pytest

from invjax import config_lib
from invjax import errors
from invjax import models
from invjax import train
from tests import helpers

NAN, INF = math.nan, math.inf

# field: ([refused values], [accepted values])
ROWS = {
    "model.name": (["vgg", "", 3], ["allcnn"]),
    "model.width": ([0.0, -1.0, NAN, INF, "1"], [0.125, 2]),
    "model.layers": (["imagenet", (), ((8, 3, 1, "FULL"),), ((0, 3, 1, "SAME"),),
                      ((8, 3, 1),)], ["cifar", ((8, 3, 1, "same"), (4, 3, 2, "VALID"))]),
    "model.depth": ([0, -4, 28.0, True], [28, 10]),
    "model.widen": ([0, 1.5], [1, 10]),
    "model.strides": ([(1, 2), (1, 0, 2), "122"], [(1, 2, 2)]),
    "model.growth": ([0, 12.0], [12]),
    "model.compression": ([0.0, 1.5, NAN], [0.5, 1.0]),
    "model.num_blocks": ([0], [3]),
    "model.widen_bottlenecks": ([1, "True"], [True, False]),
    "model.kernel_init": (["glorot", "", 0], ["he_normal", "glorot_uniform"]),
    "dataset": (["", "  ", 5], ["digits", "cifar10", "/data/x.npz"]),
    "data_dir": ([None, 1], ["", "/data"]),
    "manual_dir": ([None], ["", "/data/manual"]),
    "test_split": (["", None], ["test", "validation"]),
    "image_shape": ([(32, 32), (32, 32, 0), (32.0, 32, 3), "32x32"], [(), (16, 16, 3)]),
    "num_classes": ([-1, 1, 10.0], [0, 2, 200]),
    "train_examples": ([-1, 1.5], [0, 100]),
    "test_examples": ([-5, NAN], [0, 10]),
    "variant": (["strong", 1], ["invariance", "baseline", "batchaug"]),
    "batch_size": ([0, -8, 64.0, True], [8, 128]),
    "copies": ([0, 2.0], [1, 8]),
    "alpha": ([1.0, -0.1, NAN, INF], [0.0, 0.1, 0.99]),
    "invariance_copies": ([0], [1, 8]),
    "invariance_alpha": ([1.0, -1.0, NAN], [0.0, 0.6]),
    "alpha_ratio": ([0.0, -10.0, INF], [1.0, 10.0]),
    "layer_weight_law": (["cubic", "", 1], ["exponential", "linear", "uniform", "decay"]),
    "class_alpha": ([1.0, -0.1, NAN], [0.0, 0.3]),
    "invariance_denominator": (["seed", "", 1], ["batch", "class"]),
    "loss_method": (["cosine", ""], ["moments", "pairwise"]),
    "num_epochs": ([0.0, -1.0, NAN, INF], [0.5, 350.0]),
    "learning_rate": ([0.0, -0.01, NAN, INF, "0.1"], [1e-4, 0.05, 1e6]),
    "lr_boundaries": ([(0,), (3, 2), (1, NAN), "1,2"], [(), (1,), (0.5, 1.5)]),
    "lr_decay": ([0.0, 1.5, -0.1, NAN], [0.1, 1.0]),
    "alpha_boundaries": ([(0,), (3, 2), (1, NAN), "1,2"], [(), (1,), (0.5, 1.5)]),
    "alpha_decay": ([-0.1, NAN, INF, "0.1"], [0.0, 0.2, 1.0, 5.0]),
    "momentum": ([1.0, -0.1, NAN], [0.0, 0.9]),
    "nesterov": ([1, "yes"], [True, False]),
    "augment.flip": ([1.5, -0.5, NAN], [0.0, 0.5, 1.0]),
    "augment.translate": ([-0.1, 1.5, INF], [0.0, 0.1]),
    "augment.scale": ([1.0, -0.1], [0.0, 0.15]),
    "augment.rotation": ([-1.0, 200.0, NAN], [0.0, 22.5]),
    "augment.shear": ([-0.1, 2.0], [0.0, 0.15]),
    "augment.contrast": ([1.5, -0.5], [0.0, 0.5]),
    "augment.brightness": ([2.0, -0.25], [0.0, 0.25]),
    "augment.cutout": ([1.5, -0.1, NAN], [0.0, 0.5, 1.0]),
    "augment_preset": (["strong", ""], ["heavier", "light", "cutout"]),
    "half_precision": ([0, "False"], [True, False]),
    "batch_norm": (["cudnn", 1], ["auto", "flax", "fused"]),
    "gpu_compile": (["cudagraph", "", 1], ["xla", "graph"]),
    "seed": ([-1, 0.5, 2**32], [0, 12345, 2**32 - 1]),
    "data_on_device": ([1], [True, False]),
    "steps_per_dispatch": ([-1, 2.0], [0, 1, 8]),
    "log_every_steps": ([0, -1], [1, 50]),
    "eval_every_epochs": ([0.0, -1.0, INF], [0.5, 5.0]),
    "checkpoint_every_steps": ([-1, 1.5], [0, 100]),
    "keep_checkpoints": ([-1, 2.5], [0, 3]),
    "eval_batch_size": ([0], [1, 500]),
    "probe_seeds": ([1, 0], [2, 16]),
    "probe_copies": ([1], [2, 8]),
    "analysis.num_transforms": ([0], [1, 5]),
    "analysis.batch_size": ([0, -1], [1, 500]),
    "analysis.seed": ([-1, 1.5, 2**63], [0, 1, 2**32 - 1]),
    "divergence_factor": ([-1.0, 1.0, NAN, INF], [0.0, 2.0, 10.0]),
    "stop_dead_network": ([1, "no"], [True, False]),
    "time_limit_minutes": ([-1.0, NAN, INF, "10", True], [0.0, 0.5, 55]),
}


def _model_fields():
  out = set()
  for name in models.names():
    cls = models._REGISTRY[name]  # pylint: disable=protected-access
    out |= {f"model.{f.name}" for f in dataclasses.fields(cls)
            if f.name not in models.NOT_CONFIG_FIELDS}
  return out


def _config_for(field):
  """A valid config holding `field` (a model field under its model)."""
  c = helpers.tiny_config("digits")
  if field.startswith("model.") and field not in ("model.name", "model.width",
                                                  "model.layers"):
    for name in models.names():
      cls = models._REGISTRY[name]  # pylint: disable=protected-access
      if field[6:] in {f.name for f in dataclasses.fields(cls)}:
        with c.unlocked():
          c.model = {"name": name}
        break
  return c


def _set(c, field, value):
  with c.unlocked():
    node, leaf = config_lib.field_parent(c, field)
    if leaf in node:
      del node[leaf]
    node[leaf] = value


def test_every_field_is_checked_by_type_and_domain():
  fields = set(config_lib.flat_fields(config_lib.base_config())) | _model_fields()
  missing = sorted(fields - set(ROWS))
  assert not missing, f"fields without a row in ROWS: {missing}"
  assert not sorted(fields - set(config_lib.FIELDS)), "fields without a rule"
  for field, (bad, good) in ROWS.items():
    for value in good:
      c = _config_for(field)
      _set(c, field, value)
      if field in ("lr_boundaries", "alpha_boundaries"):
        c.num_epochs = 2.0
      assert not [e for e in config_lib.check_fields(c) if f"config.{field}=" in e], \
          (field, value)
    for value in bad:
      c = _config_for(field)
      _set(c, field, value)
      with pytest.raises(errors.ConfigError) as e:
        config_lib.validate(c)
      shown = repr(tuple(value)) if isinstance(value, list) else repr(value)
      assert f"config.{field}={shown} must be " in str(e.value), (field, value, e.value)
      assert len(str(e.value).splitlines()) == 2  # the heading and this field


def test_an_unknown_field_is_refused_listing_the_valid_ones():
  c = helpers.tiny_config("digits")
  _set(c, "augment.hue", 0.1)
  with pytest.raises(errors.ConfigError, match=r"config.augment.hue is not a field.*"
                     r"flip, translate, scale"):
    config_lib.validate(c)


def test_a_refused_value_is_never_written_to_the_workdir(tmp_path):
  c = helpers.tiny_config("digits", learning_rate=NAN)
  with pytest.raises(errors.ConfigError, match="learning_rate=nan"):
    train.train_and_evaluate(c, str(tmp_path / "run"), tensorboard=False)
  assert not (tmp_path / "run").exists()
