"""The invariance loss alone: value and gradient over a model's sown activations.

  python -m experiments.loss_cost [--model=allcnn] [--width=0.25] [--batch_size=128]
  python -m experiments.loss_cost --width=1 --dtype=bfloat16 --repeats=0  # bytes only
  python -m experiments.loss_cost --width=1 --dtype=bfloat16 --target=h200  # a GPU's

Compiles L_inv (both methods, summed over the layers with Eq. 4's weights) for value and
gradient on random post-ReLU activations of the model's sown layers, with no network
around it, and prints per method:
  - XLA's cost analysis of that program: FLOPs and "bytes accessed", and the bytes
    accessed over the bytes of the activations it reads. Reading each activation once
    for the sums, then once more and writing its gradient once, is 3 x: the floor.
  - its time, median of --repeats calls (0: not timed): what the loss costs where the
    benchmark's step ratios (experiments/benchmark.py) cannot separate it from the
    noise of the step.

With --target (h100, h200: experiments/gpu_targets/) it compiles the program for that
GPU without one, as experiments/kernel_census.py does (JAX's CUDA plugin needed, not a
GPU), and prints the kernels of XLA:GPU's optimised program and the bytes they move,
counted from it (`hlo.kernel_bytes`: a deviceless compile has no cost analysis):
what XLA:GPU fuses, where XLA:CPU's bytes can mislead. For the one-read form at
bfloat16 (`--target=h200 --dtype=bfloat16`; All-CNN-C at `--width=1`, DenseNet-BC at
`--batch_size=64`) it counts 404, 1,358 and 209 MB for All-CNN-C, WRN-28-10 and
DenseNet-BC; the H200's own cost analysis gave 414 (of the code before b977db6), 1,358
and 209 MB.
"""

import math
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import hlo
from invjax import losses
from invjax import models

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flags (defined only when run as a script: benchmark.py imports this)."""
  flags.DEFINE_string("model", "allcnn", "Model name.")
  flags.DEFINE_float("width", 0.25, "Width multiplier (All-CNN).")
  flags.DEFINE_integer("batch_size", 128, "Images per step.")
  flags.DEFINE_integer("copies", 8, "M.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Dtype of the activations (bfloat16: config.half_precision).")
  flags.DEFINE_list("methods", list(losses.METHODS), "Loss methods.")
  flags.DEFINE_integer("repeats", 10, "Timed calls (0: compile and report costs only).")
  flags.DEFINE_integer("parts", 1, "Runs of seeds the one-read moments form merges "
                       "first (losses.moment_parts: 1 on one device).")
  flags.DEFINE_list("forms", list(losses.MOMENT_FORMS), "Forms of the moments method "
                    "(losses.MOMENT_FORMS).")
  flags.DEFINE_string("target", "", "Compile for this GPU without one (h100, h200) and "
                      "count its kernels and their bytes; '': run here.")


cost = common.cost_analysis


def loss_program(weights, copies: int, method: str, parts: int = 1,
                 form: str = "one_read"):
  """jit(value_and_grad) of sum_l w_l L_inv_l over a dict of activations, every layer's
  L_inv made at once as the train step makes them (`losses.grouped_invariance_losses`)."""
  def total(fs):
    return jnp.sum(weights * jnp.stack(list(
        losses.grouped_invariance_losses(fs, copies, method, parts, form).values())))
  return jax.jit(jax.value_and_grad(total))


def main(argv):
  del argv
  # First, before anything starts JAX's backends (the CUDA plugin's, here without CUDA).
  placement = hlo.gpu_placement(FLAGS.target) if FLAGS.target else None
  for m in FLAGS.methods:
    if m not in losses.METHODS:
      raise app.UsageError(f"--methods: {m!r} is unknown; valid: {list(losses.METHODS)}.")
  for f in FLAGS.forms:
    if f not in losses.MOMENT_FORMS:
      raise app.UsageError(f"--forms: {f!r} is unknown; valid: {list(losses.MOMENT_FORMS)}.")
  fields = {"width": FLAGS.width} if FLAGS.model == "allcnn" else {}
  model = models.create(FLAGS.model, 10, **fields)
  shapes = models.layer_shapes(model, (32, 32, 3))
  rng = np.random.default_rng(0)
  dtype = jnp.dtype(FLAGS.dtype)
  if placement:  # compiled only: shapes, no values
    feats = {k: jax.ShapeDtypeStruct((FLAGS.batch_size, *s), dtype,
                                     sharding=placement.replicated)
             for k, s in shapes.items()}
    device = f"{FLAGS.target} (compiled without one)"
  else:
    feats = {k: jnp.asarray(np.maximum(rng.normal(size=(FLAGS.batch_size, *s)), 0),
                            dtype) for k, s in shapes.items()}
    device = jax.devices()[0].device_kind
  weights = losses.layer_weights(len(shapes), 0.1, 10.0)
  nbytes = sum(math.prod(v.shape) for v in feats.values()) * dtype.itemsize
  seeds = FLAGS.batch_size // FLAGS.copies
  width = f" (width {FLAGS.width:g})" if FLAGS.model == "allcnn" else ""
  print(f"{FLAGS.model}{width}, batch {FLAGS.batch_size} = "
        f"{seeds} x {FLAGS.copies}, {FLAGS.dtype}: "
        f"{len(shapes)} sown layers, {nbytes / 1e6:.1f} MB of activations; "
        f"{device}, JAX {jax.__version__}")
  programs = []
  for method in FLAGS.methods:
    if method == "moments":
      programs += [(f"moments, {form.replace('_', ' ')}"
                    + (f" ({FLAGS.parts} part{'s' if FLAGS.parts > 1 else ''})"
                       if form == "one_read" else ""),
                    method, form) for form in FLAGS.forms]
    else:
      programs.append((method, method, "one_read"))
  for name, method, form in programs:
    compiled = loss_program(weights, FLAGS.copies, method, FLAGS.parts, form).lower(
        feats).compile()
    if placement:
      counted = hlo.census(compiled.as_text())
      print(f"{name}: value and gradient: {counted['kernels']} kernels, moving "
            f"{counted['bytes'] / 1e6:,.1f} MB = {counted['bytes'] / nbytes:.2f} x the "
            "activations (counted in XLA:GPU's optimised program)", flush=True)
      continue
    c = cost(compiled)
    accessed = float(c.get("bytes accessed", float("nan")))
    line = (f"{name}: value and gradient: XLA bytes accessed {accessed / 1e6:,.1f} MB "
            f"= {accessed / nbytes:.2f} x the activations; "
            f"{float(c.get('flops', float('nan'))) / 1e9:.3f} GFLOP")
    if FLAGS.repeats:
      jax.block_until_ready(compiled(feats))
      times = []
      for _ in range(FLAGS.repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(feats))
        times.append(time.perf_counter() - t)
      line += f"; {1e3 * np.median(times):.1f} ms (median of {FLAGS.repeats})"
    print(line, flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
