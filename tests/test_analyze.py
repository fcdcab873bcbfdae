"""`--mode=analyze` (invjax/analyze.py): the scores of a trained run, its summary and
its figure."""

import os

import numpy as np
import pytest

from invjax import analyze
from tests import helpers


LAYERS = helpers.TINY_SOWN


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
