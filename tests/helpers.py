"""Small data and tiny configs for the end-to-end tests."""

import gc
import logging
import os
import re
import warnings

import jax.numpy as jnp
import numpy as np

from invjax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_images(n, size=16, classes=4, seed=0):
  """Learnable toy images: class c is a bright square in quadrant c, plus noise."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  x = rng.integers(0, 60, (n, size, size, 3))
  h = size // 2
  for i, c in enumerate(y):
    r, col = divmod(int(c) % 4, 2)
    x[i, r * h:(r + 1) * h, col * h:(col + 1) * h] += 180
  return x.clip(0, 255).astype(np.uint8), y.astype(np.int64)


def write_npz(path, n_train=64, n_test=24, size=16, classes=4, seed=0,
              label_names=0):
  """An .npz of toy_images (different draws for the two splits). With label_names=N,
  it names N classes, so a loader sees N classes whichever labels were drawn."""
  x_train, y_train = toy_images(n_train, size, classes, seed)
  x_test, y_test = toy_images(n_test, size, classes, seed + 1)
  extra = {"label_names": np.array([f"c{i}" for i in range(label_names)])} \
      if label_names else {}
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
  return str(path)


def tiny_config(dataset, variant="invariance", **overrides):
  c = config_lib.base_config()
  c.model.layers = TINY_LAYERS
  c.model.width = 1.0
  c.dataset = dataset
  c.batch_size = 16
  c.num_epochs = 2.0
  c.learning_rate = 0.05
  c.lr_boundaries = (1,)
  c.log_every_steps = 2
  c.eval_batch_size = 16
  c.probe_seeds = 4
  c.probe_copies = 4
  c.analysis.batch_size = 16
  c.analysis.num_transforms = 2
  c.invariance_copies = 4
  config_lib.apply_variant(c, variant)
  return config_lib.override(c, overrides)


# Two hidden convolutions and the class layer: 3 sown layers, seconds to compile.
TINY_LAYERS = ((8, 3, 1, "SAME"), (8, 3, 2, "SAME"))
TINY_SOWN = ["conv1", "conv2", "conv3"]


def readme_orbax_recipe(workdir: str) -> str:
  """The README's plain Orbax recipe (the python block after `<!-- plain orbax -->`),
  with its example workdir replaced by `workdir`."""
  with open(os.path.join(ROOT, "README.md")) as f:
    block = re.search(r"<!-- plain orbax -->\s*```python\n(.*?)```", f.read(), re.S)
  assert block, "the README's plain Orbax recipe is missing"
  example = '"/tmp/invjax_quickstart/invariance"'
  assert block.group(1).count(example) == 1
  return block.group(1).replace(example, repr(workdir))


def run_orbax_recipe(workdir: str):
  """Runs the README's plain Orbax recipe on `workdir`; asserts that it warned
  nothing, from Python or from Orbax's logging; returns its `weights`."""
  code = readme_orbax_recipe(workdir)
  # Finalise what earlier tests left for the garbage collector first (e.g. Orbax's
  # coroutines of a deliberately damaged checkpoint's failed restore, which warn "never
  # awaited" when collected), so that only the recipe's own warnings are recorded.
  gc.collect()
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logging.getLogger().addHandler(handler)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      scope = {}
      exec(code, scope)  # pylint: disable=exec-used
  finally:
    logging.getLogger().removeHandler(handler)
  assert not caught, [str(w.message) for w in caught]
  assert not records, [r.getMessage() for r in records]
  return scope["weights"]


def naive_invariance_loss(f, ids, classes=None):
  """Eq. 3 as a double loop over pairs in JAX (float32, differentiable): mean distance
  (Eq. 1) over the pairs of equal ids / over all pairs (with `classes`, over the pairs
  of equal classes), self-pairs left out. The tests' reference for both loss methods,
  their gradients, both denominators and the class-invariance term."""
  f = f.reshape(f.shape[0], -1).astype(jnp.float32)
  d = jnp.mean((f[:, None] - f[None]) ** 2, axis=-1)  # Eq. 1 for every pair
  off = ~jnp.eye(len(f), dtype=bool)
  same = (ids[:, None] == ids[None]) & off
  pairs = off if classes is None else (classes[:, None] == classes[None]) & off
  return (jnp.sum(jnp.where(same, d, 0)) / jnp.sum(same)) / (
      jnp.sum(jnp.where(pairs, d, 0)) / jnp.sum(pairs))
