"""`--mode=analyze` (invjax/analyze.py): the scores of a trained run, its summary and
its figure."""

import os

import numpy as np
import pytest

from invjax import analyze
from tests import helpers


LAYERS = helpers.TINY_SOWN


def test_analyze_scores_every_layer_in_depth_order(trained, caplog):
  config, workdir, _ = trained
  with caplog.at_level("INFO"):
    summary = analyze.analyze(config, workdir)
  # Progress: each of scoring's two passes over the 24 images logs its quarters.
  progress = [r.getMessage() for r in caplog.records if "scoring, pass" in r.getMessage()]
  assert progress[-1].startswith("scoring, pass 2: 24 of 24 images")
  assert sum("pass 1:" in m for m in progress) == sum("pass 2:" in m for m in progress) >= 2
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
