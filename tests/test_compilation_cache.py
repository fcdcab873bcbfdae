"""JAX's persistent compilation cache, on by default for real runs (a subprocess each)."""

import os
import subprocess
import sys

import pytest

from tests import helpers


def _describe(tmp_path, *flags):
  """`invjax.main --mode=describe` (it compiles the model's forward pass) in a fresh
  process with its user cache directory under tmp_path; returns the cache's entries."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # tiny programs too
  out = subprocess.run(
      [sys.executable, "-m", "invjax.main", "--config=tests/tiny_config.py",
       "--mode=describe", "--notensorboard", *flags],
      cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _entries(path):
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_second_start_finds_every_program_in_the_default_cache(tmp_path):
  default = tmp_path / "xdg" / "invjax" / "jax"
  _describe(tmp_path)
  first = _entries(default)
  assert any(e.endswith("-cache") for e in first), first
  _describe(tmp_path)
  # Every program of the second start was found there: nothing new was written.
  assert [e for e in _entries(default) if e.endswith("-cache")] == [
      e for e in first if e.endswith("-cache")]


@pytest.mark.slow  # ~17 s: two more starts
def test_flag_moves_or_disables_the_cache(tmp_path):
  moved = tmp_path / "elsewhere"
  _describe(tmp_path, f"--compilation_cache={moved}", "--verbosity=1")
  assert _entries(moved) and not _entries(tmp_path / "xdg" / "invjax" / "jax")
  out = _describe(tmp_path, "--compilation_cache=off", "--verbosity=1")
  assert "compilation cache: off" in out.stderr
  assert not _entries(tmp_path / "xdg" / "invjax" / "jax")
