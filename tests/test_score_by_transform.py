"""experiments/score_by_transform.py: invariance scores split by transformation."""

import dataclasses

import numpy as np
import pytest

from experiments import score_by_transform as sbt
from invjax import api
from invjax import augment


def test_parts_turn_on_one_transformation_each():
  ranges = augment.AugmentRanges(cutout=0.25)
  parts = sbt.parts(ranges)
  assert list(parts) == ["all", "no flip", *sbt.TRANSFORMS]
  assert parts["all"] == ranges
  assert parts["no flip"] == dataclasses.replace(ranges, flip=0.0)
  for t in sbt.TRANSFORMS:
    on = {f: getattr(parts[t], f) for f in sbt.TRANSFORMS if getattr(parts[t], f)}
    assert on == {t: 1.0 if t == "flip" else getattr(ranges, t)}
    assert parts[t].cutout == 0.0
  light = augment.PRESETS["light"]  # flips and translations only
  assert list(sbt.parts(light)) == ["all", "no flip", "flip", "translate"]


def test_each_part_scores_its_transformation_alone(trained, monkeypatch):
  """A part's median is the API's score under that part's scoring transformations;
  the flip alone mirrors every copy; "all" is the run's own scoring scheme. (Three of
  the nine parts: each compiles a scoring program of its own.)"""
  every_part = sbt.parts
  monkeypatch.setattr(sbt, "parts", lambda ranges: {
      k: v for k, v in every_part(ranges).items() if k in ("all", "flip", "rotation")})
  _, workdir, _ = trained
  run = api.load_run(workdir)
  x = run.data.x_test[:10]
  got = sbt.medians(run, x, copies=2, seed=3)
  assert got["all"] == pytest.approx(
      {k: float(np.median(v)) for k, v in
       run.invariance_scores(x, num_transforms=2, seed=3).items()})
  flip = sbt.parts(run.ranges)["flip"]
  moved = run.transformed(x, 2, 3, transform=lambda k, v: augment.augment_each(
      k, v, flip, scoring=True))
  np.testing.assert_allclose(moved, np.repeat(run.data.x_test[:10, None, :, ::-1] / 255.,
                                              2, axis=1), atol=1e-6)
  assert got["flip"]["pixels"] == pytest.approx(float(np.median(
      run.invariance_scores(x, "pixels", 2, 3, transform=lambda k, v:
                            v[:, :, ::-1])["pixels"])), rel=1e-5)
  assert len({round(m["conv3"], 6) for m in got.values()}) == len(got)  # all differ
