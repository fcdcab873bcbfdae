"""Nothing lost, nothing silently wrong: the faults of issue 15, each tried.

keep_checkpoints=0, a finite divergence and a dead network, train and test data that
disagree, a failing final evaluation, two writers on one workdir, analyze on damaged
checkpoints or an unwritable workdir, a full disk during a save, and the command line's
short messages (exit status 2, no traceback).
"""

import errno
import gc
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys

from absl import logging as absl_logging
import jax
import numpy as np
import pytest

from invjax import analysis
from invjax import analyze
from invjax import build as build_lib
from invjax import checkpoints
from invjax import divergence
from invjax import errors
from invjax import evaluation
from invjax import metrics_io
from invjax import placement as placement_lib
from invjax import programs as programs_lib
from invjax import train
from invjax import workdir_lock
from invjax import workdirs
from tests import helpers


@pytest.fixture(scope="module")
def good_run(npz, tmp_path_factory):
  """8 steps, a checkpoint every 2, all kept (keep_checkpoints=0): 2, 4, 6, 8."""
  workdir = str(tmp_path_factory.mktemp("good"))
  config = helpers.tiny_config(npz, checkpoint_every_steps=2, keep_checkpoints=0)
  train.train_and_evaluate(config, workdir, tensorboard=False)
  return config, workdir


def _steps(workdir):
  ck = checkpoints.Checkpoints(workdir)
  try:
    return ck.manager.all_steps()
  finally:
    ck.close()


def _params(workdir, config, step):
  ck = checkpoints.Checkpoints(workdir)
  try:
    target = build_lib.initial_state(build_lib.build(config),
                                     placement_lib.Placement.create())
    return jax.device_get(ck.restore(target, step).params)
  finally:
    ck.close()


# 1. keep_checkpoints=0 ---------------------------------------------------------------

def test_keep_checkpoints_zero_keeps_every_checkpoint(good_run):
  """0 means "all" here as elsewhere in the config (it used to keep none: the trained
  model was gone at exit 0)."""
  _, workdir = good_run
  assert _steps(workdir) == [2, 4, 6, 8]


# 2. Divergence -----------------------------------------------------------------------

def test_finite_divergence_stops_and_never_evicts_the_good_checkpoints(npz, good_run,
                                                                      tmp_path):
  """Continuing a good run with learning_rate=1e6 (--allow_config_change): the
  cross-entropy explodes (finite), the run stops naming the step, and rotation keeps
  the good checkpoints instead of replacing them with diverged ones."""
  config, good = good_run
  workdir = str(tmp_path / "run")
  shutil.copytree(good, workdir)
  before = _params(workdir, config, 8)
  diverging = helpers.tiny_config(npz, checkpoint_every_steps=2, learning_rate=1e6,
                                  num_epochs=5.0, stop_dead_network=False,
                                  keep_checkpoints=3)
  with pytest.raises(errors.DivergenceError) as e:
    train.train_and_evaluate(diverging, workdir, allow_config_change=True,
                             tensorboard=False)
  message = str(e.value)
  assert "training diverged at step" in message and "cross_entropy" in message
  assert "last good one (step 8) is kept" in message
  step = int(message.split("at step ")[1].split(":")[0])
  assert step > 8
  assert _steps(workdir) == [2, 4, 6, 8]  # with 3 kept, diverged saves would evict
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, config, 8), before)
  records = metrics_io.read(workdir)
  ce = [r["train/cross_entropy"] for r in records if "train/cross_entropy" in r]
  assert np.all(np.isfinite(ce))  # finite: the NaN check alone would not stop it


def test_a_dead_network_is_caught_and_not_checkpointed(npz, good_run, tmp_path):
  """A network whose class scores no longer depend on the input (here: every weight
  zeroed, as a diverged run leaves it) is dead; the check fires on it and not on the
  trained or a fresh network."""
  config, good = good_run
  run = build_lib.build(config)
  placement = placement_lib.Placement.create()
  state = build_lib.initial_state(run, placement)
  images = run.data.x_train[:16]
  spread = jax.jit(divergence.class_score_spread)  # pylint: disable=protected-access
  assert float(spread(state, images)) > 100 * divergence.DEAD_SPREAD  # fresh
  dead = state.replace(params=jax.tree.map(np.zeros_like, state.params))
  assert float(spread(dead, images)) <= divergence.DEAD_SPREAD
  same = np.repeat(images[:1], 16, axis=0)  # identical images tell nothing
  assert float(spread(dead, same)) == 1.0
  # End to end: zero the state after the first step; the run stops at the first log
  # step (2) before its checkpoint.
  workdir = str(tmp_path / "run")
  original = programs_lib.TrainPrograms.__call__

  def killing(self, st, step0, size):
    st, metrics = original(self, st, step0, size)
    return st.replace(params=jax.tree.map(jax.numpy.zeros_like, st.params)), metrics

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(programs_lib.TrainPrograms, "__call__", killing)
    with pytest.raises(errors.DivergenceError, match=r"at step 2: the network is dead"):
      train.train_and_evaluate(helpers.tiny_config(config.dataset,
                                                   checkpoint_every_steps=2),
                               workdir, tensorboard=False)
  assert _steps(workdir) == []


