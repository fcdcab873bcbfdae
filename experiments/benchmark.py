"""Speed of the invariance loss, the augmentation and the analysis, side by side.

  python -m experiments.benchmark                       # every architecture
  python -m experiments.benchmark --models=allcnn --size=paper --precision=bfloat16
  python -m experiments.benchmark --models=wrn --variants=same_batch,moments,loss_alone

For each architecture, at its paper batch size and M (configs/<model>.py), in one
process and on the same synthetic data resident on the device, this times the real
training program (`programs.TrainPrograms`: seeds gathered on device, augmented, forward,
backward, update), in these variants:

  baseline          M = 1, alpha = 0: B distinct images per step
  same batch        M copies of B / M seeds, alpha = 0, L_inv not computed
  invariance <m>    M copies, alpha = 0.1, L_inv by method <m> (pairwise, moments)
  ..., flax batch norm   the same batch or moments with flax's batch norm, where the
                    platform's default (config.batch_norm = "auto") is the fused one:
                    compared with the same batch with flax's
  ... 1 step/dispatch   the default invariance step, synchronised after every step

and the loss alone (L_inv of every sown layer, value and gradient, on random activations
of the step's shapes and dtype: experiments/loss_cost.py's program), the augmentation
alone (B images from B / M seeds) and the analysis (test images scored per second: clean
pass, 5 transformed copies, every layer; `analysis.Scorer`, and its parts timed alone:
pass 1, pass 2, the transforms, the eval forward, the scoring arithmetic, and the
compilation in its first call). --variants picks
which (default: all); the loss's share of a step is the invariance step's time minus the
same batch's, beside the loss alone.

Each training variant runs --steps_per_dispatch steps per dispatched program; its step
time is the median over --repeats programs (after warm-up, the device synchronised after
each) divided by the steps per program. Reported per variant: step time, images per
second, the ratio to the same-batch and to the baseline step, the step's FLOPs counted
analytically (every kernel tap of every convolution and matrix product, as papers
count, `describe.dense_macs`: 2 FLOPs per multiply-accumulate, x 3 for forward and
backward, x B images; augmentation, batch norm and the loss not counted) and XLA's
(its cost analysis of the compiled program; on a GPU it leaves out the convolutions
that cuDNN runs, so only the analytic count gives TFLOP/s there), achieved TFLOP/s
(analytic) and their fraction of the device's matmul peak (measured here with a large matrix product in the compute dtype,
or --peak_tflops), XLA's memory plan of the program (arguments + temporaries), the
device's peak memory where it reports one, and compile time. Writes a Markdown table and
JSON (--out, default experiments/results/benchmark.{md,json}), rewritten after each
model, so that a run stopped part-way keeps the models it finished.

--size=small (the default on CPU) shrinks the models so that a CPU finishes in minutes:
the ratios are what it measures there; absolute speed is for the accelerator.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from invjax import analysis
from invjax import augment
from invjax import build as build_lib
from invjax import config_lib
from invjax import describe
from invjax import losses
from invjax import models as models_lib
from invjax import input_pipeline
from invjax import placement as placement_lib
from invjax import programs as programs_lib
from invjax import steps as steps_lib
from experiments import common
from experiments import hlo
from experiments import loss_cost
from experiments import paper

ROOT = common.ROOT
FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["allcnn", "wrn", "densenet"],
                  "Architectures: config files configs/<name>.py.")
flags.DEFINE_enum("size", None, ["paper", "small"],
                  "paper: the models as published; small: shrunk for a CPU. Default: "
                  "small on CPU, paper elsewhere.")
flags.DEFINE_list("precision", None, "float32 and/or bfloat16 (config.half_precision). "
                  "Default: float32 on CPU, bfloat16 elsewhere.")
flags.DEFINE_integer("steps_per_dispatch", None, "Steps per timed program. Default: 1 "
                     "on CPU (dispatch costs nothing next to a CPU step), 10 elsewhere.")
flags.DEFINE_integer("repeats", None, "Timed programs per variant (after 2 warm-up), "
                     "the variants in turn. Default: 7 on CPU, 30 elsewhere.")
flags.DEFINE_integer("train_images", None, "Synthetic training set resident on the "
                     "device. Default: 2,000 on CPU, 50,000 (CIFAR-10's) elsewhere.")
flags.DEFINE_integer("analysis_images", None, "Test images scored. Default: 256 on "
                     "CPU, 10,000 (CIFAR-10's) elsewhere.")
flags.DEFINE_enum("gpu_compile", None, list(placement_lib.GPU_COMPILE),
                  "config.gpu_compile of every timed program (default: each model's "
                  "config's; configs/allcnn.py and densenet.py say graph). XLA_FLAGS "
                  "still win, option by option.")
flags.DEFINE_integer("stacked_runs", 3, "Runs in one program for the stacked variant.")
flags.DEFINE_integer("analysis_copies_per_forward", None, "The analysis's pass 2 "
                     "runs each batch's transformed copies through the network this "
                     "many at a time: 1 or config.analysis.num_transforms. Default: "
                     "analysis.Scorer's (1 on CPU, all elsewhere).")
flags.DEFINE_float("peak_tflops", None, "The device's peak TFLOP/s for the fraction "
                   "column. Default: measured with a large matrix product.")
flags.DEFINE_string("out", os.path.join(ROOT, "experiments", "results", "benchmark"),
                    "Output path without extension: writes OUT.md and OUT.json.")
flags.DEFINE_list("variants", None, "What to time, from " + ", ".join(
    "%s (%s)" % kv for kv in {
        "baseline": "M = 1, alpha = 0", "same_batch": "M copies, no loss",
        "pairwise": "invariance, pairwise", "moments": "invariance, moments",
        "moments_one_read": "moments, one-read form",
        "moments_per_seed": "moments, per-seed form",
        "moments_class": "moments, Eq. 3 over same-class pairs "
                         "(invariance_denominator=class)",
        "same_batch_flax_bn": "same batch with flax's batch norm",
        "moments_flax_bn": "invariance, moments, with flax's batch norm",
        "same_batch_widened": "same batch, DenseNet-BC's bottlenecks widened "
                              "(model.widen_bottlenecks)",
        "moments_widened": "invariance, moments, bottlenecks widened",
        "dispatch1": "default method, 1 step per dispatch, if steps_per_dispatch > 1",
        "loss_alone": "L_inv value and gradient alone",
        "augmentation": "augmentation alone", "analysis": "scoring",
        "stacked": "--stacked_runs runs of the default invariance step in one "
                   "program (vmap)"}.items())
                  + ". Default: all.")

# What --size=small changes, per model (the paper's batch size and M are kept).
SMALL = {
    "allcnn": {"model.width": 0.25},
    "wrn": {"model.depth": 10, "model.widen": 2},
    "densenet": {"model.depth": 40},
}
METHODS = ("pairwise", "moments")
VARIANTS = ("baseline", "same_batch", "pairwise", "moments", "moments_one_read",
            "moments_per_seed", "moments_class", "same_batch_flax_bn", "moments_flax_bn",
            "same_batch_widened", "moments_widened", "dispatch1",
            "loss_alone", "augmentation", "analysis", "stacked")
# The training variants: key -> (row name, config fields, StepConfig overrides).
TRAIN_VARIANTS = {
    "baseline": ("baseline", {"copies": 1, "alpha": 0.0}, {}),
    "same_batch": ("same batch", {"alpha": 0.0}, {"measure_inv": False}),
    **{method: (f"invariance {method}", {"loss_method": method}, {})
       for method in METHODS},
    # The moments method in each form (losses.MOMENT_FORMS), whatever the platform's.
    **{f"moments_{form}": (f"invariance moments, {form.replace('_', ' ')}",
                           {"loss_method": "moments"}, {"moments_form": form})
       for form in losses.MOMENT_FORMS},
    # Eq. 3's denominator over the pairs of the same class (the authors' code), which
    # the moments method computes in its per-seed form.
    "moments_class": ("invariance moments, class denominator",
                      {"loss_method": "moments", "invariance_denominator": "class"}, {}),
    # flax's batch norm where config.batch_norm = "auto" picks the fused one (off a
    # CPU): what the fused layer buys, side by side.
    "same_batch_flax_bn": ("same batch, flax batch norm",
                           {"alpha": 0.0, "batch_norm": "flax"}, {"measure_inv": False}),
    "moments_flax_bn": ("invariance moments, flax batch norm",
                        {"loss_method": "moments", "batch_norm": "flax"}, {}),
    # DenseNet-BC's bottlenecks on inputs padded to the block's width: the same
    # function in fewer distinct convolutions (its compile), at what cost in a step.
    "same_batch_widened": ("same batch, bottlenecks widened",
                           {"alpha": 0.0, "model.widen_bottlenecks": True},
                           {"measure_inv": False}),
    "moments_widened": ("invariance moments, bottlenecks widened",
                        {"loss_method": "moments", "model.widen_bottlenecks": True}, {}),
}


def variant_config(config, fields: dict):
  """A copy of `config` with a variant's fields set (dotted paths for nested ones), or
  None where the model has no such field (a DenseNet-only variant on another model)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for k, v in fields.items():
      node, leaf = config_lib.field_parent(c, k)
      if leaf not in node:
        return None
      config_lib.set_field(c, k, v)
  return c


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _default(value, cpu, accelerator):
  return value if value is not None else (cpu if _on_cpu() else accelerator)


