"""When a run must stop, checkpoint saved: its time limit (`config.time_limit_minutes`)
and SIGTERM (a preemption)."""

from __future__ import annotations

import signal

from absl import logging


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


class Preemption:
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
