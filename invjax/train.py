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
from invjax import errors
from invjax import input_pipeline
from invjax import metrics_io
from invjax import models
from invjax import run_card
from invjax import steps as steps_lib
from invjax import workdir_lock

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
  problems = []
  want = tuple(config.get("image_shape") or ())
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
  if config.get("num_classes") and data.num_classes != config.num_classes:
    problems.append(f"config.num_classes={config.num_classes} but {data.name} has "
                  f"{data.num_classes} classes; set --config.num_classes="
                  f"{data.num_classes} (or 0 to accept any) if that data is what you mean.")
  if len(data.x_train) < config.batch_size:
    problems.append(f"config.batch_size={config.batch_size} exceeds the "
                  f"{len(data.x_train)} training images of {data.name}.")
  seeds = config.batch_size // max(config.copies, 1)
  spd = config.get("steps_per_dispatch", 1)
  if spd * seeds > len(data.x_train):
    problems.append(f"config.steps_per_dispatch={spd} steps of {seeds} seed images "
                  f"read more than the {len(data.x_train)} training images of "
                  f"{data.name} (one pass); set it to at most "
                  f"{max(1, len(data.x_train) // seeds)}.")
  if problems:
    raise errors.DataError("the data do not fit the configuration (or each other):\n  " +
                     "\n  ".join(problems))


def build(config, data: input_pipeline.Dataset | None = None) -> Run:
  """Checks the config, loads the data and builds the model. No compilation."""
  config_lib.validate(config, jax.device_count())
  data = data if data is not None else input_pipeline.load(config)
  check_data(config, data)
  n = len(data.x_train)
  try:
    model = create_model(config, data.num_classes)
    layer_shapes = models.layer_shapes(model, data.image_shape)
    param_count = models.param_count(model, data.image_shape)
  except ValueError as e:  # the models' own checks (e.g. depth 6n + 4)
    raise errors.ConfigError(str(e)) from e
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
PERFORMANCE_FIELDS = ("data_on_device", "steps_per_dispatch", "time_limit_minutes")
# Fields that say when to stop or what to keep, not what a step computes; a workdir
# saved without them (an older run) resumes with their defaults.
SAFETY_FIELDS = ("keep_checkpoints", "divergence_factor", "stop_dead_network")


def config_diff(config, workdir: str) -> dict[str, tuple[Any, Any]]:
  """{field: (saved, given)} where `config` differs from the workdir's config.json
  (PERFORMANCE_FIELDS and SAFETY_FIELDS aside); {} where there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      saved = _flat_config(json.load(f))
  except (OSError, ValueError) as e:
    raise errors.WorkdirError(f"{path} cannot be read ({type(e).__name__}: {e}); move "
                              "it away (or choose another --workdir).") from e
  given = _flat_config(json.loads(config.to_json_best_effort()))
  # A field added to invjax after the run was started, at its default, is no change.
  defaults = _default_fields()
  new_at_default = {k for k in given if k not in saved and k in defaults and
                    given[k] == defaults[k]}
  return {k: (saved.get(k), given.get(k)) for k in sorted(set(saved) | set(given))
          if saved.get(k) != given.get(k) and k not in PERFORMANCE_FIELDS + SAFETY_FIELDS
          and k not in new_at_default}


def restore_latest(ckpts: checkpoints.Checkpoints, target, config, workdir: str):
  """(state, step) from the newest checkpoint that restores (`Checkpoints.
  restore_latest`); CheckpointError, saying whether the config or the checkpoints are
  to blame, where none does."""
  try:
    return ckpts.restore_latest(target)
  except Exception as e:  # pylint: disable=broad-except
    steps = ckpts.manager.all_steps()
    ckpts.close()
    diff = {k: v for k, v in config_diff(config, workdir).items()
            if not k.startswith("analysis.")}
    reason = checkpoints.short_reason(e)
    if diff:
      fields = ", ".join(f"{k} (saved {a!r}, given {b!r})" for k, (a, b) in
                         list(diff.items())[:5])
      raise errors.CheckpointError(
          f"the checkpoints in {ckpts.directory} (steps {list(steps)}) do not fit the "
          f"model of this config, which differs from the run's "
          f"{os.path.join(workdir, CONFIG_FILE)} in: {fields}. Use the config that "
          f"trained it (--mode=analyze without --config does). [{reason}]") from e
    raise errors.CheckpointError(
        f"none of the checkpoints in {ckpts.directory} (steps {list(steps)}) restores "
        f"into the model of the run's own config: they are damaged [{reason}]. Move "
        "them away to train from the start (or put back a copy).") from e


def check_workdir_config(config, workdir: str, allow_change: bool = False) -> None:
  """Refuses to resume a workdir that was started with a different configuration
  (PERFORMANCE_FIELDS aside)."""
  diff = config_diff(config, workdir)
  if diff and not allow_change:
    lines = "\n".join(f"  {k}: saved {a!r}, given {b!r}" for k, (a, b) in diff.items())
    raise errors.ConfigError(
        f"{workdir} holds a run with another configuration:\n{lines}\n"
        "Use a new --workdir (or delete this one) to start fresh, or pass "
        "--allow_config_change to resume with the new values.")


def load_config(workdir: str):
  """The configuration a workdir's run was started with."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise errors.RunNotFound(f"{path} does not exist: {workdir} holds no run (train it "
                             "first, or give the --workdir of a trained run).")
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise errors.RunNotFound(f"{path} cannot be read ({type(e).__name__}: {e}); give "
                             "--config (the config file the run was trained with).") from e
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


