"""The model registry: a config names a model, and nothing else branches on the name.

A model is a flax.linen Module constructed as `cls(num_classes=..., dtype=..., **fields)`
whose `__call__(x, train)` takes images [B, H, W, C] in [0, 1] and returns logits
[B, num_classes], sowing the layers of the invariance loss and score, in depth order,
into the `intermediates` collection. Adding an architecture is one module here plus one
line in `_REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from invjax.models import allcnn
from invjax.models import batch_norm
from invjax.models import densenet
from invjax.models import wrn

_REGISTRY: dict[str, type[nn.Module]] = {
    "allcnn": allcnn.AllCNN,
    "densenet": densenet.DenseNetBC,
    "wrn": wrn.WideResNet,
}


# Model fields set by `create`'s arguments (from config.half_precision and
# config.batch_norm), not by config.model.
NOT_CONFIG_FIELDS = frozenset({"parent", "name", "num_classes", "dtype", "batch_norm"})


def names() -> list[str]:
  return sorted(_REGISTRY)


def field_defaults(name: str) -> dict[str, Any]:
  """{field: default} of the config fields (config.model.<field>) model `name` takes
  and has a default for: what a config that leaves one out gets."""
  if name not in _REGISTRY:
    return {}
  return {f.name: f.default for f in dataclasses.fields(_REGISTRY[name])
          if f.name not in NOT_CONFIG_FIELDS and f.default is not dataclasses.MISSING}


def create(name: str, num_classes: int, dtype: Any = jnp.float32,
           batch_norm_impl: str = "flax", **fields) -> nn.Module:
  """Builds model `name` with the given fields (e.g. `width`), its batch norm of
  implementation `batch_norm_impl` (batch_norm.IMPLEMENTATIONS)."""
  if name not in _REGISTRY:
    raise ValueError(f"config.model.name={name!r} is not a known model; "
                     f"valid names are {names()}.")
  cls = _REGISTRY[name]
  valid = {f.name for f in dataclasses.fields(cls)} - NOT_CONFIG_FIELDS
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(f"config.model has field(s) {unknown} that model {name!r} does "
                     f"not take; its fields are {sorted(valid)}.")
  if batch_norm_impl not in batch_norm.IMPLEMENTATIONS:
    raise ValueError(f"batch norm {batch_norm_impl!r} is not one of "
                     f"{list(batch_norm.IMPLEMENTATIONS)}.")
  return cls(num_classes=num_classes, dtype=dtype, batch_norm=batch_norm_impl, **fields)


def sown(intermediates) -> dict[str, Any]:
  """{layer name: activations} from a model's `intermediates` collection, in order.

  The order is the order of the `sow` calls (depth order) only while tracing: a dict
  that comes out of jit or eval_shape has its keys sorted ("conv10" before "conv2").
  Use `layer_shapes` for the depth order outside a trace.
  """
  return {k: v[0] if isinstance(v, tuple) else v for k, v in intermediates.items()}


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What a run needs to know of a model before anything compiles."""
  layers: dict[str, tuple[int, ...]]  # sown layer: per-example activation shape
  params: int  # number of parameters


def shapes(model: nn.Module, image_shape) -> Shapes:
  """The sown layers' shapes, in depth order, and the parameter count, from one
  abstract trace of `model.init` (whose forward pass sows the same layers as
  `apply(..., train=False)`). Compiles nothing."""
  order: list[str] = []

  def trace():
    variables = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False,
                           mutable=True)  # init leaves intermediates out by default
    order.extend(sown(variables["intermediates"]))  # recorded in sow order
    return variables

  variables = jax.eval_shape(trace)
  feats = sown(variables["intermediates"])
  return Shapes({k: tuple(feats[k].shape[1:]) for k in order},
                sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"])))


def layer_shapes(model: nn.Module, image_shape) -> dict[str, tuple[int, ...]]:
  """{sown layer: per-example activation shape}, in depth order. Compiles nothing."""
  return shapes(model, image_shape).layers


def param_count(model: nn.Module, image_shape) -> int:
  return shapes(model, image_shape).params
