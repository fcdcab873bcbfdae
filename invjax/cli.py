"""Running a command-line program: a refused input is a few lines and exit status 2.

`cli.run(main)` is `absl.app.run(main)` except that a user error (`errors.UserError`,
absl's UsageError, or a flag or config override that does not parse) prints
`error: <what, the value, the fix>` and exits with status 2 instead of a traceback;
`--verbose` shows the traceback as well.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from invjax import errors

FLAGS = flags.FLAGS
if "verbose" not in FLAGS:
  flags.DEFINE_bool("verbose", False, "On a refused input (config, data, workdir, "
                    "checkpoint), print the Python traceback too.")


def _flat_fields(config, prefix="") -> list[str]:
  out = []
  for k, v in config.items():
    if hasattr(v, "items") and not isinstance(v, (str, bytes)):
      out += _flat_fields(v, f"{prefix}{k}.")
    else:
      out.append(f"{prefix}{k}")
  return out


def _unknown_override(argv, e: BaseException) -> str | None:
  """A message for a --config.FIELD=... whose field the config lacks, else None."""
  try:
    config = FLAGS["config"].value
  except KeyError:
    return None
  if config is None:
    from invjax import config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.base_config()
  fields = _flat_fields(config)
  for arg in argv[1:]:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=")[0]
      if path not in fields:
        return (f"--config.{path}: the config has no field {path!r}; its fields "
                f"are:\n" + errors.wrap_list(fields))
  return None


def parse_flags(argv):
  """absl's flag parsing; a flag or override that does not parse exits with status 2."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)
    message = _unknown_override(argv, e)
    if message is None:
      message = f"{e}" if isinstance(e, flags.Error) else f"{type(e).__name__}: {e}"
      message += "\nSee --helpfull for the flags; a --config.FIELD=VALUE takes a value " \
                 "of the field's type."
    errors.report_and_exit(errors.UserError(message), verbose)


def run(main) -> None:
  """absl.app.run(main), with user errors as short messages and exit status 2."""

  def guarded(argv):
    from invjax import checkpoints  # pylint: disable=g-import-not-at-top
    checkpoints.SHOW_ORBAX_LOGS = FLAGS.verbose
    try:
      return main(argv)
    except (errors.UserError, app.UsageError) as e:
      errors.report_and_exit(e, FLAGS.verbose)

  app.run(guarded, flags_parser=parse_flags)
