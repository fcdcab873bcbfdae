"""Orbax checkpoints of the train state in WORKDIR/checkpoints, and the final weights
(parameters and batch-norm statistics, no optimizer state) as a plain WORKDIR/weights.npz
that needs neither Orbax nor the optimizer to load."""

from __future__ import annotations

import errno
import glob
import logging as std_logging
import os
import shutil

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from invjax import distributed
from invjax import errors
from invjax import flat_state

# Orbax's own log records (a dozen INFO lines per save; on a failed restore or save,
# warnings and errors with tracebacks, of faults invjax handles and reports in one line
# of its own, or raises). Shown with --verbose (the CLI sets this).
SHOW_ORBAX_LOGS = False


class _QuietOrbax(std_logging.Filter):
  """Hides Orbax's log records unless SHOW_ORBAX_LOGS."""

  def filter(self, record):
    return SHOW_ORBAX_LOGS or "orbax" not in record.pathname


logging.get_absl_handler().addFilter(_QuietOrbax())


DIRECTORY = "checkpoints"  # in the workdir


# A train state's optimizer state is kept per parameter in a checkpoint, as optax.sgd
# lays it out, whatever the layout it trains in (steps.create_optimizer: one vector).


def _has_opt_state(state) -> bool:
  return hasattr(state, "opt_state") and hasattr(state, "params")


def _sharding(state):
  """The state's sharding (it is replicated): its first parameter's."""
  return jax.tree.leaves(state.params)[0].sharding


def _per_param(state):
  return state.replace(opt_state=flat_state.opt_state_per_param(state.opt_state,
                                                                state.params))


def _stored_shapes(abstract):
  """The layout a checkpoint holds of a target's ShapeDtypeStructs."""
  if not _has_opt_state(abstract):
    return abstract
  sharding = _sharding(abstract)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      jax.eval_shape(_per_param, abstract))


def _training_layout(stored, target):
  """A restored state in the layout of `target` (ShapeDtypeStructs)."""
  if not _has_opt_state(stored) or (jax.tree.structure(stored.opt_state) ==
                                    jax.tree.structure(target.opt_state)):
    return stored
  flat = lambda s: s.replace(opt_state=flat_state.opt_state_flat(s.opt_state, s.params))
  return jax.jit(flat, out_shardings=_sharding(target))(stored)


def _free_path(path: str) -> str:
  """`path`, or `path`.2, .3, ... : the first that does not exist (a step damaged
  again after a retraining keeps both copies aside)."""
  candidate, n = path, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.{n}"
  return candidate


