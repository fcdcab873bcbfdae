"""Training end to end on tiny data (invjax/train.py): train, resume, refuse, stop."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from invjax import analyze
from invjax import build as build_lib
from invjax import checkpoints
from invjax import flat_state
from invjax import metrics_io
from invjax import placement as placement_lib
from invjax import programs as programs_lib
from invjax import train
from invjax import workdirs
from tests import helpers


LAYERS = helpers.TINY_SOWN


def test_training_writes_config_metrics_checkpoints(trained):
  config, workdir, result = trained
  assert result["step"] == 8 and 0.0 <= result["accuracy"] <= 1.0  # 64 / 16 x 2 epochs
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["copies"] == 4
  records = metrics_io.read(workdir)
  steps, losses = metrics_io.series(records, "train/loss")
  np.testing.assert_array_equal(steps, [2, 4, 6, 8])
  assert np.all(np.isfinite(losses))
  for layer in LAYERS:
    s, v = metrics_io.series(records, f"probe/inv_loss/{layer}")
    assert s[0] == 0 and s[-1] == 8 and np.all(v > 0)
    assert len(metrics_io.series(records, f"train/inv_loss/{layer}")[0]) == 4
  _, acc = metrics_io.series(records, "test/accuracy")
  assert acc[-1] == pytest.approx(result["accuracy"])
  ckpts = checkpoints.Checkpoints(workdir)
  assert ckpts.latest_step() == 8
  ckpts.close()
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_rerun_of_finished_run_resumes_without_training(trained, monkeypatch):
  config, workdir, result = trained
  before = len(metrics_io.read(workdir))
  # It restores into the state's shapes, computing no initial state.
  def no_initial_state(*args):
    raise AssertionError("the resume computed an initial state")

  monkeypatch.setattr(build_lib, "initial_state", no_initial_state)
  again = train.train_and_evaluate(config, workdir)
  assert again["accuracy"] == pytest.approx(result["accuracy"])
  assert len(metrics_io.read(workdir)) == before


def test_changed_config_is_refused_with_the_differing_field(trained):
  config, workdir, result = trained
  # Fields that change only the speed may change on resume.
  faster = helpers.tiny_config(config.dataset, data_on_device=False)
  assert train.train_and_evaluate(faster, workdir)["accuracy"] == pytest.approx(
      result["accuracy"])
  other = helpers.tiny_config(config.dataset, alpha=0.2)
  with pytest.raises(ValueError, match=r"alpha: saved 0.1, given 0.2"):
    train.train_and_evaluate(other, workdir)


def test_resume_after_kill_continues_from_the_last_checkpoint(npz, tmp_path):
  """SIGTERM a real training process (a Cloud TPU preemption): it checkpoints the step
  it is at and exits 143. Resume it, SIGKILL it mid-run; rerun it: it resumes from the
  last checkpoint and ends with the parameters of the same run left alone."""
  args = [sys.executable, "-m", "invjax.main", f"--config=tests/tiny_config.py:{npz}",
          "--config.num_epochs=6", "--config.lr_boundaries=(4,)",
          "--config.eval_every_epochs=3", "--config.checkpoint_every_steps=4",
          "--config.log_every_steps=4",
          "--notensorboard"]  # spares each start TensorFlow's import
  killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  # SIGTERM as soon as the run has started (its config is written before compiling).
  proc = subprocess.Popen(args + [f"--workdir={killed}"], cwd=helpers.ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and not os.path.exists(
      os.path.join(killed, "config.json")):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  stopped = int(err.split("stopped at step ")[1].split()[0])
  ck = checkpoints.Checkpoints(killed)
  assert ck.latest_step() == stopped >= 1  # nothing done was lost
  ck.close()
  proc = subprocess.Popen(args + [f"--workdir={killed}"], cwd=helpers.ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  ckpt_dir = os.path.join(killed, "checkpoints")
  while time.time() < deadline:
    done = [d for d in os.listdir(ckpt_dir) if d.isdigit() and int(d) > stopped]
    if done:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert done, "no checkpoint appeared before the deadline"
  records = metrics_io.read(killed)
  out = subprocess.run(args + [f"--workdir={killed}"], cwd=helpers.ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step" in out.stderr
  assert int(out.stderr.split("resumed from step")[1].split()[0]) > stopped
  # The same run, left alone:
  train.train_and_evaluate(workdirs.load_config(killed), whole)
  states = []
  for wd in (killed, whole):
    ck = checkpoints.Checkpoints(wd)
    assert ck.latest_step() == 24
    state = build_lib.initial_state(build_lib.build(workdirs.load_config(wd)),
                                placement_lib.Placement.create())
    states.append(ck.restore(state))
    ck.close()
  jax.tree.map(np.testing.assert_array_equal, states[0].params, states[1].params)
  # metrics of the killed run were not duplicated past the resume point
  steps, _ = metrics_io.series(metrics_io.read(killed), "train/loss")
  assert len(steps) == len(set(steps)) and steps[-1] == 24
  del records


def _restored_params(workdir):
  ck = checkpoints.Checkpoints(workdir)
  state = build_lib.initial_state(build_lib.build(workdirs.load_config(workdir)),
                              placement_lib.Placement.create())
  params = ck.restore(state).params
  ck.close()
  return params


def test_steps_per_dispatch_and_data_placement_do_not_change_the_run(npz, tmp_path,
                                                                    monkeypatch):
  """3 steps per program (with 1-step programs up to the log, eval and checkpoint
  steps) and batches gathered on the host: the run of single steps on device data.
  So is a run whose programs loop over their steps as on an accelerator, with the
  state kept in the loop's layout between programs (cuDNN's filter layout, as on a
  GPU): stopped by its time limit after its first program, it checkpoints the state
  taken out of that layout, and the next session restores it, puts it back in and
  finishes the run. (tests/test_steps.py compares each change alone at the step
  level.)"""
  runs = {"one": {}, "host": {"steps_per_dispatch": 3, "data_on_device": False},
          "loop": {"steps_per_dispatch": 3}}
  losses = {}
  for name, fields in runs.items():
    config = helpers.tiny_config(npz, num_epochs=3.0, lr_boundaries=(2,),
                                 log_every_steps=5, **fields)
    workdir = str(tmp_path / name)
    with monkeypatch.context() as mp:
      if name == "loop":
        mp.setattr(programs_lib, "unrolled_by_default", lambda: False)
        mp.setattr(flat_state, "filters_out_first", lambda platform: True)
        with config.unlocked():
          config.time_limit_minutes = 1e-4
        first = train.train_and_evaluate(config, workdir, tensorboard=False)
        assert first["stopped"] == "time_limit" and 0 < first["step"] < 12
        with config.unlocked():
          config.time_limit_minutes = 0.0
      result = train.train_and_evaluate(config, workdir, tensorboard=False)
      assert result["finished"] and result["step"] == 12
    losses[name] = metrics_io.series(metrics_io.read(workdir), "train/loss")
  np.testing.assert_array_equal(losses["one"][0], [4, 5, 8, 10, 12])
  params = {name: _restored_params(str(tmp_path / name)) for name in runs}
  weights = checkpoints.load_weights(str(tmp_path / "loop" / workdirs.WEIGHTS_FILE))[0]
  jax.tree.map(np.testing.assert_array_equal, weights, params["loop"])
  # The stopped session logged the mean loss of steps 1-3, the next the loss of step 4.
  np.testing.assert_array_equal(losses["loop"][0], [3, 4, 5, 8, 10, 12])
  (l3, l4), rest = losses["loop"][1][:2], losses["loop"][1][2:]
  assert (3 * l3 + l4) / 4 == pytest.approx(losses["one"][1][0], rel=1e-5)
  np.testing.assert_allclose(rest, losses["one"][1][1:], rtol=1e-5)
  np.testing.assert_allclose(losses["host"][1], losses["one"][1], rtol=1e-5)
  for name in ("host", "loop"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params[name], params["one"])
  # ...and the run moved: a wrong schedule could not pass as the same run.
  init = build_lib.initial_state(build_lib.build(helpers.tiny_config(npz)),
                             placement_lib.Placement.create()).params
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params["one"], init)
  assert max(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.parametrize("layout", ["unrolled", "loop"])
def test_nothing_compiles_inside_the_step_loop(npz, tmp_path, monkeypatch, layout):
  """After the first evaluation, hundreds of steps across passes, logs, evaluations,
  probes and checkpoints lower and compile nothing more; also with the steps in a
  loop and the state kept in its layout (as on an accelerator), whose checkpoints
  take it out."""
  if layout == "loop":
    monkeypatch.setattr(programs_lib, "unrolled_by_default", lambda: False)
  events = []
  watched = ("/jax/core/compile/jaxpr_to_mlir_module_duration",
             "/jax/core/compile/backend_compile_duration")

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event in watched:
      events.append(event)

  seen = {}
  original = metrics_io.Progress.__call__

  def progress(self, step):
    seen[step] = len(events)
    return original(self, step)

  monkeypatch.setattr(metrics_io.Progress, "__call__", progress)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    config = helpers.tiny_config(npz, num_epochs=12.0, lr_boundaries=(5, 9),
                                 log_every_steps=3, eval_every_epochs=2.0,
                                 checkpoint_every_steps=7, steps_per_dispatch=2)
    train.train_and_evaluate(config, str(tmp_path / "run"))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  first_eval = 2 * 4  # 4 steps per epoch
  after = min(s for s in seen if s > first_eval)
  assert seen[first_eval] > 0  # the listener sees the compilations before it
  assert seen[48] == seen[after], (
      f"{seen[48] - seen[after]} lowerings/compilations after step {after}")


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_the_good_checkpoints(
    npz, tmp_path):
  """A diverging run (lr 1e30) stops with an error naming the first non-finite step
  and its terms; every checkpoint left is finite and before that step."""
  config = helpers.tiny_config(npz, learning_rate=1e30, log_every_steps=1,
                               checkpoint_every_steps=1, num_epochs=3.0,
                               lr_boundaries=())
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  bad_step = int(message.split("step ")[1].split(":")[0].split()[0])
  assert "cross_entropy" in message or "inv_loss/" in message
  assert "last good" in message
  ck = checkpoints.Checkpoints(workdir)
  saved = ck.manager.all_steps()
  assert saved and max(saved) == bad_step - 1  # every good step before it was kept
  target = build_lib.initial_state(build_lib.build(config),
                                   placement_lib.Placement.create())
  for step in saved:
    state = ck.restore(target, step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  ck.close()


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(npz, trained,
                                                                 tmp_path):
  """Truncating the newest checkpoint's data: resume warns, sets it aside, continues
  from the one before and ends with the uninterrupted run's parameters."""
  _, whole, _ = trained  # 8 steps
  damaged = str(tmp_path / "damaged")
  train.train_and_evaluate(helpers.tiny_config(npz, checkpoint_every_steps=2), damaged)
  # Truncate every data file of checkpoint 8 (which one holds an array's bytes varies
  # from run to run; truncating only the largest sometimes left the arrays readable).
  data = [os.path.join(dirpath, f)
          for dirpath, _, files in os.walk(os.path.join(damaged, "checkpoints", "8"))
          for f in files if os.path.basename(dirpath) == "d"]
  assert data
  for path in data:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  train.train_and_evaluate(helpers.tiny_config(npz, checkpoint_every_steps=2), damaged)
  assert os.path.isdir(os.path.join(damaged, "checkpoints", "damaged-8"))
  ck = checkpoints.Checkpoints(damaged)
  assert ck.manager.all_steps() == [4, 6, 8]  # 8 trained again from 6
  ck.close()
  jax.tree.map(np.testing.assert_array_equal, _restored_params(damaged),
               _restored_params(whole))
  steps, _ = metrics_io.series(metrics_io.read(damaged), "train/loss")
  assert len(steps) == len(set(steps)) and steps[-1] == 8


def test_unusable_workdir_and_foreign_checkpoint_are_refused(npz, trained, tmp_path):
  config, workdir, _ = trained
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(PermissionError, match=r"--workdir=.*a_file/run cannot be created"):
    train.train_and_evaluate(config, str(blocker / "run"))
  wider = helpers.tiny_config(npz, **{"model.layers": ((16, 3, 1, "SAME"),
                                                       (8, 3, 2, "SAME"))})
  with pytest.raises(ValueError, match="do not fit the model of this config"):
    analyze.analyze(wider, workdir)


def test_tfds_cifar10_one_step_with_mock_data(tmp_path):
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  sys.path.insert(0, os.path.join(helpers.ROOT, "configs"))
  import allcnn  # pylint: disable=g-import-not-at-top
  config = allcnn.get_config("invariance")
  config.model = ml_collections.ConfigDict({"name": "allcnn",
                                            "layers": helpers.TINY_LAYERS})
  config.batch_size = 16
  config.num_epochs = 1.0
  config.lr_boundaries = ()
  config.eval_batch_size = 16
  config.probe_seeds = 2
  config.probe_copies = 2
  with tfds.testing.mock_data(num_examples=16):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 1
