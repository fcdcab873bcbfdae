"""Building a run: what its configuration and data determine (the model, the data
check, the step's settings, the schedule's lengths, the initial state), without
compiling anything. Training, scoring, describing and the benchmarks start here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from invjax import augment
from invjax import config_lib
from invjax import errors
from invjax import flat_state
from invjax import input_pipeline
from invjax import losses
from invjax import models
from invjax import placement as placement_lib
from invjax import steps as steps_lib


@dataclasses.dataclass
class Run:
  """What a run's configuration and data determine, built without compiling."""
  config: Any
  data: input_pipeline.Dataset
  model: Any
  step_config: steps_lib.StepConfig
  steps_per_epoch: int
  total_steps: int
  lr_fn: Any
  layer_shapes: dict[str, tuple[int, ...]]  # sown layers in depth order, per example
  param_count: int
  steps_per_dispatch: int  # config.steps_per_dispatch, resolved (`dispatch_steps`)
  platform: str = "cpu"  # of the devices it is built for


def create_model(config, num_classes: int, platform: str | None = None):
  """The model the config names, for `num_classes` classes, with the batch norm that
  config.batch_norm means on `platform` (default: JAX's default backend)."""
  return models.create(
      config.model.name, num_classes,
      dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
      batch_norm_impl=models.batch_norm.implementation(
          config.get("batch_norm", "auto"), platform or jax.default_backend()),
      **{k: v for k, v in config.model.items() if k != "name"})


def stop_intervals(config, steps_per_epoch: int) -> tuple[int, int, int]:
  """Steps between the training loop's checkpoints, evaluations and logs."""
  return (config.checkpoint_every_steps or steps_per_epoch,
          max(1, int(round(config.eval_every_epochs * steps_per_epoch))),
          config.log_every_steps)


AUTO_DISPATCH_MAX = 100  # the most steps the automatic choice puts in one program
AUTO_DISPATCH_ENOUGH = 10  # a common divisor of the stops this large is taken as is


