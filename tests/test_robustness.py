"""The robustness report of a trained run: attacks over the test set, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from invjax import build as build_lib
from invjax import robustness
from invjax import train
from invjax import workdirs
from tests import helpers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  npz = helpers.write_npz(tmp_path_factory.mktemp("data") / "toy.npz", n_test=20)
  workdir = str(tmp_path_factory.mktemp("run"))
  config = helpers.tiny_config(npz, "baseline", num_epochs=8.0)  # accuracy ~0.5
  train.train_and_evaluate(config, workdir, tensorboard=False)
  return config, workdir


def test_report_of_a_trained_run(trained, monkeypatch):
  config, workdir = trained
  programs = []
  make = robustness.make_attack_program
  monkeypatch.setattr(robustness, "make_attack_program",
                      lambda *a: programs.append(make(*a)) or programs[-1])
  settings = robustness.Settings(eps=(0.0, 8.0, 64.0), pgd_steps=3,
                                       pgd_step_size=16.0)
  report = robustness.robustness(config, workdir, settings)
  with open(os.path.join(workdir, robustness.REPORT_FILE)) as f:
    assert json.load(f) == report
  # The analysis ran first and gave the clean and transformed accuracies.
  assert os.path.exists(os.path.join(workdir, "analysis", "summary.json"))
  fgsm, pgd = report["attacks"]["fgsm"], report["attacks"]["pgd"]
  assert list(fgsm) == ["0/255", "8/255", "64/255"]
  # At eps 0 both attacks leave the images as they are.
  assert fgsm["0/255"] == pgd["0/255"] == pytest.approx(report["clean"])
  for acc in (fgsm, pgd):
    values = list(acc.values())
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:]))
  assert pgd["64/255"] <= fgsm["64/255"] and pgd["64/255"] < report["clean"]
  # One compiled program per attack for every eps and batch (the last one padded).
  assert [p._cache_size() for p in programs] == [1, 1]
  table = robustness.table({"a": report, "b": report})
  assert "pgd 64/255" in table and f"{pgd['64/255']:.4f}" in table


@pytest.mark.slow  # a process start and two attack compiles; the API is tested above
def test_cli_robustness_mode(trained, tmp_path):
  _, workdir = trained
  out = subprocess.run(
      [sys.executable, "-m", "invjax.main", f"--workdir={workdir}", "--mode=robustness",
       "--robustness_eps=0,4", "--robustness_examples=8"],
      capture_output=True, text=True, cwd=helpers.ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  report = robustness.load(workdir)
  assert report["attacked_images"] == 8
  assert "fgsm 4/255" in out.stdout and "pgd 0/255" in out.stdout
  assert report["attacks"]["pgd"]["0/255"] == pytest.approx(
      np.mean(report["attacks"]["fgsm"]["0/255"]))
  bad = subprocess.run(
      [sys.executable, "-m", "invjax.main", f"--workdir={workdir}", "--mode=robustness",
       "--robustness_eps=-1"], capture_output=True, text=True, cwd=helpers.ROOT,
      timeout=300)
  assert bad.returncode != 0 and "eps [-1.0] must be in [0, 255]" in bad.stderr


def test_layer_weight_law_reaches_the_step_and_old_workdirs_still_resume(trained):
  config, workdir = trained
  uniform = helpers.tiny_config(config.dataset, "baseline", num_epochs=8.0,
                                layer_weight_law="uniform")
  assert build_lib.build(uniform).step_config.weight_law == "uniform"
  with pytest.raises(ValueError, match="layer_weight_law='cubic' must be one of"):
    build_lib.build(helpers.tiny_config(config.dataset, layer_weight_law="cubic"))
  with pytest.raises(ValueError, match=r"alpha=0.1 \+ config.class_alpha=0.95 must be < 1"):
    build_lib.build(helpers.tiny_config(config.dataset, class_alpha=0.95))
  # A run saved before the field existed: the default is no change, another value is.
  path = os.path.join(workdir, workdirs.CONFIG_FILE)
  with open(path) as f:
    saved = json.load(f)
  del saved["layer_weight_law"]
  with open(path, "w") as f:
    json.dump(saved, f)
  workdirs.check_config(config, workdir)
  assert workdirs.load_config(workdir).layer_weight_law == "exponential"
  with pytest.raises(ValueError, match="layer_weight_law: saved None, given 'uniform'"):
    workdirs.check_config(uniform, workdir)


def test_score_pairs_is_eq2_against_the_given_images():
  from invjax import analysis  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  clean = rng.uniform(size=(10, 4, 4, 3)).astype(np.float32)
  moved = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
  w = jnp.asarray(rng.normal(size=(48, 5)), jnp.float32)
  feature_fn = lambda x: {"pixels": x, "relu": jax.nn.relu(x.reshape(len(x), -1) @ w)}
  order = []
  stats = analysis.accumulate_stats(feature_fn, [clean[:6], clean[6:]], order)
  stats = {k: stats[k] for k in order}
  scores = analysis.score_pairs(feature_fn, stats,
                                [(clean[:6], moved[:6]), (clean[6:], moved[6:])]).scores
  assert list(scores) == ["pixels", "relu"]
  full_clean, full_moved = feature_fn(clean), feature_fn(moved)
  for k in scores:
    np.testing.assert_allclose(
        scores[k], analysis.invariance_scores(full_clean[k], full_moved[k]),
        rtol=1e-5, atol=1e-6)


def test_pair_scorer_compiles_once_for_every_set_and_weight():
  """A kept PairScorer traces its program once for many transformed sets and for new
  weights of the same shapes (robustness scores 75 corruption sets x 5 severities),
  and gives score_pairs' scores."""
  from invjax import analysis  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  clean = rng.uniform(size=(8, 4, 4, 3)).astype(np.float32)
  traces = []

  def feature_fn(w, x):
    traces.append(1)
    return {"pixels": x, "relu": jax.nn.relu(x.reshape(len(x), -1) @ w)}

  weights = [jnp.asarray(rng.normal(size=(48, 5)), jnp.float32) for _ in range(2)]
  for w in weights:
    stats = analysis.accumulate_stats(lambda x, w=w: feature_fn(w, x), [clean])
    scorer = analysis.PairScorer(feature_fn, weights=w)
    for sigma in (0.05, 0.1, 0.2):
      moved = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 1).astype(np.float32)
      got = scorer(stats, [(clean, moved)]).scores
      ref = analysis.score_pairs(lambda x, w=w: feature_fn(w, x), stats,
                                 [(clean, moved)]).scores
      for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7)
  kept = analysis.PairScorer(feature_fn, weights=weights[0])
  moved = np.clip(clean + 0.1, 0, 1).astype(np.float32)
  n0 = len(traces)
  for w in weights:
    kept.weights = w
    kept(stats, [(clean, moved)])
    kept(stats, [(clean, moved[::-1])])
  assert len(traces) - n0 == 2  # one trace (clean and moved forward) for all four


