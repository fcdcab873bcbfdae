"""The robustness report of a trained run: attacks over the test set, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from invjax import robustness
from invjax import train
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
  settings = robustness.AttackSettings(eps=(0.0, 8.0, 64.0), pgd_steps=3,
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
  assert train.build(uniform).step_config.weight_law == "uniform"
  with pytest.raises(ValueError, match="layer_weight_law='cubic' is unknown"):
    train.build(helpers.tiny_config(config.dataset, layer_weight_law="cubic"))
  # A run saved before the field existed: the default is no change, another value is.
  path = os.path.join(workdir, train.CONFIG_FILE)
  with open(path) as f:
    saved = json.load(f)
  del saved["layer_weight_law"]
  with open(path, "w") as f:
    json.dump(saved, f)
  train.check_workdir_config(config, workdir)
  assert train.load_config(workdir).layer_weight_law == "exponential"
  with pytest.raises(ValueError, match="layer_weight_law: saved None, given 'uniform'"):
    train.check_workdir_config(uniform, workdir)
