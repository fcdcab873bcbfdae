"""The pure core imports no TensorFlow, tfds, clu or orbax; without TensorFlow (as on a
bare accelerator image) training and analysis still work."""

import json
import os
import subprocess
import sys

from tests import helpers

SHELL_ONLY = ("tensorflow", "tensorflow_datasets", "clu", "orbax")


def test_core_imports_no_shell_packages():
  code = ("import sys; import invjax.augment, invjax.losses, invjax.analysis, "
          "invjax.models, invjax.steps, invjax.flat_state, invjax.seed_order, "
          "invjax.similarity, invjax.attacks; "
          f"print([m for m in {SHELL_ONLY!r} if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"


def test_train_and_analyze_without_tensorflow(tmp_path):
  npz = helpers.write_npz(tmp_path / "toy.npz")
  workdir = str(tmp_path / "run")
  # Make TensorFlow (and so tensorboard summaries and tfds loading) unimportable.
  code = (
      "import sys; sys.modules['tensorflow'] = None; sys.path.insert(0, '.');"
      "from invjax import train, analyze; from tests import helpers;"
      f"c = helpers.tiny_config({npz!r}, num_epochs=1.0, lr_boundaries=());"
      f"train.train_and_evaluate(c, {workdir!r}); analyze.analyze(c, {workdir!r});"
      # The analysis API too: load the run, probe a layer.
      f"from invjax import api; r = api.load_run({workdir!r});"
      "print('API', r.step, r.activations(r.data.x_test[:3], 'conv2')['conv2'].shape);"
      "print('TF', 'tensorflow' in sys.modules and sys.modules['tensorflow'] is not None)")
  out = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "TF False" in out.stdout
  assert "API 4 (3, 8, 8, 8)" in out.stdout
  assert "no TensorBoard summaries" in out.stderr
  assert not os.path.exists(os.path.join(workdir, "tensorboard"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert any("test/accuracy" in json.loads(line) for line in f)
  assert os.path.exists(os.path.join(workdir, "analysis", "scores.npz"))


def test_every_script_in_experiments_is_in_its_index():
  """experiments/README.md names every script and folder there, so that a newcomer's
  map of the directory stays whole."""
  folder = os.path.join(helpers.ROOT, "experiments")
  with open(os.path.join(folder, "README.md")) as f:
    index = f.read()
  names = [n for n in os.listdir(folder)
           if n.endswith((".py", ".sh")) and n != "__init__.py"
           or os.path.isdir(os.path.join(folder, n)) and not n.startswith(("_", "."))]
  assert len(names) > 25
  missing = [n for n in sorted(names) if f"`{n}" not in index]
  assert not missing, f"experiments/README.md does not name {missing}"
