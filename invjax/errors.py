"""The faults a user can fix (config, data, workdir, checkpoint), and how the command
line reports them: a few lines naming the field or file, the value and the fix, exit
status 2, no traceback unless --verbose.

Each class also derives from the built-in exception the fault used to raise (ValueError,
PermissionError, ...), so code that catches those still does. Anything else that goes
wrong is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import textwrap
import traceback

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A fault of the input, not of invjax: its message says what to change."""


class ConfigError(UserError, ValueError):
  """A config field of the wrong type or outside its domain."""


class DataError(UserError, ValueError):
  """Data that cannot be read or do not fit the config (or each other)."""


class DataFileError(UserError, FileNotFoundError):
  """A data file or directory that is not there."""


class DataUnavailable(UserError, RuntimeError):
  """Data that could not be prepared (no network, no archive)."""


class WorkdirError(UserError, PermissionError):
  """A workdir that cannot be created or written, or that another run is writing."""


class RunNotFound(UserError, FileNotFoundError):
  """A workdir without the run (config, checkpoint, analysis) that was asked for."""


class CheckpointError(UserError, ValueError):
  """Checkpoints that do not restore into the model of the config."""


class DivergenceError(UserError, FloatingPointError):
  """Training diverged (a non-finite or exploding loss, or a dead network)."""


class DiskFullError(UserError, OSError):
  """The disk filled up while a checkpoint or output was written."""


def format_message(e: BaseException) -> str:
  """`error: <message>`, each line indented after the first."""
  text = str(e).strip() or type(e).__name__
  if isinstance(e, KeyError) and text.startswith(("'", '"')):
    text = text.strip("'\"")
  lines = text.splitlines()
  return "\n".join([f"error: {lines[0]}"] + [f"  {l.strip()}" if not l.startswith(" ")
                                            else l for l in lines[1:]])


def report_and_exit(e: BaseException, verbose: bool = False) -> None:
  """Prints a user error (its traceback too with `verbose`) and exits with status 2."""
  if verbose:
    traceback.print_exception(e)
  sys.stdout.flush()
  print(format_message(e), file=sys.stderr)
  if not verbose:
    print("(--verbose shows the traceback)", file=sys.stderr)
  sys.stderr.flush()
  sys.exit(EXIT_USER_ERROR)


def wrap_list(items, width: int = 88, indent: str = "  ") -> str:
  """A long list of names as a few indented lines."""
  return textwrap.fill(", ".join(items), width=width, initial_indent=indent,
                       subsequent_indent=indent)
