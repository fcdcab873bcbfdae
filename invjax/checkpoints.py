"""Orbax checkpoints of the train state in WORKDIR/checkpoints, and the final weights
(parameters and batch-norm statistics, no optimizer state) as a plain WORKDIR/weights.npz
that needs neither Orbax nor the optimizer to load."""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from invjax import distributed


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every save in a dozen INFO lines; keep its warnings and errors."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


logging.get_absl_handler().addFilter(_QuietOrbax())


class Checkpoints:
  """Saves and restores a TrainState; every process of a run calls every method.

  With several processes, Orbax writes each array's shards from the processes that
  hold them into one checkpoint (the workdir must be a file system every host sees,
  e.g. NFS or a gcsfuse-mounted bucket), and restores them into the target's
  shardings.
  """

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, target, step: int | None = None):
    """Restores into the shapes, dtypes and shardings of `target`."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    logging.info("restoring checkpoint %d from %s", step, self.directory)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

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
        logging.warning("checkpoint %d in %s does not restore (%s: %s)", step,
                        self.directory, type(e).__name__, str(e)[:300])
        failed.append((step, e))
        continue
      for bad, _ in failed:
        aside = os.path.join(self.directory, f"damaged-{bad}")
        if distributed.is_primary():  # one process moves it; the others wait
          os.rename(os.path.join(self.directory, str(bad)), aside)
        logging.warning("checkpoint %d is damaged: moved aside to %s; resuming from "
                        "checkpoint %d instead", bad, aside, step)
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
    self.manager.wait_until_finished()
    self.manager.close()


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
