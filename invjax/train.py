"""One training run, top to bottom: data, model, state, the step loop, checkpoints.

`train_and_evaluate(config, workdir)` trains (or resumes) the run in `workdir`. The
workdir ends up holding config.json, metrics.jsonl, tensorboard/ and checkpoints/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from invjax import augment
from invjax import checkpoints
from invjax import config_lib
from invjax import distributed
from invjax import input_pipeline
from invjax import metrics_io
from invjax import models
from invjax import steps as steps_lib

CONFIG_FILE = "config.json"


# Devices -------------------------------------------------------------------------

@dataclasses.dataclass
class Placement:
  """The data-parallel mesh over every device of every process: batches split over
  axis "data", the state replicated.

  Each process holds the same host data (the whole data set) but sends only its share
  of a batch, the rows its own devices hold (`local_rows`), and the global array is
  built from the processes' shares with `jax.make_array_from_process_local_data`. With
  one process the share is the whole batch.
  """
  mesh: jax.sharding.Mesh

  def __post_init__(self):
    self._rows: dict[int, np.ndarray] = {}

  @classmethod
  def create(cls) -> "Placement":
    # Auto axes: XLA propagates the batch sharding through the step (GSPMD).
    return cls(jax.make_mesh((jax.device_count(),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,)))

  @property
  def batch(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

  @property
  def replicated(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @property
  def stacked_batch(self):
    """Several steps' batches [S, K, ...]: split over devices along K."""
    return jax.sharding.NamedSharding(self.mesh,
                                      jax.sharding.PartitionSpec(None, "data"))

  def local_rows(self, n: int) -> np.ndarray:
    """The rows of a global batch of `n` that this process's devices hold, in the
    order `make_array_from_process_local_data` expects (ascending; all of them with
    one process)."""
    if n not in self._rows:
      if n % self.mesh.size:
        raise ValueError(f"a batch of {n} does not split over {self.mesh.size} "
                         "devices; pad it to a multiple.")
      spans = sorted({(ix[0].start or 0, n if ix[0].stop is None else ix[0].stop)
                      for ix in self.batch.addressable_devices_indices_map(
                          (n,)).values()})
      self._rows[n] = np.concatenate([np.arange(a, b) for a, b in spans])
    return self._rows[n]

  def shard(self, x: np.ndarray) -> jax.Array:
    """A global host batch (the same in every process) -> a global array split over
    the devices along axis 0; this process sends only its own rows."""
    return jax.make_array_from_process_local_data(
        self.batch, x[self.local_rows(len(x))], x.shape)

  def replicate(self, tree):
    """Host values (or arrays fetched to the host) -> copies on every device."""
    return jax.device_put(jax.device_get(tree), self.replicated)


# Pieces of a run -------------------------------------------------------------------

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


def create_model(config, num_classes: int):
  """The model the config names, for `num_classes` classes."""
  return models.create(
      config.model.name, num_classes,
      dtype=jnp.bfloat16 if config.get("half_precision") else jnp.float32,
      **{k: v for k, v in config.model.items() if k != "name"})


def check_data(config, data: input_pipeline.Dataset) -> None:
  """The data against what the config says it must be (config.image_shape etc.)."""
  errors = []
  want = tuple(config.get("image_shape") or ())
  if want and tuple(data.image_shape) != want:
    errors.append(f"config.image_shape={want} but {data.name} has images of shape "
                  f"{tuple(data.image_shape)}; set --config.image_shape="
                  f"'{tuple(data.image_shape)}' (or '()' to accept any) if that data is "
                  "what you mean.")
  if config.get("num_classes") and data.num_classes != config.num_classes:
    errors.append(f"config.num_classes={config.num_classes} but {data.name} has "
                  f"{data.num_classes} classes; set --config.num_classes="
                  f"{data.num_classes} (or 0 to accept any) if that data is what you mean.")
  if len(data.x_train) < config.batch_size:
    errors.append(f"config.batch_size={config.batch_size} exceeds the "
                  f"{len(data.x_train)} training images of {data.name}.")
  seeds = config.batch_size // max(config.copies, 1)
  spd = config.get("steps_per_dispatch", 1)
  if spd * seeds > len(data.x_train):
    errors.append(f"config.steps_per_dispatch={spd} steps of {seeds} seed images "
                  f"read more than the {len(data.x_train)} training images of "
                  f"{data.name} (one pass); set it to at most "
                  f"{max(1, len(data.x_train) // seeds)}.")
  if errors:
    raise ValueError("the data do not match the configuration:\n  " +
                     "\n  ".join(errors))


