"""End to end on tiny data: train, resume, analyze, compare; the CLI; config checks."""

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
from invjax import config_lib
from invjax import experiment
from invjax import metrics_io
from invjax import models
from invjax import placement as placement_lib
from invjax import train
from invjax import workdirs
from experiments import paper
from tests import helpers

LAYERS = helpers.TINY_SOWN


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  return helpers.write_npz(tmp_path_factory.mktemp("data") / "toy.npz")


@pytest.fixture(scope="module")
def trained(npz, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = helpers.tiny_config(npz)
  result = train.train_and_evaluate(config, workdir)
  return config, workdir, result


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


def test_rerun_of_finished_run_resumes_without_training(trained):
  config, workdir, result = trained
  before = len(metrics_io.read(workdir))
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


def test_analyze_scores_every_layer_in_depth_order(trained):
  config, workdir, _ = trained
  summary = analyze.analyze(config, workdir)
  scores, loaded = analyze.load(workdir)
  assert list(scores) == ["pixels"] + LAYERS
  assert list(loaded["layers"]) == ["pixels"] + LAYERS
  for s in scores.values():
    assert s.shape == (24, 2) and np.all(s <= 1.0)
  assert summary["step"] == 8
  for layer, stats in summary["layers"].items():
    assert stats["median"] == pytest.approx(float(np.median(scores[layer])))
  assert os.path.getsize(os.path.join(workdir, analyze.FIGURE_FILE)) > 10_000
  moved = loaded["transformed_test"]
  assert len(moved["accuracy_per_pass"]) == 2  # one pass per scoring transformation
  assert moved["accuracy"] == pytest.approx(np.mean(moved["accuracy_per_pass"]))
  assert moved["cross_entropy"] != loaded["test"]["cross_entropy"]


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


def test_steps_per_dispatch_and_data_placement_do_not_change_the_run(npz, tmp_path):
  """3 steps per program (with 1-step programs up to the log, eval and checkpoint
  steps) and batches gathered on the host: the run of single steps on device data.
  (tests/test_steps.py compares each change alone at the step level.)"""
  runs = {"one": {}, "host": {"steps_per_dispatch": 3, "data_on_device": False}}
  losses = {}
  for name, fields in runs.items():
    config = helpers.tiny_config(npz, num_epochs=3.0, lr_boundaries=(2,),
                                 log_every_steps=5, **fields)
    train.train_and_evaluate(config, str(tmp_path / name))
    losses[name] = metrics_io.series(metrics_io.read(str(tmp_path / name)),
                                     "train/loss")
  np.testing.assert_array_equal(losses["one"][0], [4, 5, 8, 10, 12])
  params = {name: _restored_params(str(tmp_path / name)) for name in runs}
  for name in ("host",):
    np.testing.assert_allclose(losses[name][1], losses["one"][1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params[name], params["one"])
  # ...and the run moved: a wrong schedule could not pass as the same run.
  init = build_lib.initial_state(build_lib.build(helpers.tiny_config(npz)),
                             placement_lib.Placement.create()).params
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params["one"], init)
  assert max(jax.tree.leaves(moved)) > 1e-3


def test_nothing_compiles_inside_the_step_loop(npz, tmp_path, monkeypatch):
  """After the first evaluation, hundreds of steps across passes, logs, evaluations,
  probes and checkpoints lower and compile nothing more."""
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


def test_compare_variants_table_and_figures(npz, tmp_path):
  base = helpers.tiny_config(npz, num_epochs=1.0, lr_boundaries=())
  result = experiment.compare_variants(base, str(tmp_path), ["baseline", "invariance"])
  table = result["table"]
  assert "baseline" in table and "invariance" in table and "conv3" in table
  assert table.index("pixels") < table.index("conv1") < table.index("conv3")
  for path in result["figures"]:
    assert os.path.getsize(path) > 10_000
  # a second call reuses both runs: nothing is trained again
  mtimes = {v: os.path.getmtime(os.path.join(tmp_path, v, "metrics.jsonl"))
            for v in ("baseline", "invariance")}
  summary = os.path.join(tmp_path, "baseline", analyze.SUMMARY_FILE)
  scored = os.path.getmtime(summary)
  experiment.compare_variants(base, str(tmp_path), ["baseline", "invariance"])
  for v, t in mtimes.items():
    assert os.path.getmtime(os.path.join(tmp_path, v, "metrics.jsonl")) == t
  assert os.path.getmtime(summary) == scored  # nor scored again
  # ...unless the scores were made by another version of the scoring
  with open(summary) as f:
    old = json.load(f)
  old["scoring_version"] = analyze.SCORING_VERSION - 1
  with open(summary, "w") as f:
    json.dump(old, f)
  experiment.compare_variants(base, str(tmp_path), ["baseline"])
  with open(summary) as f:
    assert json.load(f)["scoring_version"] == analyze.SCORING_VERSION


def test_cli_describe_needs_no_data_when_the_config_declares_its_shape():
  """Tiny ImageNet is not prepared here: describe works from the declared shapes."""
  out = subprocess.run([sys.executable, "-m", "invjax.main",
                        "--config=configs/allcnn_tinyimagenet.py", "--mode=describe",
                        "--config.model.width=0.125", "--config.data_dir=/nonexistent"],
                       cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  model = models.create("allcnn", 200, width=0.125, layers="tinyimagenet")
  assert f"parameters: {models.param_count(model, (64, 64, 3)):,}" in out.stdout
  assert "tiny_imagenet (declared, not loaded): input (64, 64, 3), 200 classes" in out.stdout
  assert "conv12       (4, 4, 200)" in out.stdout
  assert "150 epochs of batch 128 (16 seeds x 8 copies)" in out.stdout
  flops = float(out.stdout.split("forward FLOPs per image (XLA): ")[1].split()[0])
  macs = float(out.stdout.split("(every tap, as papers count): ")[1].split()[0])
  assert 0.9 * macs < flops / 2 <= macs  # XLA leaves out the taps on zero padding


def test_describe_loads_the_data_when_the_shape_is_not_declared(npz):
  from invjax import describe  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_config(npz)
  d = describe.describe(config)
  assert d["input"] == (16, 16, 3) and d["num_classes"] == 4
  assert d["steps_per_epoch"] == 64 // 16 and d["total_steps"] == 8
  assert list(d["sown_layers"]) == helpers.TINY_SOWN
  assert "8 steps, 4 per epoch" in describe.format_description(d, config)


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


BAD = [
    ({"batch_size": 100, "copies": 8}, "config.batch_size=100 is not a multiple"),
    ({"copies": 0}, "config.copies=0"),
    ({"alpha": 1.0}, r"config.alpha=1.0 must be a finite number in \[0, 1\)"),
    ({"alpha": 0.1, "copies": 1}, "needs copies"),
    ({"loss_method": "cosine"}, "config.loss_method='cosine'.*pairwise"),
    ({"model.name": "vgg"}, "config.model.name='vgg'.*allcnn"),
    ({"augment.hue": 0.1}, r"config.augment.hue is not a field"),
    ({"lr_boundaries": (1, 5), "num_epochs": 3.0}, r"epoch\(s\) \[5\]"),
    ({"num_epochs": 0.0}, "num_epochs=0.0"),
    ({"image_shape": (32, 32)}, r"config.image_shape=\(32, 32\) must be \(height, "),
    ({"num_classes": -1}, "config.num_classes=-1 must be an integer >= 2, or 0"),
    ({"steps_per_dispatch": 0}, "config.steps_per_dispatch=0 must be an integer >= 1"),
    ({"batch_size": 24, "copies": 8, "_devices": 2},
     "gives 3 seed images per batch, not a multiple of the 2 devices"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_config_errors_name_field_and_fix(overrides, message):
  c = helpers.tiny_config("digits")
  overrides = dict(overrides)
  devices = overrides.pop("_devices", 1)
  with c.unlocked():
    for k, v in overrides.items():
      config_lib.set_field(c, k, v)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c, devices)


def test_data_of_another_shape_or_class_count_is_refused_naming_both(npz):
  c = helpers.tiny_config(npz, image_shape=(32, 32, 3), num_classes=10)
  with pytest.raises(ValueError) as e:
    build_lib.build(c)
  message = str(e.value)
  assert ("config.image_shape=(32, 32, 3) but toy.npz has images of shape (16, 16, 3); "
          "set --config.image_shape='(16, 16, 3)'") in message
  assert "config.num_classes=10 but toy.npz has 4 classes" in message
  c = helpers.tiny_config(npz, image_shape=(16, 16, 3), num_classes=4)
  assert build_lib.build(c).data.image_shape == (16, 16, 3)  # matching data are accepted


def test_seeds_must_split_over_devices():
  c = helpers.tiny_config("digits", batch_size=24, copies=8)  # 3 seeds
  with pytest.raises(ValueError, match="multiple of the 2 devices"):
    config_lib.validate(c, num_devices=2)


def test_variants_set_copies_and_alpha():
  c = config_lib.base_config()
  c.invariance_copies, c.invariance_alpha = 4, 0.3
  assert (config_lib.apply_variant(c, "invariance").copies, c.alpha) == (4, 0.3)
  assert (config_lib.apply_variant(c, "batchaug").copies, c.alpha) == (4, 0.0)
  assert (config_lib.apply_variant(c, "baseline").copies, c.alpha) == (1, 0.0)
  assert c.variant == "baseline"
  with pytest.raises(ValueError, match="valid variants are"):
    config_lib.apply_variant(c, "strong")


def test_overriding_invariance_fields_after_the_variant_reaches_copies_and_alpha():
  """A config file applies its variant; command-line overrides come later, and those
  of the variant's inputs apply before it (config_lib.override, as cli.config_flag
  does with the --config.FIELD=VALUE overrides)."""
  import copy  # pylint: disable=g-import-not-at-top
  inv = config_lib.apply_variant(config_lib.base_config(), "invariance")
  inv.lock()
  config_lib.override(inv, {"invariance_alpha": 0.5, "invariance_copies": 4})
  assert (inv.copies, inv.alpha) == (4, 0.5)
  aug = config_lib.apply_variant(config_lib.base_config(), "batchaug")
  config_lib.override(aug, {"invariance_alpha": 0.5, "invariance_copies": 4})
  assert (aug.copies, aug.alpha) == (4, 0.0)
  # copies or alpha given themselves keep their values.
  own = config_lib.override(config_lib.apply_variant(config_lib.base_config(),
                                                     "invariance"),
                            {"invariance_alpha": 0.5, "alpha": 0.2})
  assert (own.copies, own.alpha) == (8, 0.2)
  # Re-applying a variant sets plain values, and copies are independent of their
  # original.
  other = copy.deepcopy(inv)
  config_lib.apply_variant(other, "baseline")
  assert (other.copies, other.alpha) == (1, 0.0)
  assert (other.invariance_copies, other.invariance_alpha) == (4, 0.5)
  assert (inv.copies, inv.alpha) == (4, 0.5)
  other.invariance_alpha = 0.2
  assert inv.alpha == 0.5
  assert json.loads(inv.to_json_best_effort())["alpha"] == 0.5


def test_command_line_overrides_of_the_variants_inputs_reach_copies_and_alpha():
  """--config.invariance_alpha=0.3 on the command line reaches alpha, although the
  config file applied its variant before the overrides were read."""
  out = subprocess.run([sys.executable, "-m", "invjax.main", "--mode=describe",
                        "--config=configs/quickstart.py", "--config.invariance_alpha=0.3",
                        "--config.invariance_copies=4"],
                       cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert "alpha: 0.3" in lines and "copies: 4" in lines


# Each config as FACTS.md has it: (batch, M, epochs, lr, boundaries, decay, translate).
PAPER = {
    "allcnn.py": (128, 8, 350, 0.01, (200, 250, 300), 0.1, 0.1),
    "wrn.py": (128, 8, 200, 0.1, (60, 120, 160), 0.2, 0.1),
    "densenet.py": (64, 8, 300, 0.1, (150, 225), 0.1, 0.1),
    "allcnn_tinyimagenet.py": (128, 8, 150, 0.01, (100, 125), 0.1, 0.0),
    "wrn_tinyimagenet.py": (32, 4, 50, 0.01, (30, 40), 0.2, 0.0),
}
TINY_MODEL = {  # overrides that shrink each config's model to seconds of compiling
    # (the full layer sets are tested in test_models.py; compiling them takes longer)
    "allcnn.py": {"layers": helpers.TINY_LAYERS},
    "wrn.py": {"depth": 10, "widen": 1},
    "densenet.py": {"depth": 10, "growth": 4},
    "allcnn_tinyimagenet.py": {"layers": ((8, 11, 2, "SAME"), (8, 3, 2, "SAME"))},
    "wrn_tinyimagenet.py": {"depth": 10, "widen": 1},
    "quickstart.py": {"layers": helpers.TINY_LAYERS},
}
CONFIG_FILES = sorted(f for f in os.listdir(os.path.join(helpers.ROOT, "configs"))
                      if f.endswith(".py") and not f.startswith("_"))


def _load_config_module(config_file):
  return paper.load_config_module(os.path.join("configs", config_file))


def test_every_config_file_is_covered():
  assert set(CONFIG_FILES) == set(TINY_MODEL), "add the new config to TINY_MODEL"
  assert set(PAPER) <= set(CONFIG_FILES)


@pytest.mark.parametrize("config_file", sorted(PAPER))
def test_paper_configs_have_the_papers_hyperparameters(config_file):
  module = _load_config_module(config_file)
  batch, m, epochs, lr, boundaries, decay, translate = PAPER[config_file]
  for variant, (copies, alpha) in {"invariance": (m, 0.1), "baseline": (1, 0.0),
                                   "batchaug": (m, 0.0)}.items():
    c = module.get_config(variant)
    assert (c.copies, c.alpha, c.variant) == (copies, alpha, variant)
    assert (c.batch_size, c.num_epochs, c.learning_rate, tuple(c.lr_boundaries),
            c.lr_decay) == (batch, epochs, lr, boundaries, decay)
    assert (c.momentum, c.nesterov, c.alpha_ratio) == (0.9, True, 10.0)
    assert c.augment.translate == translate and c.augment.rotation == 22.5
  tiny = "tinyimagenet" in config_file
  assert c.dataset == ("tiny_imagenet" if tiny else "cifar10")
  assert (tuple(c.image_shape), c.num_classes) == (
      ((64, 64, 3), 200) if tiny else ((32, 32, 3), 10))
  assert c.test_split == ("validation" if tiny else "test")


# All-CNN and the quickstart run by default; WRN, DenseNet and the Tiny ImageNet forms
# (10-17 s each, nearly all compilation) with -m slow. Their models' shapes, sizes and
# costs are checked in tests/test_models.py, and the train step is the same for all.
SLOW_CONFIGS = ("wrn", "densenet", "tinyimagenet")


@pytest.mark.parametrize("config_file", [
    pytest.param(f, marks=pytest.mark.slow) if any(s in f for s in SLOW_CONFIGS) else f
    for f in CONFIG_FILES])
def test_every_config_runs_one_step(config_file, tmp_path):
  """Each config file, as written, but tiny: the real training code for one step, on
  toy data of the shape and class count the config declares."""
  config = _load_config_module(config_file).get_config("invariance")
  config.model = ml_collections.ConfigDict(
      {**config.model.to_dict(), **TINY_MODEL[config_file]})
  size, _, channels = config.image_shape
  classes = config.num_classes
  config.dataset = helpers.write_npz(tmp_path / "toy.npz", size=size, classes=classes,
                                     label_names=classes)
  config.batch_size = 16
  config.num_epochs = 1.0 / 4  # one step of 16 of the 64 toy images
  config.lr_boundaries = ()
  config.eval_batch_size = 24
  config.probe_seeds = 2
  config.probe_copies = 2
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 1
  _, loss = metrics_io.series(metrics_io.read(str(tmp_path / "run")), "train/loss")
  assert len(loss) == 1 and np.isfinite(loss[0])
  if classes > 10:
    assert 0.0 <= result["top5"] <= 1.0 and result["top5"] >= result["accuracy"]
