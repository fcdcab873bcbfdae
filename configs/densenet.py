"""DenseNet-BC (L = 100, k = 12, compression 0.5) on CIFAR-10, as in the paper
(FACTS.md): 300 epochs, batch 64, lr 0.1 x0.1 at epochs 150 and 225.

  python -m invjax.main --config=configs/densenet.py --workdir=DIR            # invariance
  python -m invjax.main --config=configs/densenet.py:baseline --workdir=DIR   # baseline
"""

from invjax import config_lib


def get_config(variant: str = "invariance"):
  c = config_lib.base_config()
  c.model = config_lib.ml_collections.ConfigDict(
      {"name": "densenet", "depth": 100, "growth": 12, "compression": 0.5,
       # True: one bottleneck convolution shape per block, the same function
       # (models/densenet.py): fewer convolutions for XLA's GPU compile to autotune.
       "widen_bottlenecks": False})
  c.dataset = "cifar10"
  c.image_shape, c.num_classes = (32, 32, 3), 10
  c.batch_size = 64
  c.num_epochs = 300.0
  c.learning_rate = 0.1
  c.lr_boundaries = (150, 225)
  c.lr_decay = 0.1
  # On one GPU, the program one CUDA graph: on the H200 the step took 9.37 ms against
  # 12.46 ms at XLA's defaults (another window), its first step program compiled in
  # 23.6 s against 108.4 s (placement.GPU_COMPILE).
  c.gpu_compile = "graph"
  return config_lib.apply_variant(c, variant)