def build(config, data: input_pipeline.Dataset | None = None) -> Run:
  """Checks the config, loads the data and builds the model. No compilation."""
  config_lib.validate(config, jax.device_count())
  data = data if data is not None else input_pipeline.load(config)
  check_data(config, data)
  n = len(data.x_train)
  model = create_model(config, data.num_classes)
  layer_shapes = models.layer_shapes(model, data.image_shape)
  param_count = models.param_count(model, data.image_shape)
  steps_per_epoch = n // config.batch_size
  total_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
  lr_fn = steps_lib.create_learning_rate_fn(
      config.learning_rate, config.lr_boundaries, config.lr_decay, steps_per_epoch)
  step_config = steps_lib.StepConfig(
      copies=config.copies, alpha=config.alpha, alpha_ratio=config.alpha_ratio,
      loss_method=config.loss_method,
      ranges=augment.AugmentRanges.from_config(config.augment),
      num_layers=len(layer_shapes), top5=data.num_classes > 10,
      weight_law=config.layer_weight_law, class_alpha=config.class_alpha)
  return Run(config, data, model, step_config, steps_per_epoch, total_steps, lr_fn,
             layer_shapes, param_count)


def initial_state(run: Run, placement: Placement) -> steps_lib.TrainState:
  tx = steps_lib.create_optimizer(run.lr_fn, run.config.momentum, run.config.nesterov)
  key = jax.random.fold_in(jax.random.key(run.config.seed), 0)
  state = steps_lib.create_train_state(key, run.model, run.data.image_shape, tx)
  return placement.replicate(state)


def _flat_config(d, prefix=""):
  """{"a.b": value} of a config read back from JSON (tuples are lists on both sides)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _default_fields():
  """{"a.b": default} of every field of config_lib.base_config()."""
  return _flat_config(json.loads(config_lib.base_config().to_json_best_effort()))


# Fields that change how fast a run goes, not what it computes (tested): a run may be
# resumed with other values, e.g. on another machine.
PERFORMANCE_FIELDS = ("data_on_device", "steps_per_dispatch")


def check_workdir_config(config, workdir: str, allow_change: bool = False) -> None:
  """Refuses to resume a workdir that was started with a different configuration
  (PERFORMANCE_FIELDS aside)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _flat_config(json.load(f))
  given = _flat_config(json.loads(config.to_json_best_effort()))
  # A field added to invjax after the run was started, at its default, is no change.
  defaults = _default_fields()
  new_at_default = {k for k in given if k not in saved and k in defaults and
                    given[k] == defaults[k]}
  diff = {k: (saved.get(k), given.get(k)) for k in sorted(set(saved) | set(given))
          if saved.get(k) != given.get(k) and k not in PERFORMANCE_FIELDS and
          k not in new_at_default}
  if diff and not allow_change:
    lines = "\n".join(f"  {k}: saved {a!r}, given {b!r}" for k, (a, b) in diff.items())
    raise ValueError(
        f"{workdir} holds a run with another configuration:\n{lines}\n"
        "Use a new --workdir (or delete this one) to start fresh, or pass "
        "--allow_config_change to resume with the new values.")


