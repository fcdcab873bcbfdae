"""A narrow All-CNN-C on the embedded handwritten digits: minutes on a laptop CPU.

Same method and schedule shape as configs/allcnn.py; an eighth of the width, 30 epochs
over 1,347 training digits (scikit-learn's, upsampled to 32x32x3), no download.
"""

from invjax import config_lib


def get_config(variant: str = "invariance"):
  c = config_lib.base_config()
  c.model.name = "allcnn"
  c.model.width = 0.125
  c.dataset = "digits"
  c.batch_size = 64
  c.num_epochs = 30.0
  c.learning_rate = 0.05
  c.lr_boundaries = (18, 23, 27)
  c.lr_decay = 0.1
  c.log_every_steps = 10
  c.eval_every_epochs = 5.0
  c.eval_batch_size = 450
  c.analysis.batch_size = 450
  return config_lib.apply_variant(c, variant)