def test_healthy_tiny_run_is_far_from_the_divergence_limit(good_run):
  config, workdir = good_run
  ce = [r["train/cross_entropy"] for r in metrics_io.read(workdir)
        if "train/cross_entropy" in r]
  assert max(ce) < divergence.divergence_limit(config, 4) / 3


# 3. Train and test data; the final checkpoint before the final evaluation ------------

@pytest.mark.parametrize("test_shape,message", [
    ((8, 8, 3), r"test images have shape \(8, 8, 3\) but the training images "
                r"\(16, 16, 3\)"),
    ((16, 16, 1), r"test images have shape \(16, 16, 1\) but the training images "
                  r"\(16, 16, 3\)"),
])
def test_train_and_test_images_of_other_shapes_are_refused_before_training(
    tmp_path, test_shape, message):
  x, y = helpers.toy_images(64)
  xt = np.zeros((24, *test_shape), np.uint8)
  path = str(tmp_path / "mixed.npz")
  np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=y[:24])
  with pytest.raises(errors.DataError, match=message):
    build_lib.build(helpers.tiny_config(path))


def test_labels_outside_the_named_classes_are_refused(tmp_path):
  x, y = helpers.toy_images(64)
  path = str(tmp_path / "labels.npz")
  np.savez(path, x_train=x, y_train=y, x_test=x[:8], y_test=np.full(8, 7),
           label_names=np.array(["a", "b", "c", "d"]))
  with pytest.raises(errors.DataError, match=r"y_test has labels outside \[0, 4\)"):
    build_lib.build(helpers.tiny_config(path))


def test_final_checkpoint_is_written_before_the_final_evaluation(npz, tmp_path,
                                                                monkeypatch):
  """An evaluation that fails after the last step loses nothing: the checkpoint of
  that step is written first."""
  real = evaluation.evaluate_batches

  def failing(eval_step, state, batches):
    if int(jax.device_get(state.step)) == 4:
      raise RuntimeError("evaluation failed")
    return real(eval_step, state, batches)

  monkeypatch.setattr(evaluation, "evaluate_batches", failing)
  config = helpers.tiny_config(npz, num_epochs=1.0, lr_boundaries=())
  with pytest.raises(RuntimeError, match="evaluation failed"):
    train.train_and_evaluate(config, str(tmp_path), tensorboard=False)
  assert _steps(str(tmp_path)) == [4]


# 4. One writer per workdir -----------------------------------------------------------

HOLD = ("import sys, time; sys.path.insert(0, sys.argv[1]); "
        "from invjax import workdir_lock; "
        "workdir_lock.WorkdirLock(sys.argv[2], 'test').acquire(); "
        "print('held', flush=True); time.sleep(120)")