def load_config(workdir: str):
  """The configuration a workdir's run was started with."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: {workdir} holds no run.")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  # Fields added to invjax after the run was started take their defaults.
  for field, value in _default_fields().items():
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    if leaf not in node:
      node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def save_config(config, workdir: str) -> None:
  if distributed.is_primary():
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


# Evaluation ------------------------------------------------------------------------

def pad_batch(x: np.ndarray, y: np.ndarray, size: int):
  """(x, y, mask) padded with zeros to `size` rows; mask is 1.0 for the real rows."""
  pad = size - len(x)
  mask = (np.arange(size) < len(x)).astype(np.float32)
  if pad:
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
  return x, y, mask


def rates(sums: dict[str, float]) -> dict[str, float]:
  """Accuracy, cross-entropy (and top-5) from `steps.classification_sums` totals."""
  out = {"accuracy": sums["correct"] / sums["count"],
         "cross_entropy": sums["cross_entropy"] / sums["count"]}
  if "correct5" in sums:
    out["top5"] = sums["correct5"] / sums["count"]
  return out


def evaluate(eval_step, state, images: np.ndarray, labels: np.ndarray,
             batch_size: int, placement: Placement) -> dict[str, float]:
  """Test-set accuracy (top-1, and top-5 if the step computes it) and loss."""
  n_dev = jax.device_count()
  batch_size = max(n_dev, batch_size - batch_size % n_dev)
  totals: dict[str, float] = {}
  for start in range(0, len(images), batch_size):
    # The last batch is padded: one compiled shape.
    x, y, mask = pad_batch(images[start:start + batch_size],
                           labels[start:start + batch_size], batch_size)
    out = eval_step(state, placement.shard(x), placement.shard(y), placement.shard(mask))
    for k, v in jax.device_get(out).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return rates(totals)


def _summarize(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """Means of the metrics of the steps run since the last summary.

  `pending` holds (first step, {name: [S] values}) per program run. Raises
  FloatingPointError naming the first step and the terms that were not finite.
  """
  fetched = jax.device_get(pending)
  for step0, metrics in fetched:
    bad = {k: np.flatnonzero(~np.isfinite(np.asarray(v))) for k, v in metrics.items()}
    first = min((int(i[0]) for i in bad.values() if len(i)), default=None)
    if first is not None:
      terms = [k for k, i in bad.items() if first in i]
      raise FloatingPointError(
          f"non-finite training loss at step {step0 + first + 1}: {', '.join(terms)} "
          "(terms: cross_entropy, inv_loss/<layer>). No checkpoint was written after "
          "it; the last good one is kept. Lower config.learning_rate or check the data.")
  names = fetched[0][1]
  return {k: float(np.mean(np.concatenate([np.atleast_1d(m[k]) for _, m in fetched])))
          for k in names}


def data_fits_on_device(data: input_pipeline.Dataset, fraction: float = 0.5) -> bool:
  """Whether the training set takes at most `fraction` of one device's memory (True
  where the device does not say, e.g. on CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return not limit or data.x_train.nbytes + data.y_train.nbytes <= fraction * limit


class TrainPrograms:
  """The run's training programs, compiled ahead of time, and how to call them.

  A program runs S steps (`config.steps_per_dispatch`) in one dispatch; a 1-step
  program fills the gaps up to log, evaluation and checkpoint steps. Both are compiled
  before the first step (`compiled[S]`; `compile_seconds[S]` says how long) and called as
  compiled executables, which refuse arguments of other shapes or shardings rather
  than recompiling: nothing compiles inside the step loop.

  With the training set on the device (`config.data_on_device`, the default where it
  fits), each step gathers its seeds there from the epoch's permutation; otherwise the
  host gathers each program's batches and sends them.
  """

  def __init__(self, run: Run, placement: Placement, state):
    config, data = run.config, run.data
    self.run, self.placement = run, placement
    self.k = config.batch_size // config.copies
    self.steps_per_dispatch = int(config.get("steps_per_dispatch", 1))
    self.on_device = bool(config.get("data_on_device", True))
    if self.on_device and not data_fits_on_device(data):
      logging.warning("the training set (%.1f GB) takes over half of a device's "
                      "memory: the host gathers the batches instead "
                      "(config.data_on_device=False).", data.x_train.nbytes / 1e9)
      self.on_device = False
    self.schedule = input_pipeline.SeedSchedule(len(data.x_train), self.k,
                                                config.seed, placement.replicated)
    self.aug_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    if self.on_device:
      self.x_train = placement.replicate(data.x_train)
      self.y_train = placement.replicate(data.y_train)
    self.compiled, self.compile_seconds = {}, {}
    for size in sorted({1, self.steps_per_dispatch}):
      t = time.perf_counter()
      fn = steps_lib.make_train_chunk(run.step_config, size, self.k, placement.batch,
                                      data_on_device=self.on_device,
                                      unroll=jax.default_backend() == "cpu")
      jitted = jax.jit(fn, donate_argnums=0,
                       out_shardings=(placement.replicated, placement.replicated))
      self.compiled[size] = jitted.lower(*self._args(state, 0, size)).compile()
      self.compile_seconds[size] = time.perf_counter() - t

  def _args(self, state, step0: int, size: int):
    if self.on_device:
      first, perms = self.schedule.window(step0, size)
      return (state, self.x_train, self.y_train, perms, np.int32(first),
              np.int32(step0), self.aug_key)
    # This process gathers only its own devices' seeds of each step.
    idx = self.schedule.host_indices(step0, size)
    local = idx[:, self.placement.local_rows(self.k)]
    data, shape = self.run.data, idx.shape
    put = lambda a: jax.make_array_from_process_local_data(
        self.placement.stacked_batch, a, (*shape, *a.shape[2:]))
    return (state, put(data.x_train[local]), put(data.y_train[local]), np.int32(step0),
            self.aug_key)

  def chunk_size(self, done: int, next_stop: int) -> int:
    """Steps to run from `done`: a whole program's if the next stop is that far."""
    return self.steps_per_dispatch if done + self.steps_per_dispatch <= next_stop else 1

  def __call__(self, state, step0: int, size: int):
    """(state after steps step0 .. step0 + size - 1, their metrics [size])."""
    return self.compiled[size](*self._args(state, step0, size))