class Checkpoints:
  """Saves and restores a TrainState; every process of a run calls every method.

  With several processes, Orbax writes each array's shards from the processes that
  hold them into one checkpoint (the workdir must be a file system every host sees,
  e.g. NFS or a gcsfuse-mounted bucket), and restores them into the target's
  shardings.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3):
    """Keeps the newest `max_to_keep` checkpoints; 0 (or None) keeps all."""
    self.directory = os.path.abspath(os.path.join(workdir, DIRECTORY))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None,
                                             create=True))
    self._prepared, self._to_stored = False, None  # `prepare`

  def prepare(self, state) -> None:
    """Compiles, before the training loop, the program that puts a state's optimizer
    state in the layout checkpoints keep (each vector of every parameter unraveled per
    parameter), so that no save compiles inside the loop; nothing for a state already
    in that layout."""
    self._prepared = True
    if _has_opt_state(state) and (jax.tree.structure(jax.eval_shape(_per_param, state))
                                  != jax.tree.structure(state)):
      self._to_stored = jax.jit(flat_state.opt_state_per_param,
                                out_shardings=_sharding(state)).lower(
                                    state.opt_state, state.params).compile()

  def _stored(self, state):
    if not self._prepared:
      self.prepare(state)
    if self._to_stored is None:
      return state
    return state.replace(opt_state=self._to_stored(state.opt_state, state.params))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, force: bool = False) -> None:
    """Starts saving `step` (Orbax writes in the background; a write that failed
    surfaces here at the next save or at `close`, as DiskFullError when the disk is
    full, after the incomplete checkpoint's temporary directory is removed)."""
    state = self._stored(state)
    with self._write_errors(step):
      self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def complete_steps(self) -> list[int]:
    """The steps whose checkpoint was written whole (finalised by Orbax's rename)."""
    return complete_steps(self.directory)

  def _remove_incomplete(self) -> list[str]:
    """Removes the temporary directories of saves that did not finish."""
    if not distributed.is_primary():
      return []
    gone = []
    for path in glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")):
      shutil.rmtree(path, ignore_errors=True)
      gone.append(os.path.basename(path))
    return gone

  class _WriteErrors:
    def __init__(self, ckpts, step):
      self.ckpts, self.step = ckpts, step

    def __enter__(self):
      return self

    def __exit__(self, kind, e, tb):
      if e is None or not isinstance(e, Exception):
        return False
      if not _is_disk_full(e) or getattr(self.ckpts, "_disk_full", False):
        return False
      self.ckpts._disk_full = True  # pylint: disable=protected-access
      gone = self.ckpts._remove_incomplete()  # pylint: disable=protected-access
      done = self.ckpts.complete_steps()
      raise errors.DiskFullError(
          f"no space left on the device of {self.ckpts.directory} while saving a "
          f"checkpoint (at or before step {self.step}): removed the incomplete "
          f"{', '.join(gone) or 'checkpoint'}; the last complete checkpoint is "
          f"{'step ' + str(done[-1]) if done else 'none'}. Free space (or lower "
          "config.keep_checkpoints) and rerun to resume from it.") from e

  def _write_errors(self, step: int):
    return self._WriteErrors(self, step)

  def restore(self, target, step: int | None = None):
    """Restores into the shapes, dtypes and shardings of `target`."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    logging.info("restoring checkpoint %d from %s", step, self.directory)
    stored = self.manager.restore(step, args=ocp.args.StandardRestore(
        _stored_shapes(abstract)))
    return _training_layout(stored, abstract)

  def restore_latest(self, target):
    """(state, step) from the newest checkpoint that restores; (target, 0) if none.

    A checkpoint that fails to restore (a truncated or unreadable file) while an older
    one restores into the same target was damaged: it is moved aside to
    `damaged-<step>` (kept, not deleted) with a warning, and training resumes from the
    older one. If none restores, the newest one's error is raised: then the target
    itself (the model, the config) does not fit.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      try:
        state = self.restore(target, step)
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, e))
        continue
      for bad, e in failed:  # one line each
        aside = _free_path(os.path.join(self.directory, f"damaged-{bad}"))
        if distributed.is_primary():  # one process moves it; the others wait
          os.rename(os.path.join(self.directory, str(bad)), aside)
        logging.warning("checkpoint %d does not restore (%s): moved aside to %s; "
                        "using checkpoint %d instead", bad, short_reason(e), aside, step)
      if failed:
        distributed.barrier("invjax: damaged checkpoints moved aside")
        self.manager.reload()
      return state, step
    if failed:
      raise failed[0][1]
    return target, 0

  def close(self) -> None:
    """Waits for saves in flight and closes; a second call does nothing."""
    if getattr(self, "_closed", False):
      return
    self._closed = True
    try:
      with self._write_errors(self.manager.latest_step() or 0):
        try:
          self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
          if not getattr(self, "_disk_full", False):
            raise
          logging.info("after the full disk: %s", short_reason(e))  # reported already
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # the wait's error (raised) says what went wrong


def complete_steps(directory: str) -> list[int]:
  """The steps of the checkpoints written whole in `directory` (a workdir's
  checkpoints/: Orbax finalises a checkpoint by renaming it to its step)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def short_reason(e: BaseException, limit: int = 160) -> str:
  """`Type: first line of the message`, cut to `limit` characters."""
  text = (str(e).strip().splitlines() or [""])[0]
  text = text if len(text) <= limit else text[:limit - 3] + "..."
  return f"{type(e).__name__}: {text}"


def _is_disk_full(e: BaseException) -> bool:
  """Whether `e` (or an exception it came from) says the disk is full."""
  seen = 0
  while e is not None and seen < 10:
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
    seen += 1
  return False


WEIGHTS_FILE = "weights.npz"


def save_weights(path: str, state, step: int) -> None:
  """Writes `state`'s parameters and batch-norm statistics (float32 as trained) and
  the step to an .npz: keys "params/<module>/<name>", "batch_stats/...", "step"."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  tree = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  flat = traverse_util.flatten_dict(tree, sep="/")
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, step=np.int64(step), **{k: np.asarray(v) for k, v in flat.items()})
  os.replace(tmp, path)


def load_weights(path: str) -> tuple[dict, dict, int]:
  """(params, batch_stats, step) written by `save_weights`, as nested dicts of arrays."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  with np.load(path) as f:
    step = int(f["step"])
    flat = {k: f[k] for k in f.files if k != "step"}
  tree = traverse_util.unflatten_dict(flat, sep="/")
  return tree.get("params", {}), tree.get("batch_stats", {}), step