class TestBatches:
  """The test images as padded batches of one shape (eval_batch_size rounded down to a
  multiple of the device count), split over the devices. With `on_device`, they are
  sent once and kept there: an evaluation then moves nothing but its sums."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
               placement: Placement, on_device: bool = False):
    n_dev = jax.device_count()
    self.batch_size = max(n_dev, batch_size - batch_size % n_dev)
    self.placement = placement
    self.host = [pad_batch(images[start:start + self.batch_size],
                           labels[start:start + self.batch_size], self.batch_size)
                 for start in range(0, len(images), self.batch_size)]
    self.device = ([self._put(b) for b in self.host] if on_device else None)

  def _put(self, batch):
    return tuple(self.placement.shard(a) for a in batch)

  def __iter__(self):
    return iter(self.device) if self.device is not None else map(self._put, self.host)


def rates_of(batch_sums: list) -> dict[str, float]:
  """`rates` of the totals of per-batch `steps.classification_sums` (on the device:
  fetched at once, one wait for the device)."""
  totals: dict[str, float] = {}
  for out in jax.device_get(batch_sums):
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return rates(totals)


def evaluate_batches(eval_step, state, batches: TestBatches) -> dict[str, float]:
  """Accuracy (top-1, and top-5 if the step computes it) and loss over `batches`: every
  batch is dispatched, then all sums are fetched at once."""
  return rates_of([eval_step(state, x, y, mask) for x, y, mask in batches])


# A network whose class scores differ by at most this much (relative to their size)
# between the probe images gives one answer for every input: it has died.
DEAD_SPREAD = 1e-6


def _class_score_spread(state, images) -> jax.Array:
  """How much the eval-mode class scores differ between `images` (uint8), relative to
  their size: max |logits_i - logits_0| / (1 + max |logits|). 0 for a dead network; 1
  (never dead) if the images themselves are all the same."""
  logits = steps_lib.eval_logits(state, steps_lib.to_float(images)).astype(jnp.float32)
  spread = jnp.max(jnp.abs(logits - logits[:1])) / (1.0 + jnp.max(jnp.abs(logits)))
  same_images = jnp.all(images == images[:1])
  return jnp.where(same_images, 1.0, spread)


def divergence_limit(config, num_classes: int) -> float:
  """The cross-entropy above which a step counts as diverged: config.divergence_factor
  times ln(num_classes), the cross-entropy of a uniform guess (ln 2 at least); inf when
  the factor is 0. A healthy run starts near ln(num_classes) and goes down."""
  factor = config.get("divergence_factor", 10.0)
  return factor * max(np.log(num_classes), np.log(2)) if factor else np.inf


def _summarize(pending: list[tuple[int, dict]], ce_limit: float = np.inf,
               last_saved: int | None = None) -> dict[str, float]:
  """Means of the metrics of the steps run since the last summary.

  `pending` holds (first step, {name: [S] values}) per program run. Raises
  DivergenceError naming the first step whose terms were not finite or whose
  cross-entropy exceeded `ce_limit` (`divergence_limit`).
  """
  fetched = jax.device_get(pending)
  kept = ("there is none before it either" if last_saved is None else
          f"the last good one (step {last_saved}) is kept")
  for step0, metrics in fetched:
    bad = {k: np.flatnonzero(~np.isfinite(np.asarray(v))) for k, v in metrics.items()}
    first = min((int(i[0]) for i in bad.values() if len(i)), default=None)
    ce = np.asarray(metrics["cross_entropy"]).reshape(-1)
    over = np.flatnonzero(np.isfinite(ce) & (ce > ce_limit))
    if len(over) and (first is None or over[0] < first):
      raise errors.DivergenceError(
          f"training diverged at step {step0 + int(over[0]) + 1}: cross_entropy "
          f"{ce[over[0]]:.4g} > {ce_limit:.3g} (config.divergence_factor x ln of the "
          f"number of classes, the loss of a uniform guess). No checkpoint was written "
          f"after it; {kept}. Lower config.learning_rate (or set "
          "config.divergence_factor=0 to go on).")
    if first is not None:
      terms = [k for k, i in bad.items() if first in i]
      raise errors.DivergenceError(
          f"non-finite training loss at step {step0 + first + 1}: {', '.join(terms)} "
          f"(terms: cross_entropy, inv_loss/<layer>). No checkpoint was written after "
          f"it; {kept}. Lower config.learning_rate or check the data.")
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

  def __init__(self, run: Run, placement: Placement, state, single: bool = True):
    """`single=False` leaves out the 1-step program, for runs whose every stop (log,
    evaluation, checkpoint, end, resume point) is a multiple of steps_per_dispatch."""
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
    for size in sorted({1 if single else self.steps_per_dispatch,
                        self.steps_per_dispatch}):
      self._compile(state, size)

  def _compile(self, state, size: int) -> None:
    t = time.perf_counter()
    fn = steps_lib.make_train_chunk(self.run.step_config, size, self.k,
                                    self.placement.batch, data_on_device=self.on_device,
                                    unroll=jax.default_backend() == "cpu")
    jitted = jax.jit(fn, donate_argnums=0,
                     out_shardings=(self.placement.replicated, self.placement.replicated))
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
    if size not in self.compiled:  # a stop off the multiples (not expected)
      logging.warning("compiling the %d-step program inside the loop", size)
      self._compile(state, size)
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


class Deadline:
  """`config.time_limit_minutes`: predicts, from the measured time per step, whether
  the next program and a checkpoint after it still end within the limit.

  The limit counts from the start of `train_and_evaluate` (data, compilation
  included). Steps run asynchronously, so the time per step is measured only at points
  where the device is known to have finished a step (`observe`: after a wait on its
  results); the loop waits for one at least every `sync_every` seconds. The time per
  step is averaged over the loop so far, evaluations, logs and checkpoints included.
  The reserve for the final save is 1.5 x the longest save seen (before one is seen:
  5 % of the limit, at most 10 s).
  """

  def __init__(self, limit_minutes: float, t0: float):
    self.limit_s = 60.0 * float(limit_minutes or 0.0)
    self.end = t0 + self.limit_s
    self.sync_every = min(30.0, max(1.0, 0.02 * self.limit_s))
    self.mark = None  # (step, time) at the start of the loop
    self.last = None  # the latest (step, time) the device had finished
    self.save_seconds = None

  @property
  def active(self) -> bool:
    return self.limit_s > 0

  def start(self, step: int, t: float) -> None:
    self.mark = self.last = (step, t)

  def observe(self, step: int, t: float) -> None:
    self.last = (step, t)

  def observe_save(self, seconds: float) -> None:
    self.save_seconds = max(seconds, self.save_seconds or 0.0)

  def needs_sync(self, t: float) -> bool:
    return (self.active and self.last is not None and
            (self.last[0] == self.mark[0] or t - self.last[1] >= self.sync_every))

  def seconds_per_step(self) -> float | None:
    if self.mark is None or self.last[0] <= self.mark[0]:
      return None
    return (self.last[1] - self.mark[1]) / (self.last[0] - self.mark[0])

  def reserve(self) -> float:
    if self.save_seconds is not None:
      return 1.5 * self.save_seconds
    return min(10.0, 0.05 * self.limit_s)

  def should_stop(self, dispatched: int, next_steps: int, t: float) -> bool:
    """Whether to stop after step `dispatched` (the last one handed to the device)
    rather than run `next_steps` more: True if those would end past the limit, the
    final save included."""
    if not self.active:
      return False
    per_step = self.seconds_per_step()
    if per_step is None:
      return t + self.reserve() >= self.end
    queue_done = max(t, self.last[1] + (dispatched - self.last[0]) * per_step)
    return queue_done + next_steps * per_step + self.reserve() > self.end


# The loop --------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str, allow_config_change: bool = False,
                       data: input_pipeline.Dataset | None = None,
                       tensorboard: bool = True) -> dict[str, Any]:
  """Trains the run of `config` in `workdir`, resuming from its latest checkpoint.

  Returns the final test metrics and where training stands: {"step", "finished",
  "stopped", "accuracy", ...}. A SIGTERM from here on (while compiling too) saves a
  checkpoint after the step in progress and exits with status 143; a rerun resumes.
  With `config.time_limit_minutes`, a run that would pass the limit saves a checkpoint
  and returns early with "finished": False, "stopped": "time_limit" (the test metrics
  are then those of the last evaluation, if any). Every start adds a session to the
  run card, WORKDIR/run_card.json (see `invjax.run_card`), and writes the weights it
  ends with to WORKDIR/weights.npz.
  """
  timer = run_card.Timer()
  with _Preemption() as preempt:
    return _train(config, workdir, allow_config_change, data, preempt, tensorboard,
                  timer)


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir if needed; refuses one that cannot be written."""
  if "://" in workdir:
    raise errors.WorkdirError(
        f"--workdir={workdir}: invjax writes its workdir through the file system; "
        "mount the bucket (e.g. gcsfuse BUCKET /mnt/BUCKET) and give the mounted path.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.WorkdirError(f"--workdir={workdir} cannot be created ({e.strerror}); "
                              "choose another.") from e
  if not os.access(workdir, os.W_OK):
    raise errors.WorkdirError(f"--workdir={workdir} cannot be written; choose another.")
  distributed.check_shared_directory(workdir)


