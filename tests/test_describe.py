"""`--mode=describe` (invjax/describe.py): the model and schedule of a config, no
training."""

import subprocess
import sys


from invjax import models
from tests import helpers


def test_cli_describe_needs_no_data_when_the_config_declares_its_shape():
  """Tiny ImageNet is not prepared here: describe works from the declared shapes."""
  out = subprocess.run([sys.executable, "-m", "invjax.main",
                        "--config=configs/allcnn_tinyimagenet.py", "--mode=describe",
                        "--config.model.width=0.125", "--config.data_dir=/nonexistent"],
                       cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  model = models.create("allcnn", 200, width=0.125, layers="tinyimagenet")
  assert f"parameters: {models.param_count(model, (64, 64, 3)):,}" in out.stdout
  assert "tiny_imagenet (declared, not loaded): input (64, 64, 3), 200 classes" in out.stdout
  assert "conv12       (4, 4, 200)" in out.stdout
  assert "150 epochs of batch 128 (16 seeds x 8 copies)" in out.stdout
  flops = float(out.stdout.split("forward FLOPs per image (XLA): ")[1].split()[0])
  macs = float(out.stdout.split("(every tap, as papers count): ")[1].split()[0])
  assert 0.9 * macs < flops / 2 <= macs  # XLA leaves out the taps on zero padding


def test_describe_loads_the_data_when_the_shape_is_not_declared(npz):
  from invjax import describe  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_config(npz)
  d = describe.describe(config)
  assert d["input"] == (16, 16, 3) and d["num_classes"] == 4
  assert d["steps_per_epoch"] == 64 // 16 and d["total_steps"] == 8
  assert list(d["sown_layers"]) == helpers.TINY_SOWN
  assert "8 steps, 4 per epoch" in describe.format_description(d, config)
