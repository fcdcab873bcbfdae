"""The configuration every run starts from, its variants, and its checks.

Config files in `configs/` call `base_config()` and override a few fields. Every field a
run depends on is here, with its meaning.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from invjax import augment
from invjax import losses
from invjax import models

VARIANTS = {
    # name: (copies, alpha). References to invariance_copies / invariance_alpha, so an
    # override of those (e.g. --config.invariance_alpha=0.3) reaches the variant's
    # copies and alpha even though the config file applied the variant first.
    "invariance": lambda c: (c.get_ref("invariance_copies"),
                             c.get_ref("invariance_alpha")),  # the proposal
    "baseline": lambda c: (1, 0.0),  # the paper's baseline: epoch-wise augmentation
    "batchaug": lambda c: (c.get_ref("invariance_copies"), 0.0),  # copies, no L_inv
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict({"name": "allcnn", "width": 1.0})
  # "digits" (embedded), a path to an .npz, or a tensorflow-datasets name.
  c.dataset = "cifar10"
  c.data_dir = ""  # tfds data_dir ("" = tfds default)
  # Where tfds finds archives that need a manual download, e.g. tiny-imagenet-200.zip
  # ("" = tfds's default, <data_dir>/downloads/manual).
  c.manual_dir = ""
  c.test_split = "test"  # the held-out split of a tfds data set (Tiny ImageNet: validation)
  # What the data must be, checked when it is loaded; (), 0 = whatever it is. Set in the
  # paper's configs, so that --mode=describe needs no data.
  c.image_shape = ()  # (height, width, channels)
  c.num_classes = 0
  c.train_examples = 0  # use only the first N training images (0 = all)
  c.test_examples = 0  # use only the first N test images (0 = all)

  c.variant = "invariance"  # informative: which of VARIANTS set copies and alpha
  c.batch_size = 128  # the real batch: batch_size / copies seed images x copies
  c.copies = 8  # M, augmented copies of each seed image in a batch
  c.alpha = 0.1  # weight of the invariance loss (Eq. 4); CE weighs 1 - alpha
  c.invariance_copies = 8  # M of the "invariance" and "batchaug" variants
  c.invariance_alpha = 0.1  # alpha of the "invariance" variant
  c.alpha_ratio = 10.0  # alpha of the deepest layer / alpha of the first
  # How alpha is shared over the layers (losses.WEIGHT_LAWS): "exponential" (Eq. 4,
  # the paper's), "linear" (both grow with depth, the deepest alpha_ratio x the first),
  # "uniform" (alpha / L each) or "decay" (the first alpha_ratio x the deepest).
  c.layer_weight_law = "exponential"
  # Weight of a class-invariance term (not in the paper; the authors' code has it): Eq.
  # 3 with the examples' classes in place of their seeds, pulling together examples of
  # the same class, shared over the layers like alpha; CE then weighs
  # 1 - alpha - class_alpha. 0 = off.
  c.class_alpha = 0.0
  # "moments" (O(B D): per-seed and batch means) or "pairwise" (the |B| x |B| distance
  # matrices of Eq. 3 as written). Equal values and gradients (tests/test_losses.py,
  # tests/test_steps.py); moments costs about 1.5 % of the FLOPs of an All-CNN-C step,
  # pairwise about 70 % (experiments/results/benchmark.md).
  c.loss_method = "moments"

  c.num_epochs = 350.0
  c.learning_rate = 0.01
  c.lr_boundaries = (200, 250, 300)  # epochs at which the rate is multiplied by lr_decay
  c.lr_decay = 0.1
  c.momentum = 0.9
  c.nesterov = True

  # The ranges of the augmentation (invjax/augment.py: AugmentRanges); the paper's by
  # default. A preset (augment.PRESETS: "heavier" = the paper's, "light", "cutout")
  # sets them all: --config=configs/allcnn.py:invariance,light.
  c.augment_preset = "heavier"  # informative: the preset that set c.augment
  c.augment = ml_collections.ConfigDict({
      "flip": 0.5, "translate": 0.1, "scale": 0.15, "rotation": 22.5,
      "shear": 0.15, "contrast": 0.5, "brightness": 0.25, "cutout": 0.0})

  # bfloat16 activations and matmuls (TPU, recent GPUs); parameters, batch-norm
  # statistics, the cross-entropy and the invariance loss stay float32.
  c.half_precision = False
  c.seed = 0  # initialisation, seed order and augmentation all follow from it
  # Performance (results do not depend on these): the training set kept on the device,
  # where each step gathers its seeds (the host then does nothing inside the step
  # loop; falls back to host batches if it takes over half a device's memory), and
  # the number of steps run by one dispatched program.
  c.data_on_device = True
  c.steps_per_dispatch = 1
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 0  # 0: once per epoch (and always at the end)
  c.keep_checkpoints = 3
  c.eval_batch_size = 500
  c.probe_seeds = 16  # L_inv probe: a fixed batch of seeds x probe_copies, eval mode
  c.probe_copies = 8

  c.analysis = ml_collections.ConfigDict({
      "num_transforms": 5,  # transformed copies per test image (Eq. 2)
      "batch_size": 500,
      "seed": 1,
  })
  return c


def apply_variant(c: ml_collections.ConfigDict, variant: str | None):
  """Sets copies and alpha for one of VARIANTS ("" or None keeps the config's).

  "VARIANT,PRESET" also sets every augmentation range to those of augment.PRESETS[PRESET]
  (e.g. "baseline,light"; ",cutout" keeps the variant).
  """
  if not variant:
    return c
  variant, _, preset = variant.partition(",")
  if preset:
    if preset not in augment.PRESETS:
      raise ValueError(f"augmentation preset {preset!r} is unknown; valid presets are "
                       f"{sorted(augment.PRESETS)} (e.g. "
                       "--config=configs/allcnn.py:invariance,light).")
    for field, value in dataclasses.asdict(augment.PRESETS[preset]).items():
      c.augment[field] = value
    c.augment_preset = preset
  if not variant:
    return c
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is unknown; valid variants are "
                     f"{sorted(VARIANTS)} (e.g. --config=configs/allcnn.py:baseline).")
  copies, alpha = VARIANTS[variant](c)
  with c.unlocked():
    # Replace the fields rather than write through a reference an earlier variant set.
    for field in ("copies", "alpha"):
      if field in c:
        del c[field]
    c.copies, c.alpha = copies, alpha
  c.variant = variant
  return c


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ValueError naming the field, its value and the fix. Runs before compiling."""
  errors = []
  if c.copies < 1:
    errors.append(f"config.copies={c.copies}: M must be >= 1 (1 is the baseline).")
  elif c.batch_size % c.copies:
    errors.append(f"config.batch_size={c.batch_size} is not a multiple of "
                  f"config.copies={c.copies}; choose a batch of K * M images.")
  elif (c.batch_size // c.copies) % num_devices:
    errors.append(f"config.batch_size={c.batch_size} gives "
                  f"{c.batch_size // c.copies} seed images per batch, not a multiple of "
                  f"the {num_devices} devices; make batch_size / copies a multiple of "
                  f"{num_devices}.")
  if not 0.0 <= c.alpha < 1.0:
    errors.append(f"config.alpha={c.alpha} must be in [0, 1).")
  if c.alpha > 0 and c.copies < 2:
    errors.append(f"config.alpha={c.alpha} needs copies of each seed in the batch, "
                  f"but config.copies={c.copies}; set copies >= 2 or alpha=0.")
  if c.loss_method not in losses.METHODS:
    errors.append(f"config.loss_method={c.loss_method!r} is unknown; valid methods "
                  f"are {list(losses.METHODS)}.")
  if not 0.0 <= c.class_alpha < 1.0 or not c.alpha + c.class_alpha < 1.0:
    errors.append(f"config.class_alpha={c.class_alpha} must be >= 0 with alpha + "
                  f"class_alpha < 1 (alpha={c.alpha}): the cross-entropy weighs "
                  "1 - alpha - class_alpha.")
  if c.layer_weight_law not in losses.WEIGHT_LAWS:
    errors.append(f"config.layer_weight_law={c.layer_weight_law!r} is unknown; valid "
                  f"laws are {list(losses.WEIGHT_LAWS)}.")
  if not c.alpha_ratio > 0:
    errors.append(f"config.alpha_ratio={c.alpha_ratio} must be > 0.")
  if c.model.name not in models.names():
    errors.append(f"config.model.name={c.model.name!r} is unknown; valid names are "
                  f"{models.names()}.")
  try:
    ranges = augment.AugmentRanges.from_config(c.augment)
    if not 0.0 <= ranges.cutout <= 1.0:
      errors.append(f"config.augment.cutout={ranges.cutout} must be in [0, 1] (the "
                    "side of the cut-out square over the shorter image side).")
  except ValueError as e:
    errors.append(str(e))
  if c.augment_preset not in augment.PRESETS:
    errors.append(f"config.augment_preset={c.augment_preset!r} is unknown; valid "
                  f"presets are {sorted(augment.PRESETS)}.")
  shape = tuple(c.get("image_shape") or ())
  if shape and (len(shape) != 3 or any(not isinstance(v, int) or v < 1 for v in shape)):
    errors.append(f"config.image_shape={shape} must be (height, width, channels) of "
                  "positive integers, or () to take the data's.")
  if c.get("num_classes", 0) < 0:
    errors.append(f"config.num_classes={c.num_classes} must be > 0, or 0 to take the "
                  "data's.")
  if c.get("steps_per_dispatch", 1) < 1:
    errors.append(f"config.steps_per_dispatch={c.steps_per_dispatch} must be >= 1.")
  if c.num_epochs <= 0:
    errors.append(f"config.num_epochs={c.num_epochs} must be > 0.")
  late = [b for b in c.lr_boundaries if b >= c.num_epochs]
  if late:
    errors.append(f"config.lr_boundaries={tuple(c.lr_boundaries)} has epoch(s) {late} "
                  f"at or past config.num_epochs={c.num_epochs}; scale them with the "
                  "schedule (e.g. the same fractions of num_epochs).")
  if c.probe_copies < 2 or c.probe_seeds < 2:
    errors.append("config.probe_seeds and config.probe_copies must be >= 2 to measure "
                  f"L_inv, got {c.probe_seeds} and {c.probe_copies}.")
  if errors:
    raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))


def field_parent(c: ml_collections.ConfigDict, path: str):
  """(the ConfigDict holding the field at a dotted path like "model.width", its name)."""
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  return node, leaf


def set_field(c: ml_collections.ConfigDict, path: str, value,
              replace_type: bool = False) -> None:
  """Sets the field at a dotted path of an unlocked config.

  ml_collections refuses a value of another type than the field's; with
  `replace_type`, the field is replaced instead (e.g. a list of layers for a layer-set
  name).
  """
  node, leaf = field_parent(c, path)
  try:
    node[leaf] = value
  except TypeError:
    if not replace_type:
      raise
    del node[leaf]
    node[leaf] = value


def scaled_boundaries(c: ml_collections.ConfigDict, num_epochs: float):
  """The schedule's boundaries moved to a run of `num_epochs`, same fractions."""
  return tuple(b * num_epochs / c.num_epochs for b in c.lr_boundaries)
