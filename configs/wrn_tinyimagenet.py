"""WRN-28-10 on Tiny ImageNet (64x64, 200 classes), as in the paper (FACTS.md): the
CIFAR-10 network unchanged (so its blocks run at 64, 32 and 16 pixels), 50 epochs,
batch 32 (8 seeds x M = 4 copies), lr 0.01 x0.2 at epochs 30 and 40, no translation in
the augmentation. The test set is Tiny ImageNet's labelled validation split; top-5
accuracy is reported beside top-1.

The data: put tiny-imagenet-200.zip in tfds's manual directory (or name one with
--config.manual_dir=DIR); the first run prepares it (invjax/datasets/tiny_imagenet.py).

  python -m invjax.main --config=configs/wrn_tinyimagenet.py --workdir=DIR
  python -m invjax.main --config=configs/wrn_tinyimagenet.py:baseline --workdir=DIR
"""

from invjax import config_lib


def get_config(variant: str = "invariance"):
  c = config_lib.base_config()
  c.model = config_lib.ml_collections.ConfigDict(
      {"name": "wrn", "depth": 28, "widen": 10})
  c.dataset = "tiny_imagenet"
  c.test_split = "validation"
  c.image_shape, c.num_classes = (64, 64, 3), 200
  c.batch_size = 32
  c.num_epochs = 50.0
  c.learning_rate = 0.01
  c.lr_boundaries = (30, 40)
  c.lr_decay = 0.2
  c.invariance_copies = 4  # M = 4 on Tiny ImageNet's WRN
  c.augment.translate = 0.0
  return config_lib.apply_variant(c, variant)
