"""experiments/gpu_window.sh across the calls of one window: a phase done is not run
again, a phase that cannot start before WINDOW_END is skipped, and RESUME carries an
earlier call's pack to a fresh machine. Its `env` phase stands in for every phase."""

import os
import pathlib
import subprocess
import sys
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _window(out, *phases, **env):
  path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
  env = {**os.environ, "PATH": path, "OUT": str(out), **env}
  for name in ("PACK", "RESUME", "WINDOW_END", "REDO"):
    env.setdefault(name, "")
  done = subprocess.run(["bash", str(ROOT / "experiments/gpu_window.sh"), *phases],
                        env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stdout + done.stderr
  return done.stdout


def _phases(out):
  return (out / "phases.txt").read_text().splitlines()


def test_a_window_goes_on_where_its_last_call_stopped(tmp_path):
  first, pack = tmp_path / "first", tmp_path / "w.tgz"
  _window(first, "env", PACK=str(pack))
  assert [p.split(" after")[0] for p in _phases(first)] == ["env: rc=0"]
  assert jax.__version__ in (first / "env.log").read_text()  # the phase ran
  assert pack.exists()

  # The same $OUT: env is not run again; loss cannot start 35 s before WINDOW_END (10 s
  # kept back, 30 s the least a phase starts with).
  said = _window(first, "env", "loss", WINDOW_END=str(int(time.time()) + 35))
  assert "env: done before" in said
  assert not (first / "loss.log").exists()
  assert [p.split(",")[0].split(" after")[0] for p in _phases(first)] == [
      "env: rc=0", "loss: skipped"]

  # A fresh machine: the pack brings the finished phase back.
  second = tmp_path / "second"
  said = _window(second, "env", RESUME=str(pack))
  assert "resumed from" in said and "env: done before" in said
  assert (second / "env.log").read_text() == (first / "env.log").read_text()

  # REDO runs it again; a missing RESUME file is said, and every phase runs.
  _window(second, "env", REDO="1")
  assert [p.split(" after")[0] for p in _phases(second)] == ["env: rc=0", "env: rc=0"]
  said = _window(tmp_path / "third", "env", RESUME=str(tmp_path / "none.tgz"))
  assert "no such file" in said and "env: rc=0" in said