def _programs(steps: int, intervals: tuple[int, ...], total: int) -> int:
  """Programs the loop dispatches over `total` steps at `steps` per program: whole
  programs between consecutive stops (multiples of each interval, and the end), the
  rest 1-step programs (`TrainPrograms.chunk_size`)."""
  stops = {total}
  for every in intervals:
    stops.update(range(every, total, every))
  gaps = np.diff(np.array([0] + sorted(stops)))
  return int(np.sum(gaps // steps + gaps % steps))


def dispatch_steps(config, steps_per_epoch: int, train_images: int, total_steps: int,
                   platform: str | None = None) -> int:
  """Steps per dispatched training program: config.steps_per_dispatch, or where it is 0
  (automatic, the default) 1 on a CPU, where XLA runs a step inside a loop slower, and
  elsewhere, up to AUTO_DISPATCH_MAX and within one pass over the training images: the
  largest number of steps that lands on every stop of the loop (`stop_intervals`: logs,
  evaluations, checkpoints), so that one program serves the whole run; where that is
  under AUTO_DISPATCH_ENOUGH, the number that dispatches the fewest programs over the
  run, a 1-step program filling the gaps (a second program to compile).

  A step shorter than its dispatch then does not wait on Python: on an H200, All-CNN-C's
  invariance step (bfloat16, batch 128) took 2.63 ms at 1 step per program, 1.90 ms at
  10 and 1.74 ms at 78. What a run computes does not depend on it.
  """
  if config.steps_per_dispatch:
    return int(config.steps_per_dispatch)
  if (platform or jax.default_backend()) == "cpu":
    return 1
  intervals = stop_intervals(config, steps_per_epoch)
  seeds = config.batch_size // max(config.copies, 1)
  sizes = range(1, max(1, min(AUTO_DISPATCH_MAX, train_images // max(seeds, 1))) + 1)
  common = max(d for d in sizes if all(every % d == 0 for every in intervals))
  if common >= AUTO_DISPATCH_ENOUGH:
    return common
  counts = {d: _programs(d, intervals, total_steps) for d in sizes}
  return min(sizes, key=lambda d: (counts[d], -d))


def check_data(config, data: input_pipeline.Dataset) -> None:
  """The data against what the config says it must be (config.image_shape etc.)."""
  problems = []
  want = tuple(config.image_shape)
  if want and tuple(data.image_shape) != want:
    problems.append(f"config.image_shape={want} but {data.name} has images of shape "
                  f"{tuple(data.image_shape)}; set --config.image_shape="
                  f"'{tuple(data.image_shape)}' (or '()' to accept any) if that data is "
                  "what you mean.")
  if tuple(data.x_test.shape[1:]) != tuple(data.image_shape):
    problems.append(f"{data.name}: the test images have shape {tuple(data.x_test.shape[1:])}"
                  f" but the training images {tuple(data.image_shape)}; both splits "
                  "must be images of one shape (resize or convert one of them).")
  for split, y in (("training", data.y_train), ("test", data.y_test)):
    if len(y) and (y.min() < 0 or y.max() >= data.num_classes):
      problems.append(f"{data.name}: the {split} labels span {int(y.min())} .. "
                    f"{int(y.max())}, outside the {data.num_classes} classes 0 .. "
                    f"{data.num_classes - 1}.")
  if len(data.x_test) == 0:
    problems.append(f"{data.name} has no test images; the run needs some to evaluate.")
  unseen = np.setdiff1d(data.y_test, data.y_train)
  if len(unseen) and not problems:
    logging.warning("%s: test class(es) %s never occur among the %d training images "
                    "used", data.name, unseen.tolist()[:10], len(data.x_train))
  if config.num_classes and data.num_classes != config.num_classes:
    problems.append(f"config.num_classes={config.num_classes} but {data.name} has "
                  f"{data.num_classes} classes; set --config.num_classes="
                  f"{data.num_classes} (or 0 to accept any) if that data is what you mean.")
  if len(data.x_train) < config.batch_size:
    problems.append(f"config.batch_size={config.batch_size} exceeds the "
                  f"{len(data.x_train)} training images of {data.name}.")
  seeds = config.batch_size // max(config.copies, 1)
  spd = config.steps_per_dispatch  # 0, automatic, is chosen to fit
  if spd * seeds > len(data.x_train):
    problems.append(f"config.steps_per_dispatch={spd} steps of {seeds} seed images "
                  f"read more than the {len(data.x_train)} training images of "
                  f"{data.name} (one pass); set it to at most "
                  f"{max(1, len(data.x_train) // seeds)}.")
  if problems:
    raise errors.DataError("the data do not fit the configuration (or each other):\n  " +
                     "\n  ".join(problems))


def build(config, data: input_pipeline.Dataset | None = None,
          devices: Sequence[Any] | None = None) -> Run:
  """Checks the config, loads the data and builds the model. No compilation.

  `devices`: those the run will run on (default: every device of every process,
  `jax.devices()`); their platform and number decide the batch norm, the moments
  form, the loss's parts and the steps per dispatch. Others than JAX's own are for
  compiling without them (e.g. a TPU topology's, experiments/tpu_compile.py)."""
  devices = list(jax.devices() if devices is None else devices)
  platform, num_devices = devices[0].platform, len(devices)
  config_lib.validate(config, num_devices)
  data = data if data is not None else input_pipeline.load(config)
  check_data(config, data)
  n = len(data.x_train)
  try:
    model = create_model(config, data.num_classes, platform)
    shapes = models.shapes(model, data.image_shape)
  except ValueError as e:  # the models' own checks (e.g. depth 6n + 4)
    raise errors.ConfigError(str(e)) from e
  for layer, shape in shapes.layers.items():  # the first layer the images vanish in
    if 0 in shape:
      raise errors.ConfigError(
          f"images of {tuple(data.image_shape)} are too small for this model "
          f"({config.model.name}): its layer {layer} would be "
          f"{'x'.join(map(str, shape))}. Use larger images (config.image_shape, or the "
          "data's own size) or a model that downsamples less (config.model).")
  steps_per_epoch = n // config.batch_size
  total_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
  lr_fn = steps_lib.create_learning_rate_fn(
      config.learning_rate, config.lr_boundaries, config.lr_decay, steps_per_epoch)
  step_config = steps_lib.StepConfig(
      copies=config.copies, alpha=config.alpha, alpha_ratio=config.alpha_ratio,
      loss_method=config.loss_method,
      ranges=augment.AugmentRanges.from_config(config.augment),
      num_layers=len(shapes.layers), top5=data.num_classes > 10,
      weight_law=config.layer_weight_law, class_alpha=config.class_alpha,
      denominator=config.invariance_denominator,
      alpha_steps=steps_lib.boundary_steps(config.alpha_boundaries, steps_per_epoch),
      alpha_decay=config.alpha_decay,
      moments_form=losses.moment_form(platform),
      loss_parts=losses.moment_parts(config.batch_size // config.copies, num_devices))
  return Run(config, data, model, step_config, steps_per_epoch, total_steps, lr_fn,
             shapes.layers, shapes.params,
             dispatch_steps(config, steps_per_epoch, n, total_steps, platform), platform)


def _optimizer(run: Run):
  return steps_lib.create_optimizer(run.lr_fn, run.config.momentum, run.config.nesterov,
                                    flat_state.vector_in_loop(run.platform))


def initial_state(run: Run, placement: placement_lib.Placement) -> steps_lib.TrainState:
  key = jax.random.fold_in(jax.random.key(run.config.seed), 0)
  state = steps_lib.create_train_state(key, run.model, run.data.image_shape,
                                       _optimizer(run))
  return placement.replicate(state)


def restore_target(run: Run, placement: placement_lib.Placement,
                   has_checkpoints: bool):
  """What `workdirs.restore_latest` restores into: with checkpoints, the state's shapes
  alone (a resume computes no initial state, nor loads its program); without, the
  initial state, which it returns as the state at step 0."""
  if has_checkpoints:
    return steps_lib.train_state_shapes(run.model, run.data.image_shape,
                                        _optimizer(run), placement.replicated)
  return initial_state(run, placement)
