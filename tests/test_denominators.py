"""experiments/denominators.py: L_inv under both of Eq. 3's denominators on a run."""

import pytest

from experiments import denominators
from invjax import api


def test_each_denominator_is_the_apis_loss_on_the_same_copies(trained):
  """The mean over batches of the API's L_inv (the training probe's, tested there) on
  copies made as the tool makes them: seeds taken in order, batch i on seed + i."""
  _, workdir, _ = trained
  run = api.load_run(workdir)
  x, y = run.data.x_test, run.data.y_test
  got = denominators.measure(run, x, y, seeds=4, copies=3, batches=2, seed=5)
  for d in ("batch", "class"):
    want = {name: 0.0 for name in run.layer_shapes}
    for i in range(2):
      c = run.augmented_copies(x[4 * i:4 * i + 4], 3, seed=5 + i)
      inv = run.invariance_loss(c, labels=y[4 * i:4 * i + 4], denominator=d)
      want = {k: v + inv[k] / 2 for k, v in want.items()}
    assert got[d] == pytest.approx(want, rel=1e-5)
  assert got["batch"] != pytest.approx(got["class"])  # the labels do matter
  text = denominators.markdown([{"run": workdir, "variant": "v", "step": 8, **got}],
                               "cmd", 4, 3, 2)
  first = next(iter(run.layer_shapes))
  ratio = got["class"][first] / got["batch"][first]
  assert f"| {first} | {got['batch'][first]:.4f} | {got['class'][first]:.4f} | " \
         f"{ratio:.2f} |" in text
  with pytest.raises(ValueError, match="need 400 images.*lower --batches"):
    denominators.measure(run, x, y, seeds=4, copies=3, batches=100)
