"""The config files in configs/: the paper's hyperparameters, and one real step of
each."""

import json
import os

import ml_collections
import numpy as np
import pytest

from invjax import build
from invjax import metrics_io
from invjax import train
from invjax import workdirs
from experiments import paper
from tests import helpers


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


@pytest.mark.parametrize("config_file", sorted(CONFIG_FILES))
def test_a_saved_config_loads_builds_and_resumes_without_model_fields_it_left_out(
    config_file, tmp_path):
  """workdirs.load_config fills the fields added since a run was saved, but not the
  base config's model fields into another model's config (WRN and DenseNet take no
  `width`: their workdirs could not be analyzed); a model field left out of a saved
  config is no change where the config gives its model's default."""
  config = _load_config_module(config_file).get_config("invariance")
  workdirs.save_config(config, str(tmp_path))
  loaded = workdirs.load_config(str(tmp_path))
  build.create_model(loaded, config.num_classes, platform="cpu")
  assert workdirs.config_diff(config, str(tmp_path)) == {}
  with open(tmp_path / workdirs.CONFIG_FILE) as f:
    saved = json.load(f)
  if "kernel_init" in saved["model"]:  # a run saved before the field existed
    del saved["model"]["kernel_init"]
    with open(tmp_path / workdirs.CONFIG_FILE, "w") as f:
      json.dump(saved, f)
    assert workdirs.config_diff(config, str(tmp_path)) == {}
    config.model.kernel_init = "glorot_uniform"
    assert workdirs.config_diff(config, str(tmp_path)) == {
        "model.kernel_init": (None, "glorot_uniform")}
    # The other way round: a run saved with the field, resumed by a config without it.
    workdirs.save_config(_load_config_module(config_file).get_config("invariance"),
                         str(tmp_path))
    del config.model["kernel_init"]
    assert workdirs.config_diff(config, str(tmp_path)) == {}