def test_generated_corruptions_are_seeded_uint8_and_leave_numpy_alone():
  pytest.importorskip("corrupt_tta")
  from invjax import corruptions  # pylint: disable=g-import-not-at-top
  x, _ = helpers.toy_images(4, size=16)
  np.random.seed(7)
  before = np.random.get_state()[1].copy()
  a = corruptions.generated(x, "gaussian_noise", 3, seed=1)
  np.testing.assert_array_equal(np.random.get_state()[1], before)
  np.testing.assert_array_equal(a, corruptions.generated(x, "gaussian_noise", 3, seed=1))
  assert a.dtype == np.uint8 and a.shape == x.shape and np.mean(a != x) > 0.5
  assert not np.array_equal(a, corruptions.generated(x, "gaussian_noise", 3, seed=2))
  assert np.mean(np.abs(corruptions.generated(x, "gaussian_noise", 5).astype(float) - x)) > \
      np.mean(np.abs(corruptions.generated(x, "gaussian_noise", 1).astype(float) - x))
  gray = corruptions.generated(x[..., :1], "brightness", 2)
  assert gray.shape == (4, 16, 16, 1)
  with pytest.raises(ValueError, match="unknown; valid are 'all'"):
    corruptions.parse("fogg", [1])
  with pytest.raises(ValueError, match="severities"):
    corruptions.parse("all", [0])
  assert corruptions.parse("all", ["3"]) == (corruptions.NAMES, (3,))
  # Impulse noise (scikit-image's random_noise inside corrupt-tta) too: the same set
  # on every call, another with another seed.
  b = corruptions.generated(x, "impulse_noise", 3, seed=1)
  np.testing.assert_array_equal(b, corruptions.generated(x, "impulse_noise", 3, seed=1))
  assert np.mean(b != x) > 0.01
  assert not np.array_equal(b, corruptions.generated(x, "impulse_noise", 3, seed=2))
  np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_official_cifar10c_is_read_through_tfds(monkeypatch):
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  from invjax import corruptions  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=6):
    x, y = corruptions.official("fog", 3, count=6)
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (6,)
    # The pairing is checked: a test set with other labels is refused.
    with pytest.raises(ValueError, match="does not pair with this test set"):
      corruptions.corrupted_test_set("official", "fog", 3, x, (y + 1) % 10)
    np.testing.assert_array_equal(
        corruptions.corrupted_test_set("official", "fog", 3, x, y), x)
  assert corruptions.resolve_source("auto", "cifar10") == "official"
  assert corruptions.resolve_source("auto", "toy.npz") == "generated"


