"""The run card: how, where and how fast a run was made, in WORKDIR/run_card.json.

Each start of a run (the first, and every resume) adds a *session*: the command, the
date, the hardware and software, the code's git commit (`source`), the steps it ran,
why it stopped ("finished", "time_limit", "sigterm" or "error"), how its programs were
compiled (`compile`: config.gpu_compile, XLA's options and flags, any program that fell
back to XLA's defaults) and its wall time split into sections:

  startup     data, model, initial state, checkpoint restore
  compile     the training, evaluation and probe programs (ahead of the loop)
  train       the step loop less the sections below: the steps themselves, dispatch,
              and the probe's forward pass (queued on the device between steps)
  evaluation  test-set evaluations (waiting for the steps queued before them excluded)
  log         fetching the logged metrics and writing them
  checkpoint  the blocking part of each save (Orbax writes the files in the background)

`--mode=analyze` adds "analysis" seconds. The card's totals sum the sessions, so a run
stopped by a time limit and resumed has one card. `steps_per_second` of a session is
steps / train seconds: the step rate with the overheads taken out, to compare with the
benchmark's step time.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import time
from typing import Any

CARD_FILE = "run_card.json"
SECTIONS = ("startup", "compile", "train", "evaluation", "log", "checkpoint")


class Timer:
  """Seconds per section of one session; `train` is what the others leave of the loop."""

  def __init__(self):
    self.seconds = {k: 0.0 for k in SECTIONS}
    self.t0 = time.perf_counter()

  @contextlib.contextmanager
  def section(self, name: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - t

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] += seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0


def software() -> dict[str, str]:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


SOURCE_ENV = "INVJAX_SOURCE"


def source() -> str | None:
  """The code's git commit (with "+changes" if the tree differs from it), or, where
  there is no git checkout (an accelerator that received a copy of the tree), the
  value of $INVJAX_SOURCE; None if neither says."""
  import subprocess  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    top, head = subprocess.run(
        ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True,
        text=True, timeout=10, check=True).stdout.split()
    if os.path.realpath(top) != os.path.realpath(root):  # installed inside another repo
      raise OSError(f"{root} is not the root of a git checkout")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=root, capture_output=True, text=True, timeout=10,
                           check=True).stdout.strip()
    return head + ("+changes" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return os.environ.get(SOURCE_ENV) or None


def hardware() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind,
          "device_count": jax.device_count(), "process_count": jax.process_count(),
          "host": platform.node(), "host_cores": os.cpu_count(),
          "machine": platform.machine()}


def read(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, CARD_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write(workdir: str, card: dict[str, Any]) -> None:
  path = os.path.join(workdir, CARD_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(card, f, indent=2)
  os.replace(path + ".tmp", path)


def _totals(card: dict[str, Any]) -> None:
  sessions = card["sessions"]
  split = {k: sum(s["seconds"].get(k, 0.0) for s in sessions) for k in SECTIONS}
  split["analysis"] = sum(a["seconds"] for a in card.get("analyses", []))
  card["seconds"] = {k: round(v, 3) for k, v in split.items()}
  card["wall_seconds"] = round(sum(s["wall_seconds"] for s in sessions) +
                               split["analysis"], 3)
  steps = sum(s["end_step"] - s["start_step"] for s in sessions)
  card["steps_per_second"] = (round(steps / split["train"], 3) if split["train"] > 0
                              else None)
  last = sessions[-1]
  card["final_step"] = last["end_step"]
  card["finished"] = last["end_step"] >= card["total_steps"]
  card["stopped"] = last["stopped"]


def add_session(workdir: str, *, total_steps: int, start_step: int, end_step: int,
                stopped: str, timer: Timer, started: str,
                time_limit_minutes: float = 0.0,
                compiled: dict[str, Any] | None = None) -> dict[str, Any]:
  """Appends this start's session to the card (creating it) and returns the card.
  `compiled`: how its programs were compiled (`programs.TrainPrograms.compile_record`)."""
  card = read(workdir) or {"total_steps": total_steps, "sessions": []}
  card["total_steps"] = total_steps
  session = {
      "command": " ".join(sys.argv), "started": started,
      "hardware": hardware(), "software": software(), "source": source(),
      "start_step": int(start_step), "end_step": int(end_step), "stopped": stopped,
      "time_limit_minutes": time_limit_minutes,
      "wall_seconds": round(timer.elapsed(), 3),
      "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
  }
  if compiled is not None:
    session["compile"] = compiled
  n = end_step - start_step
  session["steps_per_second"] = (round(n / timer.seconds["train"], 3)
                                 if n and timer.seconds["train"] > 0 else None)
  card["sessions"].append(session)
  _totals(card)
  _write(workdir, card)
  return card


def add_analysis(workdir: str, step: int, seconds: float) -> None:
  """Records an analysis (`--mode=analyze`) of the checkpoint at `step`."""
  card = read(workdir)
  if card is None:
    return
  card.setdefault("analyses", []).append({
      "step": int(step), "seconds": round(seconds, 3),
      "date": now_iso(), "hardware": hardware()})
  _totals(card)
  _write(workdir, card)


def now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def describe(card: dict[str, Any]) -> str:
  """One line: steps, finished or where it stopped, wall time and its split."""
  s = card["seconds"]
  hw = card["sessions"][-1]["hardware"]
  state = ("finished" if card["finished"] else
           f"stopped ({card['stopped']}) at step {card['final_step']}")
  split = ", ".join(f"{k} {v:.0f} s" for k, v in s.items() if v)
  analyses = card.get("analyses") or []
  said = ""
  if analyses:  # an analysis may have been redone elsewhere (a record, rescored)
    last = analyses[-1]
    said = (f"; {len(analyses)} analys{'is' if len(analyses) == 1 else 'es'}, the last "
            f"{last['date'][:10]} on {last['hardware']['device_count']} x "
            f"{last['hardware']['device_kind']} ({last['seconds']:.0f} s)")
  return (f"{card['final_step']}/{card['total_steps']} steps, {state}; "
          f"{len(card['sessions'])} session(s) on {hw['device_count']} x "
          f"{hw['device_kind']}; wall {card['wall_seconds']:.0f} s ({split}){said}")