def lock_workdir(workdir: str, what: str) -> workdir_lock.WorkdirLock | None:
  """The workdir's lock, held by process 0 (None in the others); refuses a workdir
  that another run is writing (`workdir_lock`)."""
  lock, busy = None, None
  if distributed.is_primary():
    lock = workdir_lock.WorkdirLock(workdir, what)
    try:
      lock.acquire()
    except workdir_lock.WorkdirBusy as e:
      lock, busy = None, str(e)
  # Every process stops together (the others would wait for process 0 at a collective).
  if distributed.any_process(busy is not None):
    raise errors.WorkdirError(busy or f"--workdir={workdir} is in use by another run "
                              "(process 0 of this run found its lock held).")
  return lock


def _train(config, workdir, allow_config_change, data, preempt, tensorboard,
           timer) -> dict[str, Any]:
  config_lib.validate(config, jax.device_count())  # before the workdir is touched
  prepare_workdir(workdir)
  lock = lock_workdir(workdir, "train")
  try:
    return _train_locked(config, workdir, allow_config_change, data, preempt,
                         tensorboard, timer)
  finally:
    if lock is not None:
      lock.release()


def _train_locked(config, workdir, allow_config_change, data, preempt, tensorboard,
                  timer) -> dict[str, Any]:
  started = run_card.now_iso()
  with timer.section("startup"):
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
    state, start = restore_latest(ckpts, state, config, workdir)
    if start:
      logging.info("resumed from step %d", start)
    save_config(config, workdir)
    log = metrics_io.MetricsLog(workdir, resume_step=start,
                                enabled=distributed.is_primary(),
                                tensorboard=tensorboard)
    progress = metrics_io.Progress(run.total_steps, log)

  ckpt_every = config.checkpoint_every_steps or run.steps_per_epoch
  eval_every = max(1, int(round(config.eval_every_epochs * run.steps_per_epoch)))
  log_every = config.log_every_steps
  spd = int(config.get("steps_per_dispatch", 1))
  programs = TrainPrograms(run, placement, state, single=any(
      n % spd for n in (start, run.total_steps, ckpt_every, eval_every, log_every)))
  timer.add("compile", sum(programs.compile_seconds.values()))
  with timer.section("startup"):
    test_batches = TestBatches(data.x_test, data.y_test, config.eval_batch_size,
                               placement, on_device=programs.on_device)
    probe_key = jax.random.fold_in(jax.random.key(config.seed), 2)
    probe_idx = np.random.default_rng([config.seed, 2]).choice(
        len(data.x_train), min(config.probe_seeds, len(data.x_train)), replace=False)
    probe_seeds = data.x_train[np.sort(probe_idx)]
    # Split over the devices where it divides, else on each: the same probe at any
    # scale.
    probe_seeds = (placement.shard(probe_seeds)
                   if len(probe_seeds) % jax.device_count() == 0
                   else placement.replicate(probe_seeds))
  with timer.section("compile"):
    # Sums and scalars come back replicated: every process can read them.
    eval_step = jax.jit(steps_lib.make_eval_step(cfg.top5),
                        out_shardings=placement.replicated).lower(
                            state, *next(iter(test_batches))).compile()
    probe_step = jax.jit(steps_lib.make_probe_step(cfg, config.probe_copies),
                         out_shardings=placement.replicated).lower(
                             state, probe_seeds, probe_key).compile()
  logging.info("compiled the training program%s in %.1f s; training set %s",
               f" ({programs.steps_per_dispatch} steps per dispatch)"
               if programs.steps_per_dispatch > 1 else "",
               sum(programs.compile_seconds.values()),
               "on the device" if programs.on_device else "read from the host")

  spe = run.steps_per_epoch
  lrs = np.asarray(jax.device_get(jax.vmap(run.lr_fn)(jnp.arange(run.total_steps))))
  state_finite = jax.jit(lambda st: jnp.all(jnp.stack([
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((st.params, st.batch_stats,
                                                         st.opt_state))
      if jnp.issubdtype(x.dtype, jnp.floating)])), out_shardings=placement.replicated)
  ce_limit = divergence_limit(config, data.num_classes)
  dead_check = (jax.jit(_class_score_spread, out_shardings=placement.replicated)
                if config.get("stop_dead_network", True) else None)
  last_saved = start or None

  def check_alive(step, spread):
    """Stops a run whose network has died (`spread`, of `_class_score_spread`, at
    most DEAD_SPREAD), before it is checkpointed."""
    if not spread <= DEAD_SPREAD:  # NaN too: the non-finite checks name it
      return
    kept = ("it was not checkpointed, nor was anything before it" if last_saved is None
            else f"it was not checkpointed; the last good checkpoint (step "
            f"{last_saved}) is kept")
    raise errors.DivergenceError(
        f"training diverged at step {step}: the network is dead, its class scores "
        f"are the same for every probe image (spread {spread:.2g}), so it gives one "
        f"answer whatever the input; {kept}. Lower config.learning_rate (or set "
        "config.stop_dead_network=False to go on).")

  deadline = Deadline(config.get("time_limit_minutes", 0.0), timer.t0)

  # Log points are written one behind: a log point's metrics and probe stay on the
  # device until the next log point (or a checkpoint, evaluation or the end), so the
  # host never waits for the device at a log point and the device never idles.
  # (step, [(step0, metrics)], probe, the class-score spread of the dead-network check)
  queued: list[tuple[int, list, Any, Any]] = []
  written = {"step": start, "time": time.perf_counter()}

  def write_queued(keep: int = 0):
    """Writes all queued log points but the newest `keep`, waiting for their values."""
    while len(queued) > keep:
      step, chunks, probe, spread = queued.pop(0)
      jax.block_until_ready((chunks, probe))  # the steps' time, not the log's
      now = time.perf_counter()
      deadline.observe(step, now)
      with timer.section("log"):
        if chunks:  # raises DivergenceError on a non-finite or diverged loss
          summary = _summarize(chunks, ce_limit, last_saved)
          log.write(step, {f"train/{name}": v for name, v in summary.items()} | {
              "lr": float(lrs[step - 1]), "epoch": step / spe,
              "steps_per_sec": (step - written["step"]) /
                               max(now - written["time"], 1e-9)})
        log.write(step, {f"probe/inv_loss/{name}": v
                         for name, v in jax.device_get(probe).items()} |
                  {"epoch": step / spe})
      written.update(step=step, time=now)
      if spread is not None:
        check_alive(step, float(jax.device_get(spread)))

  def save(step):
    nonlocal last_saved
    # Raises on a non-finite or diverged loss, or a dead network, before anything is
    # saved (a checkpoint step is always a log point).
    write_queued()
    jax.block_until_ready(state)
    deadline.observe(step, time.perf_counter())
    with timer.section("checkpoint"):
      t = time.perf_counter()
      if not bool(state_finite(state)):  # the loss was finite, the update was not
        raise errors.DivergenceError(
            f"the train state became non-finite at or before step {step} (the "
            "losses were finite): not checkpointed; the last good checkpoint is "
            "kept. Lower config.learning_rate.")
      ckpts.save(step, state, force=True)
      last_saved = step
      deadline.observe_save(time.perf_counter() - t)

  done = start
  stopped = "error"
  test = {}
  t_loop = time.perf_counter()
  try:
    if start == 0:  # Figure 5 starts at the initialisation
      queued.append((0, [], probe_step(state, probe_seeds, probe_key), None))
    deadline.start(start, time.perf_counter())
    pending: list[tuple[int, dict]] = []
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
      time_up = False
      if deadline.active and not last:
        now = time.perf_counter()
        if deadline.needs_sync(now):
          jax.block_until_ready(metrics)
          now = time.perf_counter()
          deadline.observe(done, now)
        time_up = deadline.should_stop(done, programs.steps_per_dispatch, now)
      stop = preempt.requested or time_up
      if jax.process_count() > 1:
        # Whether to stop must be agreed, since saving is collective: processes
        # compare their SIGTERM and time-limit flags at each log or checkpoint step
        # (one tiny collective each), so a stop comes at the next such step.
        stop = at_log and distributed.any_process(stop)
        time_up = stop and not preempt.requested
      if at_log or stop:
        queued.append((done, pending, probe_step(state, probe_seeds, probe_key),
                       None if dead_check is None else dead_check(state, probe_seeds)))
        pending = []
        write_queued(keep=1)
      # The checkpoint comes before the evaluation: a failing evaluation loses nothing.
      if at_ckpt or stop:
        save(done)
      if done % eval_every == 0 or last:
        write_queued()
        jax.block_until_ready(state)
        with timer.section("evaluation"):
          test = evaluate_batches(eval_step, state, test_batches)
        deadline.observe(done, time.perf_counter())
        log.write(done, {f"test/{k}": v for k, v in test.items()} | {"epoch": done / spe})
        logging.info("step %d (epoch %.1f): test accuracy %.4f", done, done / spe,
                     test["accuracy"])
      if stop and not last:
        if preempt.requested:
          stopped = "sigterm"
          logging.warning("stopped at step %d after SIGTERM; rerun to resume", done)
          raise SystemExit(143)
        stopped = "time_limit"
        logging.warning(
            "time limit: stopped at step %d of %d after %.1f of the %g minutes "
            "allowed (config.time_limit_minutes), with a checkpoint; rerun the same "
            "command to resume.", done, run.total_steps, timer.elapsed() / 60,
            config.time_limit_minutes)
        break
    write_queued()
    if done == run.total_steps:
      stopped = "finished"
      if not test:  # resumed a finished run
        with timer.section("evaluation"):
          test = evaluate_batches(eval_step, state, test_batches)
  finally:  # also on an error or SIGTERM: saves in flight are finished, not lost
    close_error = None
    try:
      with timer.section("checkpoint"):
        ckpts.close()  # waits for saves in flight
    except BaseException as e:  # pylint: disable=broad-except
      close_error, stopped = e, "error"
    finally:
      log.close()
    end = done if stopped != "error" else (last_saved or start)
    loop = time.perf_counter() - t_loop
    timer.add("train", max(0.0, loop - sum(timer.seconds[k] for k in
                                           ("evaluation", "log", "checkpoint"))))
    if distributed.is_primary():
      _finish_session(workdir, run, config, state, timer, started, start, end,
                      stopped)
    if close_error is not None:
      raise close_error
  return {"step": done, "finished": done == run.total_steps, "stopped": stopped, **test}


def _finish_session(workdir, run, config, state, timer, started, start, end,
                    stopped) -> None:
  """Writes the weights the session ends with (unless it failed) and its run card
  entry. After an error, a failure here is logged, not raised over the error."""
  try:
    if stopped != "error":
      checkpoints.save_weights(os.path.join(workdir, checkpoints.WEIGHTS_FILE),
                               state, end)
    card = run_card.read(workdir)
    if end == start and card and card.get("finished"):
      return  # a rerun of a finished run: nothing to add
    card = run_card.add_session(
        workdir, total_steps=run.total_steps, start_step=start, end_step=end,
        stopped=stopped, timer=timer, started=started,
        time_limit_minutes=float(config.get("time_limit_minutes", 0.0)))
    logging.info("run card: %s", run_card.describe(card))
  except Exception:  # pylint: disable=broad-except
    if stopped != "error":
      raise
    logging.exception("could not write the run card of %s", workdir)
