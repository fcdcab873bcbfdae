"""WRN-28-10 on CIFAR-10, as in the paper (FACTS.md): 200 epochs, batch 128,
lr 0.1 x0.2 at epochs 60, 120, 160, SGD with Nesterov momentum, no dropout.

  python -m invjax.main --config=configs/wrn.py --workdir=DIR             # invariance
  python -m invjax.main --config=configs/wrn.py:baseline --workdir=DIR    # baseline
"""

from invjax import config_lib


def get_config(variant: str = "invariance"):
  c = config_lib.base_config()
  c.model = config_lib.ml_collections.ConfigDict(
      {"name": "wrn", "depth": 28, "widen": 10})
  c.dataset = "cifar10"
  c.image_shape, c.num_classes = (32, 32, 3), 10
  c.batch_size = 128
  c.num_epochs = 200.0
  c.learning_rate = 0.1
  c.lr_boundaries = (60, 120, 160)
  c.lr_decay = 0.2
  return config_lib.apply_variant(c, variant)
