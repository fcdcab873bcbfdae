"""JAX's persistent compilation cache for real runs: `--compilation_cache=DIR|off`.

A run's programs (the training chunk, evaluation, scoring) are compiled again on every
start unless JAX keeps them on disk: a rerun or a resume of the same config then loads
them instead (DenseNet-BC's training program takes two minutes to compile on a GPU).
By default the cache is in the user's cache directory, $XDG_CACHE_HOME/invjax/jax
(~/.cache/invjax/jax); a JAX_COMPILATION_CACHE_DIR already in the environment wins over
the default (JAX reads it itself). JAX writes only programs that took at least
`jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile. Entries are
keyed by the program, the JAX version and the device, so one directory serves all runs.
On a GPU, JAX also keeps XLA's autotuning results there, per convolution and fusion: a
new program whose convolutions an earlier one compiled skips their autotuning.

Call `configure` before anything compiles: JAX decides once, at its first compilation,
whether a cache is in use.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax

AUTO = "auto"
_FLAG = {}


def default_dir() -> str:
  base = (os.environ.get("XDG_CACHE_HOME")
          or os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.join(base, "invjax", "jax")


def define_flags() -> None:
  _FLAG["cache"] = flags.DEFINE_string(
      "compilation_cache", AUTO,
      "Where JAX keeps compiled programs between starts, so that a rerun or resume "
      "compiles in seconds: a directory, 'off', or 'auto' (the default: "
      "$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/invjax/jax or "
      "~/.cache/invjax/jax).")


def configure(value: str | None = None) -> str | None:
  """Turns the cache on (in `value`'s directory) or off; returns the directory or None.

  value: a directory, "off", or "auto"/None (the --compilation_cache flag if defined,
  else "auto").
  """
  if value is None:
    value = _FLAG["cache"].value if "cache" in _FLAG else AUTO
  if value == "off":
    jax.config.update("jax_enable_compilation_cache", False)
    logging.info("compilation cache: off")
    return None
  if value == AUTO:
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    value = env or default_dir()
  path = os.path.abspath(os.path.expanduser(value))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--compilation_cache={value}: cannot create the directory ({e}); "
                     "give a writable directory or 'off'.") from e
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  logging.info("compilation cache: %s", path)
  return path
