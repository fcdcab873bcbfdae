"""All-CNN on Tiny ImageNet (64x64, 200 classes), as in the paper (FACTS.md): three more
layers than All-CNN-C and a stride-2 first convolution (the "tinyimagenet" layer set of
invjax/models/allcnn.py), 150 epochs, batch 128 (16 seeds x 8 copies), lr 0.01 x0.1 at
epochs 100 and 125, no translation in the augmentation. The test set is Tiny ImageNet's
labelled validation split; top-5 accuracy is reported beside top-1.

The data: put tiny-imagenet-200.zip in tfds's manual directory (or name one with
--config.manual_dir=DIR); the first run prepares it (invjax/datasets/tiny_imagenet.py).

  python -m invjax.main --config=configs/allcnn_tinyimagenet.py --workdir=DIR
  python -m invjax.main --config=configs/allcnn_tinyimagenet.py:baseline --workdir=DIR
"""

from invjax import config_lib


def get_config(variant: str = "invariance"):
  c = config_lib.base_config()
  c.model.name = "allcnn"
  c.model.layers = "tinyimagenet"
  c.model.kernel_init = "he_normal"  # or "glorot_uniform", the authors' Keras default
  c.dataset = "tiny_imagenet"
  c.test_split = "validation"
  c.image_shape, c.num_classes = (64, 64, 3), 200
  c.batch_size = 128
  c.num_epochs = 150.0
  c.learning_rate = 0.01
  c.lr_boundaries = (100, 125)
  c.lr_decay = 0.1
  c.augment.translate = 0.0  # Tiny ImageNet: the same scheme without translation
  return config_lib.apply_variant(c, variant)