def load_config(model: str, size: str, precision: str, gpu_compile: str | None = None):
  """configs/<model>.py's invariance config at `size` and `precision`, and the fields
  `size` changed; `gpu_compile`, if given, replaces its config.gpu_compile."""
  c = paper.load_config_module(os.path.join("configs", f"{model}.py")).get_config(
      "invariance")
  overrides = SMALL.get(model, {}) if size == "small" else {}
  with c.unlocked():
    for field, value in overrides.items():
      config_lib.set_field(c, field, value)
    c.half_precision = precision == "bfloat16"
    if gpu_compile:
      c.gpu_compile = gpu_compile
  return c, overrides


def synthetic_data(config, n_train: int, n_test: int) -> input_pipeline.Dataset:
  rng = np.random.default_rng(0)
  shape = tuple(config.image_shape)
  classes = config.num_classes
  return input_pipeline.Dataset(
      "synthetic", rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
      rng.integers(0, classes, n_train).astype(np.int32),
      rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
      rng.integers(0, classes, n_test).astype(np.int32), num_classes=classes)


def _sync(tree):
  jax.block_until_ready(tree)


def measure_peak_tflops(dtype) -> float:
  """TFLOP/s of a large square matrix product in `dtype`: the device's usable peak."""
  n = 1024 if _on_cpu() else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  _sync(f(a, b))
  times = []
  for _ in range(5 if _on_cpu() else 20):
    t = time.perf_counter()
    _sync(f(a, b))
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times)) / 1e12


