"""A run's workdir: its layout, and the files that say what the run is.

  WORKDIR/
    config.json             the configuration the run was started with (`load_config`)
    checkpoints/<step>/     Orbax checkpoints of the train state (`checkpoints`)
    weights.npz             the weights a session ended with (`checkpoints.save_weights`)
    metrics.jsonl           metrics per step (`metrics_io`); tensorboard/ beside it
    run_card.json           sessions, hardware and time (`run_card`)
    analysis/scores.npz     per-image invariance scores (`analyze`)
    analysis/summary.json   their summary and the test accuracies (`analyze`)
    analysis/robustness.json  accuracy under corruptions and attacks (`robustness`)
    figures/invariance_scores.png
    .lock                   held by the process writing the workdir (`workdir_lock`)

Here too: whether a workdir holds a run of another configuration (`config_diff`),
whether it is trained (`latest_checkpoint`), and creating and locking it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging

from invjax import checkpoints
from invjax import config_lib
from invjax import distributed
from invjax import errors
from invjax import metrics_io
from invjax import models
from invjax import run_card
from invjax import workdir_lock

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = checkpoints.DIRECTORY
WEIGHTS_FILE = checkpoints.WEIGHTS_FILE
METRICS_FILE = metrics_io.METRICS_FILE
CARD_FILE = run_card.CARD_FILE
ANALYSIS_DIR = "analysis"
SCORES_FILE = os.path.join(ANALYSIS_DIR, "scores.npz")
SUMMARY_FILE = os.path.join(ANALYSIS_DIR, "summary.json")
ROBUSTNESS_FILE = os.path.join(ANALYSIS_DIR, "robustness.json")
SCORES_FIGURE = os.path.join("figures", "invariance_scores.png")


def _flat_config(d, prefix=""):
  """{"a.b": value} of a config read back from JSON (tuples are lists on both sides)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _default_fields(model: str | None = None):
  """{"a.b": default} of every field of config_lib.base_config() but its model's (a
  model takes only its own fields: the base config's are All-CNN's), and of model
  `model`'s own fields where it is named (models.field_defaults)."""
  base = json.loads(config_lib.base_config().to_json_best_effort())
  base["model"] = json.loads(json.dumps(models.field_defaults(model))) if model else {}
  return _flat_config(base)


# Fields that change how fast a run goes, not what it computes (tested): a run may be
# resumed with other values, e.g. on another machine.
PERFORMANCE_FIELDS = ("data_on_device", "steps_per_dispatch", "time_limit_minutes",
                      "batch_norm", "gpu_compile")
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
  # A field added to invjax after the run was started, at its default, is no change;
  # a model field's default is its model's.
  defaults = _default_fields(config.model.get("name"))
  # Either way round: a field one side leaves out is its default there.
  new_at_default = {k for k in set(given) ^ set(saved) if k in defaults and
                    given.get(k, saved.get(k)) == defaults[k]}
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


def check_config(config, workdir: str, allow_change: bool = False) -> None:
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
  # Fields added to invjax after the run was started take their defaults; a model field
  # left out takes its model's default where the model is built.
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


def has_checkpoint(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds a checkpoint (a directory named by its step)."""
  return bool(checkpoints.complete_steps(os.path.join(workdir, CHECKPOINTS_DIR)))


def is_trained(workdir: str, total_steps: int) -> bool:
  """Whether the newest checkpoint in `workdir` is of step `total_steps` or later."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR)):
    return False
  ckpts = checkpoints.Checkpoints(workdir)
  try:
    return (ckpts.latest_step() or 0) >= total_steps
  finally:
    ckpts.close()


def prepare(workdir: str) -> None:
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


def lock(workdir: str, what: str) -> workdir_lock.WorkdirLock | None:
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


def finish_session(workdir, run, config, state, timer, started, start, end,
                    stopped, compiled=None) -> None:
  """Writes the weights the session ends with (unless it failed) and its run card
  entry. After an error, a failure here is logged, not raised over the error."""
  try:
    if stopped != "error":
      checkpoints.save_weights(os.path.join(workdir, WEIGHTS_FILE),
                               state, end)
    card = run_card.read(workdir)
    if end == start and card and card.get("finished"):
      return  # a rerun of a finished run: nothing to add
    card = run_card.add_session(
        workdir, total_steps=run.total_steps, start_step=start, end_step=end,
        stopped=stopped, timer=timer, started=started,
        time_limit_minutes=float(config.time_limit_minutes), compiled=compiled)
    logging.info("run card: %s", run_card.describe(card))
  except Exception:  # pylint: disable=broad-except
    if stopped != "error":
      raise
    logging.exception("could not write the run card of %s", workdir)
