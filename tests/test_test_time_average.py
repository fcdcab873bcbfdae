"""experiments/test_time_average.py: the softmax averaged over augmented copies."""

import dataclasses

import jax
import numpy as np
import pytest

from experiments import test_time_average as tta
from invjax import analyze
from invjax import augment
from invjax import steps


def test_averaged_accuracy_is_that_of_the_mean_softmax_of_each_copy(trained):
  """Against the copies made image by image on their documented keys, at two batch
  sizes; with no augmentation, every copy is the clean image."""
  config, workdir, _ = trained
  run, _, state, step = analyze.restore(config, workdir)
  x, y = run.data.x_test[:11], run.data.y_test[:11]
  light = augment.PRESETS["light"]
  got = tta.evaluate(state, x, y, 2, light, seed=4, batch_size=4)
  assert got == tta.evaluate(state, x, y, 2, light, seed=4, batch_size=11)
  key = jax.random.key(4)
  probs = []
  one_image = jax.jit(lambda k, im: augment.augment(k, steps.to_float(im), light))
  for r in range(2):
    copies = [one_image(tta.copy_keys(key, r, np.array([i]))[0], x[i:i + 1])
              for i in range(len(x))]
    logits = steps.eval_logits(state, np.concatenate(copies))
    probs.append(np.asarray(jax.nn.softmax(logits)))
  right = lambda p: float(np.mean(np.argmax(p, -1) == y))
  assert got["per_copy"] == pytest.approx([right(p) for p in probs])
  assert got["averaged"] == pytest.approx(right(probs[0] + probs[1]))
  assert got["clean"] == pytest.approx(right(steps.eval_logits(state, steps.to_float(x))))
  assert not np.allclose(probs[0], probs[1])  # each copy its own draw
  none = dataclasses.replace(light, flip=0.0, translate=0.0)
  same = tta.evaluate(state, x, y, 2, none, seed=4, batch_size=4)
  assert same["averaged"] == same["clean"] == got["clean"]

  result = tta.evaluate_run(workdir, 2, "light", 4, 4)
  assert result["step"] == step and result["variant"] == config.variant
  assert result["clean"] == pytest.approx(float(np.mean(
      np.argmax(steps.eval_logits(state, steps.to_float(run.data.x_test)), -1)
      == run.data.y_test)))
  assert "| clean | averaged |" in tta.markdown([result], "cmd")
