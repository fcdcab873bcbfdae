"""All-CNN-C on CIFAR-10, as in the paper (FACTS.md).

  python -m invjax.main --config=configs/allcnn.py --workdir=DIR             # invariance
  python -m invjax.main --config=configs/allcnn.py:baseline --workdir=DIR    # baseline
  python -m invjax.main --config=configs/allcnn.py:batchaug --workdir=DIR    # M=8, alpha=0
"""

from invjax import config_lib


def get_config(variant: str = "invariance"):
  c = config_lib.base_config()
  c.model.name = "allcnn"
  c.model.layers = "cifar"  # All-CNN-C
  c.model.kernel_init = "he_normal"  # or "glorot_uniform", the authors' Keras default
  c.dataset = "cifar10"
  c.image_shape, c.num_classes = (32, 32, 3), 10
  c.batch_size = 128
  c.num_epochs = 350.0
  c.learning_rate = 0.01
  c.lr_boundaries = (200, 250, 300)
  c.lr_decay = 0.1
  # On one GPU, the program one CUDA graph: the same step on the H200, compiled in
  # 4.3 s against 16.7 s at XLA's defaults (placement.GPU_COMPILE).
  c.gpu_compile = "graph"
  return config_lib.apply_variant(c, variant)