def test_a_second_writer_is_refused_naming_the_process_and_a_killed_ones_lock_is_taken(
    npz, tmp_path):
  workdir = str(tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", HOLD, helpers.ROOT, workdir],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    config = helpers.tiny_config(npz)
    with pytest.raises(errors.WorkdirError) as e:
      train.train_and_evaluate(config, workdir, tensorboard=False)
    assert f"in use by process {holder.pid} on " in str(e.value)
    with pytest.raises(errors.WorkdirError, match=f"process {holder.pid}"):
      workdirs.lock(workdir, "analyze")
    assert not os.path.exists(os.path.join(workdir, "config.json"))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The killed holder's file still names it; its flock went with it.
  assert str(holder.pid) in open(os.path.join(workdir, workdir_lock.LOCK_FILE)).read()
  lock = workdirs.lock(workdir, "train")
  lock.release()


def test_the_lock_without_flock_falls_back_to_the_holders_liveness(tmp_path,
                                                                   monkeypatch):
  """On a file system without flock, the file names the holder: a live one blocks, a
  dead one (a pid that is not running) does not."""
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "no locks available")
  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  path = tmp_path / workdir_lock.LOCK_FILE
  import socket  # pylint: disable=g-import-not-at-top
  path.write_text('{"pid": %d, "host": "%s"}' % (int(dead.stdout), socket.gethostname()))
  workdir_lock.WorkdirLock(str(tmp_path)).acquire()  # stale: taken over
  workdir_lock.WorkdirLock._held.clear()  # pylint: disable=protected-access
  path.write_text('{"pid": %d, "host": "%s"}' % (os.getppid(), socket.gethostname()))
  with pytest.raises(workdir_lock.WorkdirBusy, match=f"process {os.getppid()}"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()


# 5. Analyze --------------------------------------------------------------------------

def _truncate_checkpoint(workdir, step):
  data = [os.path.join(d, f) for d, _, files in
          os.walk(os.path.join(workdir, "checkpoints", str(step)))
          for f in files if os.path.basename(d) == "d"]
  assert data
  for path in data:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def test_analyze_falls_back_from_a_damaged_checkpoint_and_closes_orbax(
    good_run, tmp_path, monkeypatch, caplog):
  config, good = good_run
  workdir = str(tmp_path / "run")
  shutil.copytree(good, workdir)
  _truncate_checkpoint(workdir, 8)
  opened, closed = [], []
  real_init, real_close = checkpoints.Checkpoints.__init__, checkpoints.Checkpoints.close
  monkeypatch.setattr(checkpoints.Checkpoints, "__init__",
                      lambda self, *a, **k: (opened.append(self),
                                             real_init(self, *a, **k))[1])
  monkeypatch.setattr(checkpoints.Checkpoints, "close",
                      lambda self: (closed.append(self), real_close(self))[1])
  # Other tests' failed restores leave Orbax's tasks for the garbage collector, which
  # logs their errors when it collects them: collected here, they are not this test's.
  gc.collect()
  caplog.clear()
  summary = analyze.analyze(config, workdir)
  assert summary["step"] == 6
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged-8"))
  assert set(map(id, opened)) == set(map(id, closed))
  # What the log shows (through absl's handler and its filters): one warning line.
  shown = [r for r in caplog.records if r.levelno >= logging.WARNING and
           all(f.filter(r) for f in absl_logging.get_absl_handler().filters)]
  assert len(shown) == 1 and "damaged-8" in shown[0].getMessage(), shown
  assert "\n" not in shown[0].getMessage() and not shown[0].exc_info
  # Every checkpoint damaged: the checkpoints are blamed, not the config.
  for step in (2, 4, 6):
    _truncate_checkpoint(workdir, step)
  with pytest.raises(errors.CheckpointError, match="none of the checkpoints.*damaged"):
    analyze.analyze(config, workdir)
  assert set(map(id, opened)) == set(map(id, closed))


def test_analyze_checks_it_can_write_before_scoring(good_run, tmp_path, monkeypatch):
  config, good = good_run
  workdir = str(tmp_path / "run")
  shutil.copytree(good, workdir)
  shutil.rmtree(os.path.join(workdir, "analysis"), ignore_errors=True)
  with open(os.path.join(workdir, "analysis"), "w") as f:  # in the way of the outputs
    f.write("")
  monkeypatch.setattr(analysis.Scorer, "__call__",
                      lambda *a, **k: pytest.fail("scored before checking the outputs"))
  with pytest.raises(errors.WorkdirError, match=r"analysis cannot be written.*nothing "
                     "was scored"):
    analyze.analyze(config, workdir)


# Disk full during a save ---------------------------------------------------------------

def test_disk_full_during_a_save_removes_the_temporary_and_a_rerun_resumes(
    npz, good_run, tmp_path, monkeypatch):
  """The rename that completes checkpoint 6 fails with ENOSPC (as a full disk makes a
  write fail): the run stops saying so, removes the temporary directory, and a rerun
  resumes from checkpoint 4 and ends as the uninterrupted run does."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  real = atomicity.AtomicRenameTemporaryPath.finalize

  async def full(self):
    if self._final_path.name == "6":  # pylint: disable=protected-access
      raise OSError(errno.ENOSPC, "No space left on device")
    return await real(self)

  config, good = good_run
  workdir = str(tmp_path)
  with monkeypatch.context() as mp:
    mp.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full)
    with pytest.raises(errors.DiskFullError) as e:
      train.train_and_evaluate(config, workdir, tensorboard=False)
  assert "no space left" in str(e.value) and "last complete checkpoint is step 4" in \
      str(e.value)
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
  assert _steps(workdir) == [2, 4]
  resumed = []
  real_restore = workdirs.restore_latest

  def restore(*args):
    state, step = real_restore(*args)
    resumed.append(step)
    return state, step

  monkeypatch.setattr(workdirs, "restore_latest", restore)
  train.train_and_evaluate(config, workdir, tensorboard=False)
  assert resumed[0] == 4 and _steps(workdir) == [2, 4, 6, 8]
  jax.tree.map(np.testing.assert_array_equal, _params(workdir, config, 8),
               _params(good, config, 8))


# The command line ---------------------------------------------------------------------

def _cli(*args, cwd=helpers.ROOT):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "invjax.main", "--notensorboard", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _short_error(out, *expected):
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = out.stderr.splitlines()
  first = [i for i, l in enumerate(lines) if l.startswith("error: ")]
  assert first, out.stderr[-3000:]
  error = "\n".join(lines[first[0]:])
  assert len(error.splitlines()) <= 14, error
  for text in expected:
    assert text in error, error


def test_cli_user_errors_exit_2_with_a_short_message(npz, good_run, tmp_path):
  """Through both paths of invjax.cli: a flag that does not parse (an unknown field),
  and a UserError raised in main (a bad .npz: data; a workdir in use: workdir). Each
  before anything compiles. Config, checkpoint and divergence faults are UserErrors too
  (test_user_errors_of_every_kind_are_user_errors) and take the second path."""
  config = f"--config=tests/tiny_config.py:{npz}"
  work = f"--workdir={tmp_path / 'w'}"
  _short_error(_cli(config, work, "--config.no_such_field=1"),
               "no field 'no_such_field'", "learning_rate", "keep_checkpoints")
  empty = tmp_path / "empty.npz"
  empty.write_bytes(b"")
  _short_error(_cli(f"--config=tests/tiny_config.py:{empty}", work),
               str(empty), "it is empty (0 bytes)")
  _, good = good_run
  holder = subprocess.Popen([sys.executable, "-c", HOLD, helpers.ROOT, good],
                            stdout=subprocess.PIPE, text=True)
  try:
    holder.stdout.readline()
    _short_error(_cli(config, f"--workdir={good}"), f"process {holder.pid}")
  finally:
    holder.kill()
    holder.wait()
  assert not os.path.exists(tmp_path / "w" / "config.json")


def test_user_errors_of_every_kind_are_user_errors(npz, good_run):
  """What the command line turns into exit status 2: config, data, workdir, checkpoint
  and divergence faults all raise a UserError."""
  config, good = good_run
  kinds = [errors.ConfigError, errors.DataError, errors.DataFileError,
           errors.DataUnavailable, errors.WorkdirError, errors.RunNotFound,
           errors.CheckpointError, errors.DivergenceError, errors.DiskFullError]
  assert all(issubclass(k, errors.UserError) for k in kinds)
  other = helpers.tiny_config(npz, checkpoint_every_steps=2, keep_checkpoints=0,
                              **{"model.layers": ((16, 3, 1, "SAME"), (8, 3, 2, "SAME"))})
  with pytest.raises(errors.CheckpointError, match=r"do not fit the model of this "
                     r"config, which differs from the run's .*config.json in: "
                     r"model.layers"):
    analyze.analyze(other, good)
  with pytest.raises(errors.RunNotFound):
    workdirs.load_config(os.path.join(good, "nothing"))


def test_a_step_damaged_again_is_moved_aside_beside_the_first(good_run, tmp_path):
  # After a resume from 6 retrains step 8, a second damaged 8 must not block the run
  # (nor be blamed on every checkpoint): it goes to damaged-8.2.
  config, good = good_run
  workdir = str(tmp_path / "run")
  shutil.copytree(good, workdir)
  ckdir = os.path.join(workdir, "checkpoints")
  for _ in range(2):
    _truncate_checkpoint(workdir, 8)
    assert analyze.analyze(config, workdir)["step"] == 6
    shutil.copytree(os.path.join(ckdir, "6"), os.path.join(ckdir, "8"))
  assert {"damaged-8", "damaged-8.2"} <= set(os.listdir(ckdir))
  gc.collect()  # the failed restores' tasks, while this test's log is captured


def test_a_checkpoint_past_a_shortened_end_is_refused_naming_num_epochs(npz, good_run,
                                                                        tmp_path):
  _, good = good_run
  workdir = str(tmp_path / "run")
  shutil.copytree(good, workdir)
  shorter = helpers.tiny_config(npz, checkpoint_every_steps=2, keep_checkpoints=0,
                                num_epochs=1.0, lr_boundaries=(0.5,))  # 4 steps, not 8
  with pytest.raises(errors.ConfigError, match=r"checkpoint at step 8 .*past the end "
                     r"of config.num_epochs=1 \(4 steps\)"):
    train.train_and_evaluate(shorter, workdir, allow_config_change=True,
                             tensorboard=False)
  assert workdirs.load_config(workdir).num_epochs == 2.0  # its config is kept


def test_layers_shrunk_to_nothing_are_refused_before_compiling(npz):
  config = helpers.tiny_config(npz, **{"model.layers": ((8, 40, 1, "VALID"),)})
  with pytest.raises(errors.ConfigError, match=r"too small for this model .* its layer "
                     r"\w+ would be 0x0x8"):
    build_lib.build(config)
