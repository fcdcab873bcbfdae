"""One writer per workdir: WORKDIR/.lock, held while a run trains or analyzes.

The lock is an exclusive `flock` on the file, which the kernel drops when its process
ends however it ends (SIGKILL too), so a lock left by a killed run never blocks the
next one. The file names the holder (host, process id, command, start time), so a
second run is refused with who holds it. Where the file system has no flock (some FUSE
mounts), the file alone is the lock, and a holder on this host that is no longer
running counts as gone.

Only process 0 of a multi-process run takes it (the others write what process 0 tells
them to). Pure standard library: a test can hold a lock from a bare subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time

try:
  import fcntl
except ImportError:  # not POSIX
  fcntl = None

LOCK_FILE = ".lock"


class WorkdirBusy(Exception):
  """The workdir is locked by another live process; the message names it."""


def _describe(holder: dict) -> str:
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} "
          f"({holder.get('command', '?')}), since {when}")


def _alive_here(holder: dict) -> bool:
  """Whether the holder is a live process of this host (True if it cannot be told)."""
  if holder.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(holder["pid"]), 0)
  except (KeyError, ValueError, TypeError):
    return False
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


class WorkdirLock:
  """`with WorkdirLock(workdir, "train"):` holds the workdir's lock; re-entrant within
  one process (train_and_analyze, an experiment's train then analyze)."""

  _held: dict[str, list] = {}  # path -> [open file or None, depth]

  def __init__(self, workdir: str, what: str = "train"):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.what = what

  def acquire(self) -> None:
    held = self._held.get(self.path)
    if held is not None:
      held[1] += 1
      return
    f = open(self.path, "a+")
    flocked = False
    if fcntl is not None:
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        flocked = True
      except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          holder = _read(self.path)
          f.close()
          raise WorkdirBusy(self._busy_message(holder)) from None
        # No flock on this file system: the file's content is the lock.
    if not flocked:
      holder = _read(self.path)
      if holder and holder.get("pid") != os.getpid() and _alive_here(holder):
        f.close()
        raise WorkdirBusy(self._busy_message(holder))
    f.seek(0)
    f.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(),
               "command": f"{os.path.basename(sys.argv[0] or 'python')} ({self.what})",
               "started": time.time()}, f)
    f.flush()
    self._held[self.path] = [f, 1]

  def _busy_message(self, holder: dict) -> str:
    workdir = os.path.dirname(self.path)
    return (f"--workdir={workdir} is in use by {_describe(holder)}: one run writes a "
            f"workdir at a time. Wait for it to finish (or stop it), or choose another "
            f"--workdir. (Its lock is {self.path}; a run that was killed holds no "
            "lock, so this one is alive.)")

  def release(self) -> None:
    held = self._held.get(self.path)
    if held is None:
      return
    held[1] -= 1
    if held[1] > 0:
      return
    f = held[0]
    del self._held[self.path]
    try:
      f.seek(0)
      f.truncate()  # no holder named; the file stays (removing it would race)
    except OSError:
      pass
    f.close()  # drops the flock

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
