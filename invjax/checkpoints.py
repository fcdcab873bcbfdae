"""Orbax checkpoints of the train state in WORKDIR/checkpoints."""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging
import jax
import orbax.checkpoint as ocp


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every save in a dozen INFO lines; keep its warnings and errors."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


logging.get_absl_handler().addFilter(_QuietOrbax())


class Checkpoints:
  """Saves and restores a TrainState; every process of a run calls every method."""

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

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
