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


def _without_traceback(text: str) -> str:
  """A message that embeds a traceback (ml_collections does, for an error in a config
  file's get_config) -> its text before the traceback and the exception's own line."""
  head, sep, tail = text.partition("Traceback (most recent call last):")
  if not sep:
    return text
  last = [l for l in tail.splitlines() if l.strip() and not l.startswith(" ")]
  return " ".join(head.split()) + (" " + last[-1].strip() if last else "")


def parse_flags(argv):
  """absl's flag parsing; a flag or override that does not parse exits with status 2."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv)
    message = _unknown_override(argv, e)
    if message is None and isinstance(e, flags.Error):
      message = (f"{_without_traceback(str(e))}\nSee --helpfull for the flags; a --config.FIELD=VALUE takes a "
                 "value of the field's type.")
    elif message is None:  # e.g. raised by the config file's get_config()
      config = next((a for a in argv[1:] if a.startswith("--config=")), "")
      message = (f"{type(e).__name__}: {' '.join(str(e).split())[:400]} (while reading "
                 f"the command line{', loading ' + config if config else ''}). Fix the "
                 "config file or the flag.")
    errors.report_and_exit(errors.UserError(message), verbose)


def config_flag(name: str = "config"):
  """The value of a config flag, its variant following the --config.FIELD overrides
  of its inputs (`config_lib.follow_variant`). ml_collections loads the file on first
  access, so a file that is missing or fails to load is refused here as a
  ConfigError."""
  try:
    value = FLAGS[name].value
    if value is not None:
      value.keys()  # a file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    root = e
    while root.__cause__ is not None:
      root = root.__cause__
    given = next((a.split("=", 1)[1] for a in sys.argv[1:]
                  if a.startswith(f"--{name}=")), "?")
    detail = " ".join(str(root).split())[:400]
    raise errors.ConfigError(
        f"--{name}={given} cannot be loaded ({type(root).__name__}: {detail}). Give a "
        f"config file that defines get_config(), e.g. --{name}=configs/allcnn.py "
        "(or configs/allcnn.py:baseline).") from e
  if value is not None:  # the config file imported config_lib already
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    from invjax import config_lib  # pylint: disable=g-import-not-at-top
    config_lib.follow_variant(value, config_flags.get_override_values(FLAGS[name]))
  return value


def _quiet_unraisable(default):
  """After a save that failed (e.g. a full disk), Orbax's event loop is closed while
  tensorstore still calls back into it: a RuntimeError Python can only print, with no
  bearing on the error invjax reports. Hidden unless --verbose."""

  def hook(unraisable):
    if (not FLAGS.verbose and isinstance(unraisable.exc_value, RuntimeError) and
        "Event loop is closed" in str(unraisable.exc_value)):
      return
    default(unraisable)

  return hook


def run(main) -> None:
  """absl.app.run(main), with user errors as short messages and exit status 2."""
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)

  def guarded(argv):
    from invjax import checkpoints  # pylint: disable=g-import-not-at-top
    checkpoints.SHOW_ORBAX_LOGS = FLAGS.verbose
    try:
      return main(argv)
    except (errors.UserError, app.UsageError) as e:
      errors.report_and_exit(e, FLAGS.verbose)

  app.run(guarded, flags_parser=parse_flags)