def test_report_under_corruptions_uses_the_images_as_read(trained, monkeypatch):
  """Accuracy and scores under a corruption are those of the corrupted uint8 images
  themselves (/255, nothing else), compared here with a direct computation."""
  import jax  # pylint: disable=g-import-not-at-top
  from invjax import analyze  # pylint: disable=g-import-not-at-top
  from invjax import analysis  # pylint: disable=g-import-not-at-top
  from invjax import corruptions  # pylint: disable=g-import-not-at-top
  from invjax import steps  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  made = {}

  def fake(images, name, severity, seed=0):
    rng = np.random.default_rng(severity)
    out = np.clip(images.astype(int) + rng.integers(-60, 60, images.shape), 0, 255)
    made[(name, severity)] = out.astype(np.uint8)
    return made[(name, severity)]

  monkeypatch.setattr(corruptions, "generated", fake)
  settings = robustness.Settings(eps=(0.0,), pgd_steps=1, corruptions=("fog", "snow"),
                                 severities=(1, 4), corruption_source="generated")
  report = robustness.robustness(config, workdir, settings)
  c = report["corruptions"]
  assert list(c["accuracy"]) == ["fog", "snow"] and list(c["accuracy"]["fog"]) == ["1", "4"]
  run, _, state, _ = analyze.restore(config, workdir)
  moved = made[("snow", 4)]
  logits = steps.eval_logits(state, steps.to_float(moved))
  direct = float(np.mean(np.argmax(logits, -1) == run.data.y_test))
  assert c["accuracy"]["snow"]["4"] == pytest.approx(direct)
  clean_f = steps.features(state, steps.to_float(run.data.x_test))
  moved_f = steps.features(state, steps.to_float(moved))
  for layer, median in c["median_scores"]["snow"]["4"].items():
    s = np.asarray(analysis.invariance_scores(clean_f[layer], moved_f[layer]))
    assert median == pytest.approx(float(np.median(s[np.isfinite(s)])), abs=1e-5)
  assert list(c["mean"]["median_scores"]) == ["pixels"] + helpers.TINY_SOWN
  assert c["mean"]["accuracy"] == pytest.approx(
      np.mean([a for by in c["accuracy"].values() for a in by.values()]))
  table = robustness.score_table({"base": report})
  assert "pixels" in table and "base C" in table
  from invjax import report as report_lib  # pylint: disable=g-import-not-at-top
  figure = report_lib.plot_robustness({"base": report, "again": report},
                                      os.path.join(workdir, "robustness.png"))
  assert os.path.getsize(figure) > 10_000
  del jax


MULTI_DEVICE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
from invjax import analyze, robustness, train
from invjax import workdirs
config = workdirs.load_config(sys.argv[2])
run, placement, state, _ = analyze.restore(config, sys.argv[2])
settings = robustness.Settings(eps=(0.0, 8.0, 64.0), pgd_steps=3, pgd_step_size=16.0)
print(json.dumps([jax.device_count(), robustness.attack_accuracy(
    state, run, placement, settings, config.analysis.batch_size)]))
"""


@pytest.mark.slow  # a process with 4 host devices
def test_attacks_split_over_devices_give_the_one_device_result(trained):
  config, workdir = trained
  from invjax import analyze  # pylint: disable=g-import-not-at-top
  run, placement, state, _ = analyze.restore(config, workdir)
  settings = robustness.Settings(eps=(0.0, 8.0, 64.0), pgd_steps=3, pgd_step_size=16.0)
  one = robustness.attack_accuracy(state, run, placement, settings,
                                   config.analysis.batch_size)
  env = dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""),
                                             "--xla_force_host_platform_device_count=4"]))
  out = subprocess.run([sys.executable, "-c", MULTI_DEVICE, helpers.ROOT, workdir],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  devices, four = json.loads(out.stdout.strip().splitlines()[-1])
  assert devices == 4
  for attack in one:
    for eps, acc in one[attack].items():
      assert four[attack][eps] == pytest.approx(acc, abs=1e-9), (attack, eps)
