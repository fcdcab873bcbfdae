"""invjax.api on a tiny run: loading, activations, logits, scores, L_inv, export,
errors, the plain Orbax recipe of the README; with -m slow, the example script end to
end on a tiny baseline and invariance run laid out as the quickstart's.

(tests/test_multihost.py loads runs trained on 8 devices and on 2 processes.)"""

import json
import os
import re
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invjax import analysis
from invjax import analyze
from invjax import api
from invjax import augment
from invjax import experiment
from invjax import steps as steps_lib
from invjax import train
from tests import helpers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """WORKDIR/invariance: the tests' tiny run (2 epochs of 4 steps), loaded."""
  tmp = tmp_path_factory.mktemp("api")
  npz = helpers.write_npz(tmp / "toy.npz")
  workdir = str(tmp / "quickstart")
  config = helpers.tiny_config(npz)
  train.train_and_evaluate(config, os.path.join(workdir, "invariance"),
                           tensorboard=False)
  return {"workdir": workdir, "tmp": tmp, "config": config,
          "invariance": api.load_run(os.path.join(workdir, "invariance"))}


def test_load_run(runs):
  run = runs["invariance"]
  assert run.step == 8 and run.config.variant == "invariance"
  assert run.layers == ["pixels", *helpers.TINY_SOWN]
  assert run.image_shape == (16, 16, 3) and run.data.num_classes == 4
  older = api.load_run(run.workdir, step=4)
  assert older.step == 4
  assert not np.allclose(older.variables["params"]["Conv_0"]["kernel"],
                         run.variables["params"]["Conv_0"]["kernel"])


def test_a_record_loads_its_weights(runs, tmp_path):
  """A run record (weights.npz, no checkpoints) loads the run's final weights and
  computes what the run does; `dataset` replaces the data path it names."""
  from invjax import records  # pylint: disable=g-import-not-at-top
  run = runs["invariance"]
  record = str(tmp_path / "record")
  assert "weights.npz" in records.write(run.workdir, record)
  assert not os.path.exists(os.path.join(record, "checkpoints"))
  moved = str(tmp_path / "moved.npz")
  os.rename(run.config.dataset, moved)  # the record names a path gone from here
  try:
    loaded = api.load_run(record, dataset=moved)
  finally:
    os.rename(moved, run.config.dataset)
  assert loaded.step == run.step and loaded.config.dataset == moved
  jax.tree.map(np.testing.assert_array_equal, loaded.variables, run.variables)
  x = run.data.x_test
  jax.tree.map(np.testing.assert_array_equal, loaded.activations(x),
               run.activations(x))
  with pytest.raises(ValueError, match=r"weights of step 8 only.*load_run\("):
    api.load_run(record, step=4)


def test_a_bfloat16_run_gives_float32_activations(runs, tmp_path):
  """A run that computes in bfloat16 gives its activations and logits as float32 (the
  exact values), which numpy means do not round away: a bfloat16 array's mean is taken
  in bfloat16."""
  run = runs["invariance"]
  half = tmp_path / "half"
  half.mkdir()
  os.symlink(os.path.join(run.workdir, "checkpoints"), half / "checkpoints")
  with open(os.path.join(run.workdir, "config.json")) as f:
    config = json.load(f)
  config["half_precision"] = True
  with open(half / "config.json", "w") as f:
    json.dump(config, f)
  loaded = api.load_run(str(half))
  x = run.data.x_test
  acts = loaded.activations(x)
  direct, logits = jax.jit(steps_lib.features_and_logits)(loaded.state,
                                                          steps_lib.to_float(x))
  assert direct["conv3"].dtype == jnp.bfloat16  # the model does compute in bfloat16
  for name, a in acts.items():
    assert a.dtype == np.float32, name
    np.testing.assert_allclose(a, np.asarray(direct[name], np.float32), rtol=1e-6)
  assert loaded.logits(x).dtype == np.float32
  # (within a bfloat16 rounding: a program that computes only the logits fuses its
  # last layers otherwise)
  np.testing.assert_allclose(loaded.logits(x), np.asarray(logits, np.float32),
                             rtol=2 ** -7)


