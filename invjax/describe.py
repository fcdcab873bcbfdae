"""`--mode=describe`: parameters, sown layers, forward FLOPs and the config, no training.

When the config declares its data's `image_shape` and `num_classes` (the paper's configs
do), the model is described from those alone and no data are loaded; otherwise the data
are loaded to learn them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from invjax import build as build_lib
from invjax import config_lib
from invjax import models


def _forward_shapes(model, image_shape):
  """(variables, one image) as shapes only: nothing is initialised or computed."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape),
                                                train=False))
  return variables, x


def forward_flops(model, image_shape) -> float:
  """Forward FLOPs of one image, from XLA's cost analysis of the eval-mode pass."""
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      *_forward_shapes(model, image_shape)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def describe(config, data=None) -> dict:
  shape, classes = tuple(config.image_shape), config.num_classes
  if data is None and shape and classes:  # declared: no data needed
    config_lib.validate(config, jax.device_count())
    model = build_lib.create_model(config, classes)
    shapes = models.shapes(model, shape)
    d = {"dataset": f"{config.dataset} (declared, not loaded)",
         "parameters": shapes.params, "sown_layers": shapes.layers}
  else:  # learn the shape from the data (build validates and traces the model)
    run = build_lib.build(config, data)
    model, shape, classes = run.model, run.data.image_shape, run.data.num_classes
    d = {"dataset": run.data.name, "parameters": run.param_count,
         "sown_layers": run.layer_shapes, "steps_per_epoch": run.steps_per_epoch,
         "total_steps": run.total_steps}
  return {"model": config.model.name, "input": tuple(shape), "num_classes": classes,
          "forward_flops_per_image": forward_flops(model, shape),
          "forward_macs_per_image": dense_macs(model, shape), **d}


def format_description(d: dict, config) -> str:
  flops = d["forward_flops_per_image"]
  if "total_steps" in d:
    training = (f"training: {d['total_steps']} steps, {d['steps_per_epoch']} per epoch "
                f"of batch {config.batch_size}")
  else:
    training = (f"training: {config.num_epochs:g} epochs of batch {config.batch_size} "
                f"({config.batch_size // config.copies} seeds x {config.copies} copies)")
  lines = [f"model {d['model']} on {d['dataset']}: input {d['input']}, "
           f"{d['num_classes']} classes",
           f"parameters: {d['parameters']:,} ({d['parameters'] / 1e6:.3f} M)",
           f"forward FLOPs per image (XLA): {flops / 1e9:.3f} G "
           f"(= {flops / 2e9:.3f} GMAC; taps on zero padding not counted)",
           f"forward MACs per image (every tap, as papers count): "
           f"{d['forward_macs_per_image'] / 1e9:.3f} G",
           training,
           f"sown layers ({len(d['sown_layers'])}):"]
  lines += [f"  {name:<12} {shape}" for name, shape in d["sown_layers"].items()]
  lines += ["configuration:", str(config)]
  return "\n".join(lines)


def _eqns(jaxpr):
  """Every equation of a jaxpr, descending into the jaxprs nested in its equations."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def dense_macs(model, image_shape) -> float:
  """Multiply-accumulates of one image's forward pass, every kernel tap counted.

  This is how papers count a network's cost (and how FACTS.md's figures are counted):
  output elements x kernel taps x input channels per group, for each convolution, plus
  the matrix products. XLA's cost analysis instead leaves out the taps that fall on
  zero padding, so it reports less, the more so the smaller the feature maps.
  """
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
      *_forward_shapes(model, image_shape))
  total = 0.0
  for eqn in _eqns(closed.jaxpr):
    if eqn.primitive.name == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial) positions
      taps = math.prod(rhs[d] for d in spec[2:])
      total += math.prod(out) * taps * rhs[spec[1]]  # rhs "in" is already per group
    elif eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
  return float(total)