def _next_multiple(done: int, every: int) -> int:
  return (done // every + 1) * every


class _Preemption:
  """Turns SIGTERM (how Cloud TPUs are preempted) into a checkpoint and a clean exit."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# The loop --------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str, allow_config_change: bool = False,
                       data: input_pipeline.Dataset | None = None,
                       tensorboard: bool = True) -> dict[str, Any]:
  """Trains the run of `config` in `workdir`, resuming from its latest checkpoint.

  Returns the final test metrics (e.g. {"accuracy": ..., "step": ...}). A SIGTERM from
  here on (while compiling too) saves a checkpoint after the step in progress and exits
  with status 143; a rerun resumes.
  """
  with _Preemption() as preempt:
    return _train(config, workdir, allow_config_change, data, preempt, tensorboard)


def _train(config, workdir, allow_config_change, data, preempt,
           tensorboard) -> dict[str, Any]:
  if "://" in workdir:
    raise ValueError(
        f"--workdir={workdir}: invjax writes its workdir through the file system; "
        "mount the bucket (e.g. gcsfuse BUCKET /mnt/BUCKET) and give the mounted path.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir} cannot be created ({e.strerror}); "
                          "choose another.") from e
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"--workdir={workdir} cannot be written; choose another.")
  distributed.check_shared_directory(workdir)
  run = build(config, data)
  check_workdir_config(config, workdir, allow_config_change)
  cfg = run.step_config
  placement = Placement.create()
  data = run.data
  num_seeds = config.batch_size // config.copies
  logging.info("%s on %s: %d train / %d test images, %d classes; %d seeds x %d copies "
               "per batch of %d; %d steps (%d per epoch); %d devices",
               config.model.name, data.name, len(data.x_train), len(data.x_test),
               data.num_classes, num_seeds, config.copies, config.batch_size,
               run.total_steps,
               run.steps_per_epoch, jax.device_count())

  state = initial_state(run, placement)
  ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
  state, start = ckpts.restore_latest(state)
  if start:
    logging.info("resumed from step %d", start)
  save_config(config, workdir)
  log = metrics_io.MetricsLog(workdir, resume_step=start,
                              enabled=distributed.is_primary(),
                              tensorboard=tensorboard)
  progress = metrics_io.Progress(run.total_steps, log)

  programs = TrainPrograms(run, placement, state)
  logging.info("compiled the training program%s in %.1f s; training set %s",
               f" ({programs.steps_per_dispatch} steps per dispatch)"
               if programs.steps_per_dispatch > 1 else "",
               sum(programs.compile_seconds.values()),
               "on the device" if programs.on_device else "read from the host")
  # Sums and scalars come back replicated: every process can read them.
  eval_step = jax.jit(steps_lib.make_eval_step(cfg.top5),
                      out_shardings=placement.replicated)
  probe_step = jax.jit(steps_lib.make_probe_step(cfg, config.probe_copies),
                       out_shardings=placement.replicated)

  probe_key = jax.random.fold_in(jax.random.key(config.seed), 2)
  probe_idx = np.random.default_rng([config.seed, 2]).choice(
      len(data.x_train), min(config.probe_seeds, len(data.x_train)), replace=False)
  probe_seeds = data.x_train[np.sort(probe_idx)]
  # Split over the devices where it divides, else on each: the same probe at any scale.
  probe_seeds = (placement.shard(probe_seeds)
                 if len(probe_seeds) % jax.device_count() == 0
                 else placement.replicate(probe_seeds))

  ckpt_every = config.checkpoint_every_steps or run.steps_per_epoch
  eval_every = max(1, int(round(config.eval_every_epochs * run.steps_per_epoch)))
  log_every = config.log_every_steps
  spe = run.steps_per_epoch
  lrs = np.asarray(jax.device_get(jax.vmap(run.lr_fn)(jnp.arange(run.total_steps))))
  state_finite = jax.jit(lambda st: jnp.all(jnp.stack([
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((st.params, st.batch_stats,
                                                         st.opt_state))
      if jnp.issubdtype(x.dtype, jnp.floating)])), out_shardings=placement.replicated)

  def log_probe(step):
    inv = jax.device_get(probe_step(state, probe_seeds, probe_key))
    log.write(step, {f"probe/inv_loss/{name}": v for name, v in inv.items()} |
              {"epoch": step / spe})

  if start == 0:
    log_probe(0)  # Figure 5 starts at the initialisation
  try:
    pending: list[tuple[int, dict]] = []
    t_log, s_log = time.time(), start
    test = {}
    done = start
    while done < run.total_steps:
      next_stop = min(run.total_steps, _next_multiple(done, log_every),
                      _next_multiple(done, ckpt_every), _next_multiple(done, eval_every))
      size = programs.chunk_size(done, next_stop)
      state, metrics = programs(state, done, size)
      pending.append((done, metrics))
      done += size
      last = done == run.total_steps
      at_ckpt = done % ckpt_every == 0 or last
      at_log = done % log_every == 0 or at_ckpt
      progress(done)
      stop = preempt.requested
      if jax.process_count() > 1:
        # Whether to stop must be agreed, since saving is collective: processes
        # compare their SIGTERM flags at each log or checkpoint step (one tiny
        # collective each), so a stop comes at the next such step.
        stop = at_log and distributed.any_process(preempt.requested)
      if at_log or stop:
        summary = _summarize(pending)
        pending = []
        now = time.time()
        log.write(done, {f"train/{name}": v for name, v in summary.items()} | {
            "lr": float(lrs[done - 1]), "epoch": done / spe,
            "steps_per_sec": (done - s_log) / max(now - t_log, 1e-9)})
        t_log, s_log = now, done
        log_probe(done)
      if done % eval_every == 0 or last:
        test = evaluate(eval_step, state, data.x_test, data.y_test,
                        config.eval_batch_size, placement)
        log.write(done, {f"test/{k}": v for k, v in test.items()} | {"epoch": done / spe})
        logging.info("step %d (epoch %.1f): test accuracy %.4f", done, done / spe,
                     test["accuracy"])
      if at_ckpt or stop:
        if not bool(state_finite(state)):  # the loss was finite, the update was not
          raise FloatingPointError(
              f"the train state became non-finite at or before step {done} (the "
              "losses were finite): not checkpointed; the last good checkpoint is "
              "kept. Lower config.learning_rate.")
        ckpts.save(done, state, force=True)
      if stop and not last:
        logging.warning("stopped at step %d after SIGTERM; rerun to resume", done)
        raise SystemExit(143)
    if not test:  # resumed a finished run
      test = evaluate(eval_step, state, data.x_test, data.y_test,
                      config.eval_batch_size, placement)
  finally:  # also on an error or SIGTERM: saves in flight are finished, not lost
    ckpts.close()
    log.close()
  return {"step": run.total_steps, **test}
