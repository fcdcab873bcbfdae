"""invjax/config_lib.py: the checks of a configuration and its variants."""

import json
import subprocess
import sys

import pytest

from invjax import config_lib
from tests import helpers


BAD = [
    ({"batch_size": 100, "copies": 8}, "config.batch_size=100 is not a multiple"),
    ({"copies": 0}, "config.copies=0"),
    ({"alpha": 1.0}, r"config.alpha=1.0 must be a finite number in \[0, 1\)"),
    ({"alpha": 0.1, "copies": 1}, "needs copies"),
    ({"loss_method": "cosine"}, "config.loss_method='cosine'.*pairwise"),
    ({"model.name": "vgg"}, "config.model.name='vgg'.*allcnn"),
    ({"augment.hue": 0.1}, r"config.augment.hue is not a field"),
    ({"lr_boundaries": (1, 5), "num_epochs": 3.0}, r"epoch\(s\) \[5\]"),
    ({"alpha_boundaries": (1, 5), "num_epochs": 3.0},
     r"config.alpha_boundaries=\(1, 5\) has epoch\(s\) \[5\]"),
    ({"alpha": 0.3, "alpha_boundaries": (1,), "alpha_decay": 4.0},
     r"config.alpha=0.3 reaches 1.2 with config.alpha_decay=4.0 .* lower alpha or "
     "alpha_decay"),
    ({"num_epochs": 0.0}, "num_epochs=0.0"),
    ({"image_shape": (32, 32)}, r"config.image_shape=\(32, 32\) must be \(height, "),
    ({"num_classes": -1}, "config.num_classes=-1 must be an integer >= 2, or 0"),
    ({"steps_per_dispatch": -1}, r"config.steps_per_dispatch=-1 must be an integer >= 0 \(0: automatic\)"),
    ({"batch_size": 24, "copies": 8, "_devices": 2},
     "gives 3 seed images per batch, not a multiple of the 2 devices"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_config_errors_name_field_and_fix(overrides, message):
  c = helpers.tiny_config("digits")
  overrides = dict(overrides)
  devices = overrides.pop("_devices", 1)
  with c.unlocked():
    for k, v in overrides.items():
      config_lib.set_field(c, k, v)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c, devices)


def test_seeds_must_split_over_devices():
  c = helpers.tiny_config("digits", batch_size=24, copies=8)  # 3 seeds
  with pytest.raises(ValueError, match="multiple of the 2 devices"):
    config_lib.validate(c, num_devices=2)


def test_variants_set_copies_and_alpha():
  c = config_lib.base_config()
  c.invariance_copies, c.invariance_alpha = 4, 0.3
  assert (config_lib.apply_variant(c, "invariance").copies, c.alpha) == (4, 0.3)
  assert (config_lib.apply_variant(c, "batchaug").copies, c.alpha) == (4, 0.0)
  assert (config_lib.apply_variant(c, "baseline").copies, c.alpha) == (1, 0.0)
  assert c.variant == "baseline"
  with pytest.raises(ValueError, match="valid variants are"):
    config_lib.apply_variant(c, "strong")


def test_overriding_invariance_fields_after_the_variant_reaches_copies_and_alpha():
  """A config file applies its variant; command-line overrides come later, and those
  of the variant's inputs apply before it (config_lib.override, as cli.config_flag
  does with the --config.FIELD=VALUE overrides)."""
  import copy  # pylint: disable=g-import-not-at-top
  inv = config_lib.apply_variant(config_lib.base_config(), "invariance")
  inv.lock()
  config_lib.override(inv, {"invariance_alpha": 0.5, "invariance_copies": 4})
  assert (inv.copies, inv.alpha) == (4, 0.5)
  aug = config_lib.apply_variant(config_lib.base_config(), "batchaug")
  config_lib.override(aug, {"invariance_alpha": 0.5, "invariance_copies": 4})
  assert (aug.copies, aug.alpha) == (4, 0.0)
  # copies or alpha given themselves keep their values.
  own = config_lib.override(config_lib.apply_variant(config_lib.base_config(),
                                                     "invariance"),
                            {"invariance_alpha": 0.5, "alpha": 0.2})
  assert (own.copies, own.alpha) == (8, 0.2)
  # Re-applying a variant sets plain values, and copies are independent of their
  # original.
  other = copy.deepcopy(inv)
  config_lib.apply_variant(other, "baseline")
  assert (other.copies, other.alpha) == (1, 0.0)
  assert (other.invariance_copies, other.invariance_alpha) == (4, 0.5)
  assert (inv.copies, inv.alpha) == (4, 0.5)
  other.invariance_alpha = 0.2
  assert inv.alpha == 0.5
  assert json.loads(inv.to_json_best_effort())["alpha"] == 0.5


def test_command_line_overrides_of_the_variants_inputs_reach_copies_and_alpha():
  """--config.invariance_alpha=0.3 on the command line reaches alpha, although the
  config file applied its variant before the overrides were read."""
  out = subprocess.run([sys.executable, "-m", "invjax.main", "--mode=describe",
                        "--config=configs/quickstart.py", "--config.invariance_alpha=0.3",
                        "--config.invariance_copies=4"],
                       cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert "alpha: 0.3" in lines and "copies: 4" in lines