def test_forward_passes_match_one_direct_pass(runs):
  """Batches of 5 over 24 images (the last padded) give one whole pass's values; uint8
  and float images the same; the logits give the accuracy the run logged."""
  run = runs["invariance"]
  x, y = run.data.x_test, run.data.y_test
  direct, logits = jax.jit(steps_lib.features_and_logits)(run.state,
                                                          steps_lib.to_float(x))
  acts = run.activations(x, batch_size=5)
  assert list(acts) == run.layers
  for k in run.layers:
    np.testing.assert_allclose(acts[k], direct[k], rtol=1e-5, atol=1e-6)
  two = run.activations(x.astype(np.float32) / 255.0, ["conv3", "conv1"], batch_size=5)
  assert list(two) == ["conv3", "conv1"]
  np.testing.assert_allclose(two["conv3"], direct["conv3"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(run.logits(x, batch_size=7), logits, rtol=1e-5, atol=1e-5)
  with open(os.path.join(run.workdir, "metrics.jsonl")) as f:
    logged = [r["test/accuracy"] for r in map(json.loads, f) if "test/accuracy" in r]
  assert np.mean(run.predict(x) == y) == pytest.approx(logged[-1])


def test_scores_are_those_of_the_transformed_copies(runs):
  """`transformed` returns the copies that `invariance_scores` scores (batches of 4
  over 10 images, the last padded): Eq. 2 on their activations gives the scores.
  (That the run's test images get analysis/scores.npz: tests/test_multihost.py.)"""
  run = runs["invariance"]
  x = run.data.x_test[:10]
  scores = run.invariance_scores(x, ["pixels", "conv1"], num_transforms=2, seed=5,
                                 batch_size=4)
  assert list(scores) == ["pixels", "conv1"] and scores["conv1"].shape == (10, 2)
  copies = run.transformed(x, num_transforms=2, seed=5, batch_size=4)
  assert copies.shape == (10, 2, 16, 16, 3)
  # The forward programs of the test above (batches of 5; uint8 and float images).
  clean = run.activations(x, batch_size=5)["conv1"]
  for c in range(2):
    moved = run.activations(copies[:, c], ["conv3", "conv1"], batch_size=5)["conv1"]
    np.testing.assert_allclose(analysis.invariance_scores(clean, moved),
                               scores["conv1"][:, c], rtol=1e-4, atol=1e-5)
  assert np.all(scores["conv1"] < 1.0)  # the copies did move


def test_invariance_loss_is_the_training_probe(runs):
  """L_inv of the probe batch that training measured gives its logged values."""
  run = runs["invariance"]
  c = run.config
  data = run.data
  idx = np.random.default_rng([c.seed, 2]).choice(
      len(data.x_train), min(c.probe_seeds, len(data.x_train)), replace=False)
  seeds = data.x_train[np.sort(idx)]
  x, _, _ = steps_lib.expand_seeds(seeds, np.zeros(len(seeds), np.int32),
                                   c.probe_copies)
  key = jax.random.fold_in(jax.random.key(c.seed), 2)
  copies = jax.jit(lambda k, a: augment.augment(k, steps_lib.to_float(a), run.ranges))(
      key, x)
  copies = np.asarray(copies).reshape(len(seeds), c.probe_copies, 16, 16, 3)
  got = run.invariance_loss(copies, batch_size=6)
  with open(os.path.join(run.workdir, "metrics.jsonl")) as f:
    last = [r for r in map(json.loads, f) if "probe/inv_loss/conv1" in r][-1]
  assert last["step"] == run.step and list(got) == helpers.TINY_SOWN
  for k, v in got.items():
    assert v == pytest.approx(last[f"probe/inv_loss/{k}"], rel=1e-4, abs=1e-6), k
  # The class denominator, against the pair loop over the same activations.
  labels = data.y_train[np.sort(idx)]
  by_class = run.invariance_loss(copies, "conv3", labels=labels, denominator="class")
  acts = run.activations(copies.reshape(-1, 16, 16, 3), "conv3")["conv3"]
  ids = np.repeat(np.arange(len(seeds)), c.probe_copies)
  ref = helpers.naive_invariance_loss(jnp.asarray(acts), ids,
                                      np.repeat(labels, c.probe_copies))
  assert by_class["conv3"] == pytest.approx(float(ref), rel=1e-4)
  with pytest.raises(ValueError, match=r"needs labels=\[4\], the class of each seed"):
    run.invariance_loss(copies, denominator="class")
  made = run.augmented_copies(data.x_test[:3], 4, seed=1)
  assert made.shape == (3, 4, 16, 16, 3)
  assert not np.allclose(made[:, 0], made[:, 1])  # each copy its own draw


def test_export(runs, tmp_path, monkeypatch):
  run = runs["invariance"]
  x = run.data.x_test[:9]
  want = run.activations(x, ["conv1", "conv3"])
  path = run.export_activations(str(tmp_path / "acts.npz"), x, ["conv1", "conv3"])
  with np.load(path) as f:
    np.testing.assert_array_equal(f["conv3"], want["conv3"])
    assert list(f["_layers"]) == ["conv1", "conv3"] and int(f["_step"]) == run.step
  h5py = pytest.importorskip("h5py")
  path = run.export_activations(str(tmp_path / "acts.h5"), x, "conv1")
  with h5py.File(path) as f:
    np.testing.assert_array_equal(f["conv1"][()], want["conv1"])
    assert f.attrs["step"] == run.step and list(f.attrs["layers"]) == ["conv1"]
  monkeypatch.setitem(sys.modules, "h5py", None)
  with pytest.raises(ImportError, match="pip install h5py"):
    run.export_activations(str(tmp_path / "b.h5"), x, "conv1")


def test_errors_name_the_workdir_the_step_and_the_fix(runs, tmp_path):
  run = runs["invariance"]
  with pytest.raises(FileNotFoundError, match="holds no run.*train it first"):
    api.load_run(str(tmp_path))
  with pytest.raises(ValueError, match=r"no checkpoint of step 3.*steps \[4, 8\].*step="):
    api.load_run(run.workdir, step=3)
  with pytest.raises(ValueError, match=rf"{re.escape(run.workdir)} \(step 8\).*x\[None\]"):
    run.activations(run.data.x_test[0])
  with pytest.raises(ValueError, match=r"must be in \[0, 1\].*255"):
    run.activations(run.data.x_test.astype(np.float32))
  with pytest.raises(ValueError, match=r"\['conv7'\] are not sown by.*step 8.*'conv3'"):
    run.activations(run.data.x_test, "conv7")
  with pytest.raises(ValueError, match="M >= 2"):
    run.invariance_loss(run.data.x_test)
  # The config edited to another model: the checkpoint does not fit.
  other = tmp_path / "edited"
  other.mkdir()
  os.symlink(os.path.join(run.workdir, "checkpoints"), other / "checkpoints")
  with open(os.path.join(run.workdir, "config.json")) as f:
    config = json.load(f)
  config["model"]["width"] = 2.0
  with open(other / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"checkpoint 8 in .* does not restore.*step=one "
                                       r"of \[4\]"):
    api.load_run(str(other))


def test_plain_orbax_recipe_restores_numpy_without_warnings(runs):
  """The README's recipe, as written, on the run's workdir: numpy weights equal to
  the API's. (On a checkpoint written by 8 devices: tests/test_multihost.py.)"""
  run = runs["invariance"]
  weights = helpers.run_orbax_recipe(run.workdir)
  want = run.variables
  leaves = jax.tree.leaves(weights)
  assert leaves and all(type(a) is np.ndarray for a in leaves)  # pylint: disable=unidiomatic-typecheck
  jax.tree.map(np.testing.assert_array_equal, weights, want)


@pytest.mark.slow
def test_example_runs_end_to_end(runs, capsys, monkeypatch):
  """experiments/notebook_example.py on a tiny baseline and invariance run (trained
  and analyzed as the quickstart does): its figures and export; the scores of the
  run's test images are analysis/scores.npz."""
  experiment.compare_variants(runs["config"], runs["workdir"],
                              ["baseline", "invariance"])
  baseline = api.load_run(os.path.join(runs["workdir"], "baseline"))
  saved, _ = analyze.load(baseline.workdir)
  scores = baseline.invariance_scores(baseline.data.x_test)
  assert list(scores) == list(saved) == baseline.layers
  for k in saved:
    np.testing.assert_allclose(scores[k], saved[k], rtol=1e-5, atol=1e-6)
  out = os.path.join(runs["tmp"], "figures")
  monkeypatch.setattr(sys, "argv", ["notebook_example.py",
                                    f"--workdir={runs['workdir']}", f"--out={out}"])
  runpy.run_path(os.path.join(helpers.ROOT, "experiments", "notebook_example.py"),
                 run_name="__main__")
  printed = capsys.readouterr().out
  for name in ("copies", "scores", "cka", "rsa"):
    assert f"figure: {os.path.join(out, f'notebook_{name}.png')}" in printed
    assert os.path.getsize(os.path.join(out, f"notebook_{name}.png")) > 1000
  assert re.search(r"linear CKA, same layer: conv1 \d\.\d\d conv2", printed)
  with np.load(os.path.join(runs["workdir"], "notebook",
                            "invariance_activations.npz")) as f:
    assert f["conv2"].shape == (24, 8, 8, 8) and f["conv3"].shape == (24, 8, 8, 4)
