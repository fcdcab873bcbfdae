"""`--mode=describe`: parameters, sown layers, forward FLOPs and the config, no training."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from invjax import train


def forward_flops(model, image_shape) -> float:
  """Forward FLOPs of one image, from XLA's cost analysis of the eval-mode pass."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape),
                                                train=False))
  # lower() needs shapes only: no weights are initialised or computed.
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      variables, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def describe(config, data=None) -> dict:
  run = train.build(config, data)
  return {"model": config.model.name, "dataset": run.data.name,
          "input": run.data.image_shape, "num_classes": run.data.num_classes,
          "parameters": run.param_count, "sown_layers": run.layer_shapes,
          "forward_flops_per_image": forward_flops(run.model, run.data.image_shape),
          "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps}


def format_description(d: dict, config) -> str:
  flops = d["forward_flops_per_image"]
  lines = [f"model {d['model']} on {d['dataset']}: input {d['input']}, "
           f"{d['num_classes']} classes",
           f"parameters: {d['parameters']:,} ({d['parameters'] / 1e6:.3f} M)",
           f"forward FLOPs per image (XLA): {flops / 1e9:.3f} G "
           f"(= {flops / 2e9:.3f} GMAC)",
           f"training: {d['total_steps']} steps, {d['steps_per_epoch']} per epoch",
           f"sown layers ({len(d['sown_layers'])}):"]
  lines += [f"  {name:<12} {shape}" for name, shape in d["sown_layers"].items()]
  lines += ["configuration:", str(config)]
  return "\n".join(lines)