def _cost_flops(compiled) -> float:
  return float(common.cost_analysis(compiled).get("flops", float("nan")))


def _plan_bytes(compiled) -> float:
  """XLA's memory plan of a program: arguments + outputs not aliased + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  return float(m.argument_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes + m.temp_size_in_bytes)


def _device_peak_bytes() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  return float(stats.get("peak_bytes_in_use", float("nan")))


class TrainingVariant:
  """One training variant, compiled and warmed up, timed a program at a time."""

  runs = 1  # training runs a program steps (StackedVariant: several)

  def __init__(self, config, data, step_overrides: dict, steps_per_dispatch: int):
    with config.unlocked():
      config.steps_per_dispatch = steps_per_dispatch
    self.config, self.spd = config, steps_per_dispatch
    run = build_lib.build(config, data)
    run.step_config = dataclasses.replace(run.step_config, **step_overrides)
    self.step_config = run.step_config
    self.batch_norm = run.model.batch_norm
    placement = placement_lib.Placement.create(config.gpu_compile)
    state = build_lib.initial_state(run, placement)
    self.programs = programs_lib.TrainPrograms(run, placement, state)
    self.state = self.programs.enter(state)  # the loop's layout, as training keeps it
    self.step = 0
    self._ready(run)

  def _ready(self, run) -> None:
    """The step's analytic FLOPs, then two programs of warm-up."""
    # 2 FLOPs per multiply-accumulate, forward + backward (x 3), B images per run.
    self.analytic_flops = 6.0 * self.config.batch_size * self.runs * (
        describe.dense_macs(run.model, run.data.image_shape))
    self.times, self.metrics = [], None
    for _ in range(2):
      self.run_once()
    self.times = []

  def _call(self):
    out = self.programs(self.state, self.step, self.spd)
    self.step += self.spd
    return out

  def _costs(self) -> dict:
    compiled = self.programs.compiled
    # XLA's cost analysis counts a loop body once, whatever its trip count: take the
    # FLOPs of the 1-step program.
    return {"flops_per_step": _cost_flops(compiled[1]),
            "memory_plan_bytes": _plan_bytes(compiled[self.spd]),
            "compile_s": self.programs.compile_seconds[self.spd]}

  def run_once(self) -> None:
    t = time.perf_counter()
    self.state, self.metrics = self._call()
    _sync((self.state, self.metrics))
    self.times.append(time.perf_counter() - t)

  def result(self) -> dict:
    seconds = float(np.median(self.times)) / self.spd
    return {"step_ms": seconds * 1e3,
            "images_per_s": self.runs * self.config.batch_size / seconds,
            **self._costs(),
            "analytic_flops_per_step": self.analytic_flops,
            "steps_timed": len(self.times) * self.spd,
            "loss_finite": bool(np.all(np.isfinite(np.asarray(self.metrics["loss"])))),
            **({"runs": self.runs} if self.runs > 1 else {})}


class StackedVariant(TrainingVariant):
  """R runs of one training variant in one program: the step vmapped over R train
  states (and R augmentation keys; the seeds are shared), timed a program at a time
  like TrainingVariant. What several variants or seeds trained together would buy
  where one run leaves the device partly idle (All-CNN-C)."""

  def __init__(self, config, data, runs: int, steps_per_dispatch: int):
    with config.unlocked():
      config.steps_per_dispatch = steps_per_dispatch
    self.config, self.spd, self.runs = config, steps_per_dispatch, runs
    run = build_lib.build(config, data)
    self.step_config = run.step_config
    self.batch_norm = run.model.batch_norm
    placement = placement_lib.Placement.create(config.gpu_compile)
    state = build_lib.initial_state(run, placement)
    programs = programs_lib.TrainPrograms(run, placement, state, compile_now=False)
    self.state = jax.vmap(programs.layout[0])(
        jax.tree.map(lambda a: jnp.stack([a] * runs), state))  # the loop's layout
    # The training set on the device, shared by the runs; each run its own state and
    # augmentation key.
    *shared, _ = programs.args(state, 0, steps_per_dispatch)[1:]
    self.args = (*shared, jax.random.split(jax.random.key(1), runs))
    stacked = jax.vmap(programs.chunk(steps_per_dispatch),
                       in_axes=(0, *[None] * len(shared), 0))
    t = time.perf_counter()
    self.compiled = jax.jit(stacked, donate_argnums=0).lower(
        self.state, *self.args).compile(
            compiler_options=placement.compiler_options or None)
    self.compile_s = time.perf_counter() - t
    self._ready(run)

  def _call(self):
    return self.compiled(self.state, *self.args)

  def _costs(self) -> dict:
    return {"flops_per_step": _cost_flops(self.compiled) / self.spd,
            "memory_plan_bytes": _plan_bytes(self.compiled),
            "compile_s": self.compile_s}


