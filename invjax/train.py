"""One training run, top to bottom: build it, restore it, compile its programs, run
the step loop (log, checkpoint, evaluate, stop on SIGTERM or the time limit), finish.

`train_and_evaluate(config, workdir)` trains (or resumes) the run in `workdir`; the
workdir's layout is `workdirs`', the pieces a run is built of are `build`'s.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from invjax import build as build_lib
from invjax import checkpoints
from invjax import config_lib
from invjax import deadline as deadline_lib
from invjax import distributed
from invjax import divergence
from invjax import errors
from invjax import evaluation
from invjax import input_pipeline
from invjax import metrics_io
from invjax import placement as placement_lib
from invjax import programs as programs_lib
from invjax import run_card
from invjax import steps as steps_lib
from invjax import workdirs


def _next_multiple(done: int, every: int) -> int:
  return (done // every + 1) * every


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
  with deadline_lib.Preemption() as preempt:
    return _train(config, workdir, allow_config_change, data, preempt, tensorboard,
                  timer)


def _train(config, workdir, allow_config_change, data, preempt, tensorboard,
           timer) -> dict[str, Any]:
  config_lib.validate(config, jax.device_count())  # before the workdir is touched
  workdirs.prepare(workdir)
  lock = workdirs.lock(workdir, "train")
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
    run, placement, state, ckpts, start = _start(config, workdir, allow_config_change,
                                                 data)
    log = metrics_io.MetricsLog(workdir, resume_step=start,
                                enabled=distributed.is_primary(),
                                tensorboard=tensorboard)
    progress = metrics_io.Progress(run.total_steps, log)
  every = _Every.of(config, run)
  spd = run.steps_per_dispatch
  with timer.section("startup"):
    programs = programs_lib.TrainPrograms(run, placement, state, compile_now=False)
    test_batches = placement_lib.TestBatches(
        run.data.x_test, run.data.y_test, config.eval_batch_size, placement,
        on_device=programs.on_device)
    probe = _Probe.create(config, run.data, placement)
  with timer.section("compile"):
    single = any(n % spd for n in (start, run.total_steps, every.ckpt, every.eval,
                                   every.log))
    programs.compile(state, single, _lower_eval_and_probe(
        run, placement, programs.loop_shapes(state), test_batches, probe))
    eval_step, probe_step = programs.alongside["eval"], programs.alongside["probe"]
    ckpts.prepare(state)  # a checkpoint's layout of the state
  logging.info("compiled the training program%s in %.1f s (%.1f s with the evaluation "
               "and probe programs, compiled beside it); training set %s",
               f" ({programs.steps_per_dispatch} steps per dispatch)"
               if programs.steps_per_dispatch > 1 else "",
               programs.compile_seconds[programs.steps_per_dispatch],
               programs.wall_seconds,
               "on the device" if programs.on_device else "read from the host")
  # From here the state is in the step loop's layout (programs.enter), until a
  # checkpoint or the weights take it out (programs.leave).
  loop = _Loop(config, workdir, run, placement, programs, programs.enter(state), start,
               started, ckpts, log, timer)
  del state
  return loop.train(programs, every, progress, preempt, test_batches, eval_step,
                    probe_step, probe)


def _start(config, workdir, allow_config_change, data):
  """(run, placement, replicated state, checkpoints, step): the run built, the
  workdir's config checked, the state restored from its newest checkpoint (step 0
  where there is none) and the config saved."""
  run = build_lib.build(config, data)
  workdirs.check_config(config, workdir, allow_config_change)
  placement = placement_lib.Placement.create(config.gpu_compile)
  data = run.data
  num_seeds = config.batch_size // config.copies
  logging.info("%s on %s: %d train / %d test images, %d classes; %d seeds x %d copies "
               "per batch of %d; %d steps (%d per epoch); %d devices",
               config.model.name, data.name, len(data.x_train), len(data.x_test),
               data.num_classes, num_seeds, config.copies, config.batch_size,
               run.total_steps,
               run.steps_per_epoch, jax.device_count())

  ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
  target = build_lib.restore_target(run, placement, bool(ckpts.manager.all_steps()))
  state, start = workdirs.restore_latest(ckpts, target, config, workdir)
  if start > run.total_steps:  # num_epochs lowered with --allow_config_change
    ckpts.close()
    raise errors.ConfigError(
        f"{workdir} holds a checkpoint at step {start} (epoch "
        f"{start / run.steps_per_epoch:g}), past the end of config.num_epochs="
        f"{config.num_epochs:g} ({run.total_steps} steps): a run is not shortened below "
        "where it is. Give num_epochs >= the checkpoint's epoch, or a new --workdir.")
  if start:
    logging.info("resumed from step %d", start)
  workdirs.save_config(config, workdir)
  return run, placement, state, ckpts, start


@dataclasses.dataclass(frozen=True)
class _Every:
  """How many steps apart the loop checkpoints, evaluates and logs."""
  ckpt: int
  eval: int
  log: int

  @classmethod
  def of(cls, config, run: build_lib.Run) -> "_Every":
    return cls(*build_lib.stop_intervals(config, run.steps_per_epoch))


@dataclasses.dataclass
class _Probe:
  """The fixed seed images whose invariance loss is logged (Figure 5), their labels,
  and its key."""
  seeds: jax.Array
  labels: jax.Array
  key: jax.Array

  @classmethod
  def create(cls, config, data, placement) -> "_Probe":
    key = jax.random.fold_in(jax.random.key(config.seed), 2)
    idx = np.sort(np.random.default_rng([config.seed, 2]).choice(
        len(data.x_train), min(config.probe_seeds, len(data.x_train)), replace=False))
    seeds, labels = data.x_train[idx], data.y_train[idx]
    # Split over the devices where it divides, else on each: the same probe at any
    # scale.
    place = (placement.shard if len(seeds) % jax.device_count() == 0
             else placement.replicate)
    return cls(place(seeds), place(labels), key)


def _lower_eval_and_probe(run, placement, state, test_batches, probe):
  """{"eval": the eval step, "probe": the probe step}, lowered (compiled beside the
  training programs) for `state`'s shapes (the loop's layout). Sums and scalars come
  back replicated: every process can read them."""
  return {
      "eval": jax.jit(steps_lib.make_eval_step(run.step_config.top5),
                      out_shardings=placement.replicated).lower(
                          state, *next(iter(test_batches))),
      "probe": jax.jit(steps_lib.make_probe_step(run.step_config,
                                                 run.config.probe_copies),
                       out_shardings=placement.replicated).lower(
                           state, probe.seeds, probe.labels, probe.key)}


class _Loop:
  """The step loop of one session and what it keeps between steps: the state (in the
  loop's layout: `programs.enter`), the log points not yet written, the last
  checkpoint."""

  def __init__(self, config, workdir, run, placement, programs, state, start, started,
               ckpts, log, timer):
    self.config, self.workdir, self.run = config, workdir, run
    self.placement, self.state, self.leave = placement, state, programs.leave
    self.compile_record = programs.compile_record
    self.start, self.started = start, started
    self.ckpts, self.log, self.timer = ckpts, log, timer
    self.spe = run.steps_per_epoch
    self.lrs = np.asarray(jax.device_get(jax.vmap(run.lr_fn)(
        jnp.arange(run.total_steps))))
    self.state_finite = jax.jit(divergence.state_is_finite,
                                out_shardings=placement.replicated)
    self.ce_limit = divergence.divergence_limit(config, run.data.num_classes)
    self.dead_check = (jax.jit(divergence.class_score_spread,
                               out_shardings=placement.replicated)
                       if config.stop_dead_network else None)
    self.last_saved = start or None
    self.deadline = deadline_lib.Deadline(config.time_limit_minutes,
                                          timer.t0)
    # Log points are written one behind: a log point's metrics and probe stay on the
    # device until the next log point (or a checkpoint, evaluation or the end), so the
    # host never waits for the device at a log point and the device never idles.
    # (step, [(step0, metrics)], probe, the class-score spread of the dead-network
    # check)
    self.queued: list[tuple[int, list, Any, Any]] = []
    self.written = {"step": start, "time": time.perf_counter()}

  def write_queued(self, keep: int = 0):
    """Writes all queued log points but the newest `keep`, waiting for their values."""
    while len(self.queued) > keep:
      step, chunks, probe, spread = self.queued.pop(0)
      t = time.perf_counter()
      jax.block_until_ready((chunks, probe))  # the steps' time, not the log's
      now = time.perf_counter()
      # `now` is when the device finished these steps only if the host waited for
      # them; values already there (the host was held up elsewhere) give a late `now`,
      # so the rate runs from the last point the host caught the device working.
      caught = now - t > 1e-4
      self.deadline.observe(step, now)
      with self.timer.section("log"):
        if chunks:  # raises DivergenceError on a non-finite or diverged loss
          summary = divergence.summarize(chunks, self.ce_limit, self.last_saved)
          self.log.write(step, {f"train/{name}": v for name, v in summary.items()} | {
              "lr": float(self.lrs[step - 1]), "epoch": step / self.spe,
              "steps_per_sec": (step - self.written["step"]) /
                               max(now - self.written["time"], 1e-9)})
        self.log.write(step, {f"probe/{name}": v
                              for name, v in jax.device_get(probe).items()} |
                       {"epoch": step / self.spe})
      if caught:
        self.written.update(step=step, time=now)
      if spread is not None:
        divergence.check_alive(step, float(jax.device_get(spread)), self.last_saved)

  def save(self, step):
    # Raises on a non-finite or diverged loss, or a dead network, before anything is
    # saved (a checkpoint step is always a log point).
    self.write_queued()
    jax.block_until_ready(self.state)
    self.deadline.observe(step, time.perf_counter())
    with self.timer.section("checkpoint"):
      t = time.perf_counter()
      # The loss was finite; the update may not have been.
      if not bool(self.state_finite(self.state)):
        raise errors.DivergenceError(
            f"the train state became non-finite at or before step {step} (the "
            "losses were finite): not checkpointed; the last good checkpoint is "
            "kept. Lower config.learning_rate.")
      self.ckpts.save(step, self.leave(self.state), force=True)
      self.last_saved = step
      self.deadline.observe_save(time.perf_counter() - t)

  def should_stop(self, done, last, metrics, programs, preempt, at_log) -> bool:
    """Whether to stop after step `done`: on SIGTERM, or where the next program would
    pass the time limit; agreed between the processes."""
    time_up = False
    if self.deadline.active and not last:
      now = time.perf_counter()
      if self.deadline.needs_sync(now):
        jax.block_until_ready(metrics)
        now = time.perf_counter()
        self.deadline.observe(done, now)
      time_up = self.deadline.should_stop(done, programs.steps_per_dispatch, now)
    stop = preempt.requested or time_up
    if jax.process_count() > 1:
      # Whether to stop must be agreed, since saving is collective: processes
      # compare their SIGTERM and time-limit flags at each log or checkpoint step
      # (one tiny collective each), so a stop comes at the next such step.
      stop = at_log and distributed.any_process(stop)
    return stop

  def evaluate(self, eval_step, test_batches) -> dict[str, float]:
    with self.timer.section("evaluation"):
      return evaluation.evaluate_batches(eval_step, self.state, test_batches)

  def train(self, programs, every, progress, preempt, test_batches, eval_step,
            probe_step, probe) -> dict[str, Any]:
    """Runs the steps from `start` to the end (or a stop), then `finish`es."""
    run, config, spe = self.run, self.config, self.spe
    done = self.start
    stopped = "error"
    test = {}
    t_loop = time.perf_counter()
    try:
      if self.start == 0:  # Figure 5 starts at the initialisation
        self.queued.append((0, [], probe_step(self.state, probe.seeds, probe.labels,
                                              probe.key), None))
      self.deadline.start(self.start, time.perf_counter())
      pending: list[tuple[int, dict]] = []
      while done < run.total_steps:
        next_stop = min(run.total_steps, _next_multiple(done, every.log),
                        _next_multiple(done, every.ckpt),
                        _next_multiple(done, every.eval))
        size = programs.chunk_size(done, next_stop)
        self.state, metrics = programs(self.state, done, size)
        pending.append((done, metrics))
        done += size
        last = done == run.total_steps
        at_ckpt = done % every.ckpt == 0 or last
        at_log = done % every.log == 0 or at_ckpt
        progress(done)
        stop = self.should_stop(done, last, metrics, programs, preempt, at_log)
        if at_log or stop:
          self.queued.append((done, pending,
                              probe_step(self.state, probe.seeds, probe.labels,
                                         probe.key),
                              None if self.dead_check is None
                              else self.dead_check(self.state, probe.seeds)))
          pending = []
          self.write_queued(keep=1)
        # The checkpoint comes before the evaluation: a failing evaluation loses nothing.
        if at_ckpt or stop:
          self.save(done)
        if done % every.eval == 0 or last:
          self.write_queued()
          jax.block_until_ready(self.state)
          test = self.evaluate(eval_step, test_batches)
          self.deadline.observe(done, time.perf_counter())
          self.log.write(done, {f"test/{k}": v for k, v in test.items()} |
                         {"epoch": done / spe})
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
              "command to resume.", done, run.total_steps, self.timer.elapsed() / 60,
              config.time_limit_minutes)
          break
      self.write_queued()
      if done == run.total_steps:
        stopped = "finished"
        if not test:  # resumed a finished run
          test = self.evaluate(eval_step, test_batches)
    finally:  # also on an error or SIGTERM: saves in flight are finished, not lost
      self.finish(done, stopped, t_loop)
    return {"step": done, "finished": done == run.total_steps, "stopped": stopped,
            **test}

  def finish(self, done, stopped, t_loop) -> None:
    """Waits for the saves in flight, closes the log and adds the session to the run
    card; raises a failure to close the checkpoints."""
    timer = self.timer
    close_error = None
    try:
      with timer.section("checkpoint"):
        self.ckpts.close()  # waits for saves in flight
    except BaseException as e:  # pylint: disable=broad-except
      close_error, stopped = e, "error"
    finally:
      self.log.close()
    end = done if stopped != "error" else (self.last_saved or self.start)
    loop = time.perf_counter() - t_loop
    timer.add("train", max(0.0, loop - sum(timer.seconds[k] for k in
                                           ("evaluation", "log", "checkpoint"))))
    if distributed.is_primary():
      # (after an error the weights are not written, and the state may be gone)
      state = self.leave(self.state) if stopped != "error" else None
      workdirs.finish_session(self.workdir, self.run, self.config, state, timer,
                              self.started, self.start, end, stopped,
                              self.compile_record())
    if close_error is not None:
      raise close_error
