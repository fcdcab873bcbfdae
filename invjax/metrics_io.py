"""Where metrics go: log lines, TensorBoard summaries (clu), and metrics.jsonl.

metrics.jsonl in the workdir has one JSON object per write, {"step": s, name: value, ...};
plots and reports read it (`read`). clu's writers need TensorFlow; where it is missing
(e.g. a bare GPU image), log lines and the JSON file still work.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from absl import logging
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _clu():
  """(metric_writers, periodic_actions) from clu, or (None, None) without TensorFlow.

  Imported on first use: clu.metric_writers imports TensorFlow, seconds that a
  --mode=describe or a notebook reading metrics should not pay.
  """
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    return metric_writers, periodic_actions
  except ImportError:
    return None, None


def _plain(v: Any):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class MetricsLog:
  """Writes scalars to log lines, TensorBoard and metrics.jsonl (process 0 only)."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True,
               tensorboard: bool = True):
    """`enabled=False` (processes other than 0) writes nothing; `tensorboard=False`
    skips the summaries and clu's import of TensorFlow (seconds of start-up)."""
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    if not enabled:
      return
    # A run killed after its last checkpoint logged steps that will be run again.
    kept = [r for r in read(workdir) if r["step"] <= resume_step]
    with open(self.path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    self._file = open(self.path, "a")
    metric_writers, _ = _clu() if tensorboard else (None, None)
    if metric_writers is not None:
      self.writer = metric_writers.create_default_writer(
          os.path.join(workdir, "tensorboard"), asynchronous=False)
    else:
      if tensorboard:
        logging.warning("clu/TensorFlow not importable: no TensorBoard summaries; "
                        "metrics go to %s and the log.", self.path)
      self.writer = None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: _plain(v) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._file.flush()
    if self.writer is not None:
      self.writer.write_scalars(int(step), scalars)
    else:
      logging.info("[%d] %s", step, ", ".join(f"{k}={v:.4g}" for k, v in
                                             scalars.items()))

  def close(self) -> None:
    if self.enabled and not self._file.closed:
      if self.writer is not None:
        self.writer.flush()
        self.writer.close()
      self._file.close()


def read(workdir: str) -> list[dict]:
  """The records of metrics.jsonl (empty if there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
          logging.warning("skipping a damaged line of %s", path)
  return out


def series(records: list[dict], name: str, against: str = "step"
           ) -> tuple[np.ndarray, np.ndarray]:
  """(x, values) of one metric, x = `against` from the same record (the step, or e.g.
  the epoch), sorted by step; the last value written for a step wins."""
  by_step = {r["step"]: (r[against], r[name]) for r in records
             if name in r and against in r}
  pts = [by_step[s] for s in sorted(by_step)]
  return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


class Progress:
  """steps/s and time left: clu's ReportProgress where available, else log lines."""

  def __init__(self, num_steps: int, writer: MetricsLog, every_secs: float = 30.0):
    self.num_steps = num_steps
    self.every_secs = every_secs
    self._clu = None
    self.enabled = writer.enabled
    if writer.enabled and writer.writer is not None:  # clu is imported already
      _, periodic_actions = _clu()
      self._clu = periodic_actions.ReportProgress(
          num_train_steps=num_steps, writer=writer.writer, every_secs=every_secs)
    self._last = None

  def __call__(self, step: int) -> None:
    if not self.enabled:  # not process 0
      return
    now = time.time()
    if self._clu is not None:
      self._clu(step, now)
      return
    if self._last is None:
      self._last = (step, now)
      return
    s0, t0 = self._last
    if now - t0 >= self.every_secs:
      rate = (step - s0) / (now - t0)
      left = (self.num_steps - step) / max(rate, 1e-9)
      logging.info("step %d/%d, %.2f steps/s, %.1f min left", step, self.num_steps,
                   rate, left / 60)
      self._last = (step, now)