def time_training(variants: dict[str, TrainingVariant], repeats: int) -> dict:
  """Times the variants side by side: round after round, one program of each in turn,
  so that drift in the machine's speed touches them all alike."""
  for _ in range(repeats):
    for v in variants.values():
      v.run_once()
  return {name: v.result() for name, v in variants.items()}


def _looped(fn, calls: int):
  """jit of `calls` calls of fn(i, *args), i = 0 .. calls - 1, in one program: a loop
  whose carry is each call's output (so no call is skipped), returning the last. Timed
  per call like a training step at --steps_per_dispatch, so a part timed alone carries
  the same share of the dispatch as the step it is compared with."""
  if calls == 1:
    return jax.jit(lambda *args: fn(0, *args))

  def run(*args):
    init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                        jax.eval_shape(lambda: fn(0, *args)))
    return jax.lax.fori_loop(0, calls, lambda i, _: fn(i, *args), init)
  return jax.jit(run)


def _time_per_call(compiled, args, calls: int, programs: int) -> float:
  """Median seconds of one of the `calls` calls a compiled `_looped` program makes."""
  _sync(compiled(*args))
  times = []
  for _ in range(programs):
    t = time.perf_counter()
    _sync(compiled(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)) / calls


def time_augmentation(config, data, repeats: int, calls: int = 1) -> dict:
  """The augmentation alone: B augmented float images from B / M uint8 seeds, `calls`
  augmentations (each its own key) per timed program."""
  k = config.batch_size // config.copies
  ranges = augment.AugmentRanges.from_config(config.augment)
  placement = placement_lib.Placement.create()
  seeds = placement.shard(data.x_train[:k])
  labels = placement.shard(data.y_train[:k])

  def aug(i, key, seeds, labels):
    x, _, _ = steps_lib.expand_seeds(seeds, labels, config.copies)
    return augment.augment(jax.random.fold_in(key, i), steps_lib.to_float(x), ranges)

  args = (jax.random.key(0), seeds, labels)
  t = time.perf_counter()
  compiled = _looped(aug, calls).lower(*args).compile()
  compile_s = time.perf_counter() - t
  one = compiled if calls == 1 else _looped(aug, 1).lower(*args).compile()
  seconds = _time_per_call(compiled, args, calls, repeats * 5)
  return {"step_ms": seconds * 1e3, "images_per_s": config.batch_size / seconds,
          "calls_per_program": calls, "flops_per_step": _cost_flops(one),
          "memory_plan_bytes": _plan_bytes(one), "compile_s": compile_s}


_COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                   "/jax/core/compile/backend_compile_duration": "xla_compile_s"}


class _CompileClock:
  """Seconds JAX spends tracing, lowering and compiling (XLA) inside a `with` block,
  from jax.monitoring's events."""

  def __enter__(self):
    self.seconds = dict.fromkeys(_COMPILE_EVENTS.values(), 0.0)

    def listen(event, duration, **_):
      if event in _COMPILE_EVENTS:
        self.seconds[_COMPILE_EVENTS[event]] += duration

    self._listen = listen
    jax.monitoring.register_event_duration_secs_listener(listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def _timed(fn, *args):
  """(seconds, result) of fn(*args), the device synchronised."""
  t = time.perf_counter()
  out = fn(*args)
  _sync(out)
  return time.perf_counter() - t, out


def time_analysis(config, data, copies_per_forward: int | None = None) -> dict:
  """Invariance scores of every layer for the test images, 5 copies each, and its
  parts, each over the same images at the same batch size, compiled before timed:
  pass 1 (clean forward and statistics) and pass 2 (clean forward, transforms, the
  copies' forwards, scores) alone; within pass 2 the transforms alone, the eval
  forward alone (its activations written out, not fetched) at the analysis batch size
  and with all copies of an image in one forward, and the scoring arithmetic alone on
  one batch's stored activations; and the compilation inside the first call."""
  run = build_lib.build(config, data)
  placement = placement_lib.Placement.create()
  state = build_lib.initial_state(run, placement)
  ranges = augment.AugmentRanges.from_config(config.augment)
  ac = config.analysis
  copies = ac.num_transforms
  batch = min(ac.batch_size, len(data.x_test))
  batch -= batch % jax.device_count()
  starts = range(0, len(data.x_test) - batch + 1, batch)
  inputs = [placement.shard(data.x_test[s:s + batch]) for s in starts]
  batches = lambda: iter(inputs)
  transform = lambda key, x: augment.augment_each(key, x, ranges, scoring=True)
  key = jax.random.key(0)
  scorer = analysis.Scorer(steps_lib.features, copies, transform,
                           preprocess=steps_lib.to_float, weights=state,
                           copies_per_forward=copies_per_forward)

  with _CompileClock() as clock:
    first, _ = _timed(lambda: scorer(batches, key).scores)
  seconds, scores = _timed(lambda: scorer(batches, key).scores)
  pass1, stats = _timed(scorer.stats, batches())
  pass2, _ = _timed(lambda: scorer.scores(stats, batches(), key).scores)

  def over_batches(program, args_of):
    """Seconds of `program` over every batch (compiled first, on the first), each
    synchronised and its output dropped before the next (their activations would not
    all fit at once)."""
    _sync(program(*args_of(0, inputs[0])))
    t = time.perf_counter()
    for i, x in enumerate(inputs):
      _sync(program(*args_of(i, x)))
    return time.perf_counter() - t

  moved = jax.jit(lambda k, x: jnp.stack(
      [transform(jax.random.fold_in(k, c), steps_lib.to_float(x)) for c in range(copies)],
      axis=1))
  # The eval forward, its activations written out as pass 2 writes them.
  forward = jax.jit(lambda st, x: steps_lib.features(st, steps_lib.to_float(x)))
  # Each image `copies` times, side by side: the copies' forward with
  # copies_per_forward = copies.
  wide = [placement.shard(np.repeat(data.x_test[s:s + batch], copies, axis=0))
          for s in starts]
  arithmetic = jax.jit(lambda st, clean, moved: {
      k: analysis.score_copies(st[k], v.reshape(batch, -1),
                               moved[k].reshape(batch, copies, -1))
      for k, v in clean.items()})
  transforms_s = over_batches(moved, lambda i, x: (jax.random.fold_in(key, i), x))
  forward_n = over_batches(forward, lambda i, x: (state, x))
  forward_wide = over_batches(forward, lambda i, x: (state, wide[i]))
  clean, copied = forward(state, inputs[0]), forward(state, wide[0])
  parts = {"transforms_s": transforms_s,
           "forward_batch_n_s": (copies + 1) * forward_n,
           "forward_batch_wide_s": forward_n + forward_wide,
           "arithmetic_s": over_batches(arithmetic,
                                        lambda i, x, a=clean, m=copied: (stats, a, m))}
  del clean, copied
  n = len(next(iter(scores.values())))
  return {"images": n, "seconds": seconds, "images_per_s": n / seconds,
          "layers": len(scores), "copies": copies, "batch": batch,
          "copies_per_forward": scorer.copies_per_forward,
          "first_call_s": first, "first_call_compile": clock.seconds,
          "pass1_s": pass1, "pass2_s": pass2, **parts,
          "device_peak_bytes": _device_peak_bytes()}


def time_loss_alone(config, repeats: int, calls: int = 1, form: str | None = None) -> dict:
  """L_inv of every sown layer, value and gradient, on random post-ReLU activations of
  the step's shapes and compute dtype, weighted as Eq. 4 weighs them; `calls` per timed
  program, call i on the activations x (1 + i 2^-20) (a value the loop cannot hoist).
  The moments method in `form` (default: the platform's, `losses.moment_form`)."""
  model = build_lib.create_model(config, config.num_classes)
  shapes = models_lib.layer_shapes(model, tuple(config.image_shape))
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  key = jax.random.key(0)
  feats = {k: jnp.maximum(jax.random.normal(jax.random.fold_in(key, i),
                                            (config.batch_size, *s), dtype), 0)
           for i, (k, s) in enumerate(shapes.items())}
  weights = losses.layer_weights(len(shapes), config.alpha, config.alpha_ratio)
  form = form or losses.moment_form(jax.default_backend())
  program = loss_cost.loss_program(weights, config.copies, config.loss_method, 1, form)

  def loss(i, fs):
    scale = (1.0 + jnp.asarray(i, jnp.float32) * 2.0 ** -20).astype(dtype)
    return program(jax.tree.map(lambda v: v * scale, fs))

  t = time.perf_counter()
  compiled = _looped(loss, calls).lower(feats).compile()
  compile_s = time.perf_counter() - t
  one = program.lower(feats).compile()  # what XLA's cost analysis counts: one call
  seconds = _time_per_call(compiled, (feats,), calls, repeats * 3)
  nbytes = sum(v.size * v.dtype.itemsize for v in feats.values())
  cost = loss_cost.cost(one)
  return {"step_ms": seconds * 1e3, "method": config.loss_method,
          "form": form, "calls_per_program": calls,
          "activation_bytes": nbytes, "layers": len(shapes),
          "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
          "flops_per_step": float(cost.get("flops", float("nan"))),
          "memory_plan_bytes": _plan_bytes(one), "compile_s": compile_s}


def benchmark_model(model: str, size: str, precision: str, spd: int, repeats: int,
                    n_train: int, n_test: int, chosen=VARIANTS,
                    stacked_runs: int = 3,
                    copies_per_forward: int | None = None,
                    gpu_compile: str | None = None) -> dict:
  config, overrides = load_config(model, size, precision, gpu_compile)
  data = synthetic_data(config, n_train, n_test)
  m = config.copies
  variants = TRAIN_VARIANTS
  default_method = config_lib.base_config().loss_method
  prepared, failed = {}, {}
  for key, (name, fields, step_overrides) in variants.items():
    if key not in chosen:
      continue
    c = variant_config(config, fields)
    if c is None:
      print(f"  {model} {precision}: {name} does not apply, skipped", flush=True)
      continue
    print(f"  {model} {precision}: compiling {name} ...", flush=True)
    try:
      prepared[name] = TrainingVariant(c, data, step_overrides, spd)
    except jax.errors.JaxRuntimeError as e:  # the others still run (an XLA flag's
      failed[name] = hlo.compile_error(str(e))  # fusion no backend takes, ...)
      print(f"  {model} {precision}: {name} did not compile: {failed[name]}", flush=True)
  if "stacked" in chosen and stacked_runs > 1:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.loss_method = default_method
    name = f"{stacked_runs} x invariance {default_method}, one program"
    print(f"  {model} {precision}: compiling {name} ...", flush=True)
    try:
      prepared[name] = StackedVariant(c, data, stacked_runs, spd)
    except jax.errors.JaxRuntimeError as e:  # as above: the rest still run
      failed[name] = hlo.compile_error(str(e))
      print(f"  {model} {precision}: {name} did not compile: {failed[name]}", flush=True)
  rows = {}
  if prepared:
    print(f"  {model} {precision}: timing {len(prepared)} variants side by side ...",
          flush=True)
    rows = time_training(prepared, repeats)
  for name, v in prepared.items():
    rows[name]["copies"], rows[name]["alpha"] = v.config.copies, v.config.alpha
    rows[name]["batch_norm"] = v.batch_norm
    rows[name]["widened"] = bool(v.config.model.get("widen_bottlenecks", False))
    if v.config.alpha > 0 and v.config.loss_method == "moments":
      rows[name]["moments_form"] = v.step_config.moments_form
    programs = getattr(v, "programs", None)  # (the stacked variant compiles its own)
    if programs is not None and programs.fell_back:  # timed at XLA's defaults instead
      rows[name]["fell_back"] = programs.fell_back
  one = rows.get(f"invariance {default_method}")
  for row in rows.values():  # R runs in one program against R programs one by one
    if row.get("runs") and one:
      row["speedup_vs_one_by_one"] = row["runs"] * one["step_ms"] / row["step_ms"]
  if spd > 1 and "dispatch1" in chosen:  # what several steps per dispatch buy
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.loss_method = default_method
    print(f"  {model} {precision}: 1 step per dispatch ...", flush=True)
    one = {"1": TrainingVariant(c, data, {}, 1)}
    row = rows[f"invariance {default_method}, 1 step/dispatch"] = time_training(
        one, repeats * spd)["1"]
    row["copies"], row["alpha"] = c.copies, c.alpha
  del prepared
  result = {"model": model, "precision": precision, "size": size,
            "overrides": overrides, "batch_size": config.batch_size, "copies": m,
            "gpu_compile": config.gpu_compile, "paper_epochs": config.num_epochs,
            "train_rows": rows, "default_method": default_method, "failed": failed}
  if "loss_alone" in chosen:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.loss_method = default_method
    print(f"  {model} {precision}: the loss alone ...", flush=True)
    result["loss_alone"] = time_loss_alone(c, repeats, spd)
    if default_method == "moments":  # and in the other forms, for their bytes
      result["loss_alone_forms"] = {
          f: (result["loss_alone"] if f == result["loss_alone"]["form"]
              else time_loss_alone(c, repeats, spd, f)) for f in losses.MOMENT_FORMS}
  if "augmentation" in chosen:
    print(f"  {model} {precision}: augmentation ...", flush=True)
    result["augmentation"] = time_augmentation(config, data, repeats, spd)
  if "analysis" in chosen:
    print(f"  {model} {precision}: analysis ...", flush=True)
    result["analysis"] = time_analysis(config, data, copies_per_forward)
  add_ratios(rows)
  same = rows.get("same batch", {}).get("step_ms")
  if "augmentation" in result:
    result["augmentation"]["vs_same_batch"] = (
        result["augmentation"]["step_ms"] / same if same else None)
  return result


def add_ratios(rows: dict[str, dict]) -> None:
  """Each row's vs_same_batch, vs_baseline and loss_share_ms (the step minus the same
  batch's without the loss). A row with flax's batch norm, where the same batch has
  the fused one (the default off a CPU), is compared with the same batch with flax's;
  a row with DenseNet-BC's bottlenecks widened, with the same batch widened (and that
  one with the plain same batch: what widening costs)."""
  base = rows.get("baseline", {}).get("step_ms")
  same = rows.get("same batch", {}).get("step_ms")
  same_flax = rows.get(TRAIN_VARIANTS["same_batch_flax_bn"][0], {}).get("step_ms")
  same_wide = rows.get(TRAIN_VARIANTS["same_batch_widened"][0], {}).get("step_ms")
  default_bn = rows.get("same batch", {}).get("batch_norm")
  for name, r in rows.items():
    ref = same_flax if r.get("batch_norm") == "flax" != default_bn else same
    if (r.get("widened") and not rows.get("same batch", {}).get("widened")
        and name != TRAIN_VARIANTS["same_batch_widened"][0]):
      ref = same_wide
    several = r.get("runs")  # several runs a step: see speedup_vs_one_by_one
    r["vs_same_batch"] = r["step_ms"] / ref if ref and not several else None
    r["vs_baseline"] = r["step_ms"] / base if base and not several else None
    r["loss_share_ms"] = r["step_ms"] - ref if ref and not several else None


def _num(value, fmt: str) -> str:
  return "" if value is None else format(value, fmt)


def _loss_alone_rows(r: dict) -> list[dict]:
  """The loss alone in every form timed (the default form alone before they were)."""
  if "loss_alone_forms" in r:
    return list(r["loss_alone_forms"].values())
  return [r["loss_alone"]] if "loss_alone" in r else []


def format_markdown(result: dict) -> str:
  lines = common.report_header("invjax benchmark", result) + [
      f"Steps per timed program: {result['steps_per_dispatch']}; median of "
      f"{result['repeats']} programs after 2 warm-up, synchronised after each, the "
      "variants timed in turn (round after round). "
      f"Synthetic training set of {result['train_images']:,} images resident on the "
      "device; the step gathers, augments, runs forward and backward and updates. "
      "The parts timed alone (L_inv, the augmentation) run as many calls per program "
      "as a program has steps, per call.  ",
      "GFLOP/step: analytic (every kernel tap, 2 per multiply-accumulate, x 3 for "
      "forward and backward; TFLOP/s and the fraction of peak are of this count) and "
      "XLA's cost analysis (on a GPU without the convolutions cuDNN runs). "
      "Loss share: the step's time minus the same batch's without the loss.  ",
  ]
  for precision, peak in result["peak_tflops"].items():
    lines.append(f"Device peak ({precision} matmul, {result['peak_source']}): "
                 f"{peak:.2f} TFLOP/s  ")
  for r in result["models"]:
    size = (" (size small: " + ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
            + ")") if r["overrides"] else ""
    peak = result["peak_tflops"][r["precision"]]
    # on a GPU the programs' XLA options (placement.GPU_COMPILE); older results lack it
    compiled = (f", gpu_compile {r['gpu_compile']}"
                if r.get("gpu_compile")
                and placement_lib.is_gpu(result["hardware"].get("platform", "")) else "")
    lines += ["", f"## {r['model']}, {r['precision']}{size}: batch {r['batch_size']}, "
              f"M = {r['copies']}{compiled}", "",
              "| step | ms | images/s | / same batch | / baseline | loss share (ms) "
              "| GFLOP/step | GFLOP/step (XLA) | TFLOP/s | of peak | memory plan (MB) "
              "| compile (s) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: | ---: |"]
    for name, row in r["train_rows"].items():
      flops = row.get("analytic_flops_per_step", float("nan"))
      tflops = flops / (row["step_ms"] / 1e3) / 1e12
      share = row.get("loss_share_ms") if row.get("alpha") else None
      fell_back = (" (gpu_compile failed: XLA's defaults)" if row.get("fell_back")
                   else "")
      lines.append(
          f"| {name}{fell_back} | {row['step_ms']:.2f} | {row['images_per_s']:,.0f} | "
          f"{_num(row['vs_same_batch'], '.3f')} | {_num(row['vs_baseline'], '.3f')} | "
          f"{_num(share, '.2f')} | {flops / 1e9:,.1f} | "
          f"{row['flops_per_step'] / 1e9:,.1f} | {tflops:.3f} | {tflops / peak:.1%} | "
          f"{row['memory_plan_bytes'] / 2**20:,.0f} | {row['compile_s']:.1f} |")
    for a in _loss_alone_rows(r):
      form = f" {a['form'].replace('_', ' ')}" if "loss_alone_forms" in r else ""
      lines.append(
          f"| L_inv alone ({a['method']}{form}, value and gradient, {a['layers']} "
          f"layers) | {a['step_ms']:.2f} | | | | | | {a['flops_per_step'] / 1e9:,.2f} "
          f"| | | {a['memory_plan_bytes'] / 2**20:,.0f} | {a['compile_s']:.1f} |")
    if "augmentation" in r:
      a = r["augmentation"]
      lines.append(
          f"| augmentation alone | {a['step_ms']:.2f} | {a['images_per_s']:,.0f} | "
          f"{_num(a.get('vs_same_batch'), '.3f')} | | | | "
          f"{a['flops_per_step'] / 1e9:,.2f} | | | "
          f"{a['memory_plan_bytes'] / 2**20:,.0f} | {a['compile_s']:.1f} |")
    lines.append("")
    for name, why in r.get("failed", {}).items():
      lines.append(f"{name}: did not compile ({why}).  ")
    for a in _loss_alone_rows(r):
      form = f" ({a['form'].replace('_', ' ')})" if "loss_alone_forms" in r else ""
      lines.append(
          f"L_inv alone{form}: XLA's bytes accessed {a['bytes_accessed'] / 1e6:,.1f} MB "
          f"for {a['activation_bytes'] / 1e6:,.1f} MB of sown activations "
          f"({a['bytes_accessed'] / a['activation_bytes']:.2f} x).  ")
    if "analysis" in r:
      lines += _analysis_lines(r["analysis"])
    for name, row in r["train_rows"].items():
      if row.get("speedup_vs_one_by_one"):
        lines.append(
            f"{name}: {row['step_ms']:.2f} ms for a step of all {row['runs']} runs, "
            f"against {row['runs']} x the single invariance step's time one after "
            f"another: {row['speedup_vs_one_by_one']:.2f} x the throughput.  ")
    inv = r["train_rows"].get(f"invariance {r['default_method']}")
    if inv:
      steps = 50_000 // r["batch_size"] * r["paper_epochs"]
      lines.append(
          f"Projected paper run ({r['paper_epochs']:g} epochs of 50,000 CIFAR-10 "
          f"images, {steps:,.0f} steps) at the invariance {r['default_method']} step: "
          f"{steps * inv['step_ms'] / 6e4:,.1f} min of training steps.")
  if result.get("device_peak_bytes") == result.get("device_peak_bytes"):  # not NaN
    lines += ["", f"Device peak memory in use over the whole run: "
              f"{result['device_peak_bytes'] / 2**30:.2f} GiB."]
  return "\n".join(lines) + "\n"


def _analysis_lines(s: dict) -> list[str]:
  c, b, k = s["copies"], s["batch"], s["copies"] + 1
  g = s.get("copies_per_forward", 1)
  compile_ = s.get("first_call_compile", {})
  if "pass1_s" not in s:  # a table written before the parts were timed
    return [f"Analysis: {s['images']:,} test images x {c} transformed copies, "
            f"{s['layers']} layers (pixels included) scored in {s['seconds']:.2f} s "
            f"(first call, compiling: {s['first_call_s']:.1f} s).  "]
  rows = [
      ("both passes, first call (compiles)", s["first_call_s"],
       "of it tracing %.1f s, lowering %.1f s, XLA compiling (or cache loading) "
       "%.1f s" % (
           compile_.get("trace_s", 0), compile_.get("lower_s", 0),
           compile_.get("xla_compile_s", 0))),
      ("both passes, compiled", s["seconds"], f"{s['images_per_s']:,.0f} images/s"),
      ("pass 1 alone", s["pass1_s"], f"clean forward and statistics, batch {b}"),
      ("pass 2 alone", s["pass2_s"],
       f"clean forward, {c} transforms, {c // g} forward(s) of {g} x {b} images, "
       "scores"),
      ("transforms alone", s["transforms_s"], f"{c} copies of each image"),
      (f"eval forward alone, batch {b}", s["forward_batch_n_s"],
       f"{k} x {s['images']:,} images, activations written out"),
      (f"eval forward alone, batch {b} then {c * b}", s["forward_batch_wide_s"],
       "the same, all copies of an image in one forward"),
      ("scoring arithmetic alone", s["arithmetic_s"],
       "every layer, on one batch's stored activations"),
  ]
  lines = ["", f"Analysis: {s['images']:,} test images x {c} transformed copies, "
           f"{s['layers']} layers (pixels included), batch {b}; each part over the "
           "same images, compiled before timed:", "",
           "| analysis | s | |", "| --- | ---: | --- |"]
  lines += [f"| {name} | {sec:.3f} | {note} |" for name, sec, note in rows]
  peak = s.get("device_peak_bytes", float("nan"))
  if peak == peak:
    lines.append(f"\nDevice peak memory after the analysis: {peak / 2**30:.2f} GiB.  ")
  return lines + [""]


def write(result: dict, out: str) -> str:
  text = format_markdown(result)
  common.write_md_and_json(out, text, result)
  return text


def main(argv):
  del argv
  size = _default(FLAGS.size, "small", "paper")
  precisions = _default(FLAGS.precision, ["float32"], ["bfloat16"])
  spd = _default(FLAGS.steps_per_dispatch, 1, 10)
  repeats = _default(FLAGS.repeats, 7, 30)
  n_train = _default(FLAGS.train_images, 2_000, 50_000)
  n_test = _default(FLAGS.analysis_images, 256, 10_000)
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  for p in precisions:
    if p not in dtypes:
      raise app.UsageError(f"--precision={p}: valid values are {sorted(dtypes)}.")
  chosen = tuple(FLAGS.variants or VARIANTS)
  bad = sorted(set(chosen) - set(VARIANTS))
  if bad:
    raise app.UsageError(f"--variants: unknown {bad}; valid: {list(VARIANTS)}.")
  unknown = [m for m in FLAGS.models
             if not os.path.exists(os.path.join(ROOT, "configs", f"{m}.py"))]
  if unknown:
    raise app.UsageError(f"--models: no configs/<name>.py for {unknown}.")
  if FLAGS.peak_tflops:
    peaks, source = {p: FLAGS.peak_tflops for p in precisions}, "given"
  else:
    peaks = {p: measure_peak_tflops(dtypes[p]) for p in precisions}
    source = "measured here"
  print(f"{common.hardware()['device']} x{jax.device_count()}: peak " + ", ".join(
      f"{p} {v:.2f} TFLOP/s" for p, v in peaks.items()), flush=True)
  result = {"command": " ".join(["python", "-m", "experiments.benchmark", *sys.argv[1:]]),
            "date": datetime.date.today().isoformat(), "hardware": common.hardware(),
            "steps_per_dispatch": spd, "repeats": repeats, "train_images": n_train,
            "peak_tflops": peaks, "peak_source": source, "models": [],
            "variants": chosen}
  for precision in precisions:
    for model in FLAGS.models:
      result["models"].append(benchmark_model(
          model, size, precision, spd, repeats, n_train, n_test, chosen,
          FLAGS.stacked_runs, FLAGS.analysis_copies_per_forward, FLAGS.gpu_compile))
      result["device_peak_bytes"] = _device_peak_bytes()
      write(result, FLAGS.out)  # what is finished survives a stopped run
      print(f"wrote {FLAGS.out}.md and {FLAGS.out}.json ({model}, {precision})",
            flush=True)
  print(format_markdown(result))


if __name__ == "__main__":
  app.run(main)
