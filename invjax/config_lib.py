"""The configuration every run starts from, its variants, and its checks.

Config files in `configs/` call `base_config()` and override a few fields. Every field a
run depends on is here, with its meaning, and has a rule in `FIELDS` (its type and
domain), which `validate` checks before anything is loaded or compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections
import numpy as np

from invjax import augment
from invjax import errors as errors_lib
from invjax import losses
from invjax import models
from invjax import placement

VARIANTS = {
    # name: (copies, alpha), plain values read from the config when it is applied.
    "invariance": lambda c: (c.invariance_copies, c.invariance_alpha),  # the proposal
    "baseline": lambda c: (1, 0.0),  # the paper's baseline: epoch-wise augmentation
    "batchaug": lambda c: (c.invariance_copies, 0.0),  # copies, no L_inv
}
# The fields the variants read: overriding one applies the variant again (`override`).
VARIANT_INPUTS = ("invariance_copies", "invariance_alpha")


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
  # alpha over training (not in the paper, whose alpha is constant; the authors' code
  # has such a schedule, its invariance_params/*_decay.yml): at each boundary epoch,
  # alpha and every layer's alpha_l are multiplied by alpha_decay (> 1 raises them, 0
  # turns the loss off), and the cross-entropy weighs 1 - alpha(t) - class_alpha.
  # () = constant, the paper's. E.g. alpha=0.5, alpha_boundaries=(100,),
  # alpha_decay=0.2: 0.5 for 100 epochs, then 0.1.
  c.alpha_boundaries = ()
  c.alpha_decay = 0.1
  # Weight of a class-invariance term (not in the paper; the authors' code has it): Eq.
  # 3 with the examples' classes in place of their seeds, pulling together examples of
  # the same class, shared over the layers like alpha; CE then weighs
  # 1 - alpha - class_alpha. 0 = off.
  c.class_alpha = 0.0
  # What Eq. 3 divides the within-seed mean distance by (losses.DENOMINATORS): the mean
  # over every pair of the batch ("batch", as the paper writes it) or over the pairs of
  # the same class ("class", as the authors' training code computes it). The L_inv
  # probe (Figure 5) logs both in every run, the baseline's too: probe/inv_loss/* and
  # probe/inv_loss_same_class/*. Only a run with alpha > 0 trains differently.
  c.invariance_denominator = "batch"
  # "moments" (O(B D): per-seed and batch means) or "pairwise" (the |B| x |B| distance
  # matrices of Eq. 3 as written): equal values and gradients; what each costs is in
  # experiments/results/benchmark.md.
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
  # Which batch norm the models use (invjax/models/batch_norm.py): "flax"
  # (flax.linen.BatchNorm), "fused" (one pass for the statistics and a written backward:
  # fewer GPU kernels), or "auto": flax's on a CPU, the fused one elsewhere. The same
  # function and variables, so results differ by rounding only and a run may resume
  # with another choice.
  c.batch_norm = "auto"
  # How XLA builds the programs on one GPU (placement.GPU_COMPILE): "xla", its defaults,
  # or "graph", the whole program one CUDA graph (convolutions as cuDNN fusions, no
  # fusion autotuning): on the H200, DenseNet-BC's step 25 % shorter (two windows
  # apart) and All-CNN-C's the same, each compiled 4 x faster (configs/allcnn.py and
  # densenet.py set it). Elsewhere, and on several GPUs, nothing changes.
  c.gpu_compile = "xla"
  c.seed = 0  # initialisation, seed order and augmentation all follow from it
  # Performance (results do not depend on these): the training set kept on the device,
  # where each step gathers its seeds (the host then does nothing inside the step
  # loop; falls back to host batches if it takes over half a device's memory), and
  # the number of steps run by one dispatched program (0: automatic, build.dispatch_steps:
  # 1 on a CPU; elsewhere up to 100, as many as fit between logs, evaluations and
  # checkpoints).
  c.data_on_device = True
  c.steps_per_dispatch = 0
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 0  # 0: once per epoch (and always at the end)
  c.keep_checkpoints = 3  # the newest N checkpoints are kept (0: all of them)
  # Wall-clock limit of one start of the run, in minutes (0: none). Before each program
  # the loop predicts, from the measured time per step, whether the next one and the
  # checkpoint after it still fit; if not, it saves a checkpoint and stops cleanly,
  # and the run card (run_card.json) says where. Rerunning resumes. For SLURM or
  # preemptible queues and for short accelerator windows.
  c.time_limit_minutes = 0.0
  c.eval_batch_size = 500
  c.probe_seeds = 16  # L_inv probe: a fixed batch of seeds x probe_copies, eval mode
  c.probe_copies = 8
  # Divergence stops the run, naming the step, before anything of it is checkpointed:
  # a step's cross-entropy above divergence_factor x ln(num_classes) (the loss of a
  # uniform guess; 0: never), or, with stop_dead_network, a network whose class scores
  # are the same for every probe image (it has died: one answer whatever the input).
  c.divergence_factor = 10.0
  c.stop_dead_network = True

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
    raise errors_lib.ConfigError(
        f"config variant {variant!r} is unknown; valid variants are {sorted(VARIANTS)} "
        "(e.g. --config=configs/allcnn.py:baseline).")
  c.copies, c.alpha = VARIANTS[variant](c)
  c.variant = variant
  return c


def override(c: ml_collections.ConfigDict, overrides, replace_type: bool = False):
  """Sets each field of `overrides` ({dotted path: value}) as the command line's
  --config.FIELD=VALUE does, then `follow_variant`: an override of the variant's inputs
  applies before it, so invariance_alpha=0.3 reaches alpha."""
  for path, value in dict(overrides).items():
    set_field(c, path, value, replace_type=replace_type)
  return follow_variant(c, overrides)


def follow_variant(c: ml_collections.ConfigDict, overridden):
  """Applies the config's variant again when the fields `overridden` (already set)
  include one of VARIANT_INPUTS, so that its copies and alpha follow them; copies or
  alpha overridden themselves keep the values given."""
  overridden = set(overridden)
  if c.variant and overridden & set(VARIANT_INPUTS):
    given = {f: c[f] for f in ("copies", "alpha") if f in overridden}
    apply_variant(c, c.variant)
    for f, v in given.items():
      c[f] = v
  return c


# Field rules -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field's value must be: `check(value)` is True for the valid ones, and
  `must` says what they are (for the message)."""
  check: Callable[[Any], bool]
  must: str


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_num(v) -> bool:
  return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(v)


def _int(lo: int, hi: int | None = None, note: str = "") -> Rule:
  ok = lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi)
  span = f">= {lo}" if hi is None else f"in {lo} .. {hi}"
  return Rule(ok, f"an integer {span}{note}")


# A JAX key holds 32 bits of its seed: a larger one would repeat a smaller one's draws.
_SEED = _int(0, 2**32 - 1, note=" (JAX's keys hold 32 bits of a seed)")


def _num(lo: float, hi: float = math.inf, lo_open: bool = False,
         hi_open: bool = False, note: str = "") -> Rule:
  def ok(v):
    return (_is_num(v) and (v > lo if lo_open else v >= lo) and
            (v < hi if hi_open else v <= hi))
  if hi == math.inf:
    span = f"> {lo}" if lo_open else f">= {lo}"
  else:
    span = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  return Rule(ok, f"a finite number {span}{note}")


class _LazyText:
  """Text made when it is shown (e.g. the registered model names)."""

  def __init__(self, fn):
    self.fn = fn

  def __str__(self):
    return self.fn()

  def __format__(self, spec):
    return format(str(self), spec)


def _choice(options: Callable[[], Any]) -> Rule:
  return Rule(lambda v: isinstance(v, str) and v in options(),
              _LazyText(lambda: f"one of {sorted(options())}"))


_BOOL = Rule(lambda v: isinstance(v, (bool, np.bool_)), "True or False")
_STR = Rule(lambda v: isinstance(v, str), "a string")
_NAME = Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")


def _seq(v) -> bool:
  return isinstance(v, (tuple, list))


def _image_shape(v) -> bool:
  return _seq(v) and (len(v) == 0 or (len(v) == 3 and all(
      _is_int(x) and x >= 1 for x in v)))


def _boundaries(v) -> bool:
  return (_seq(v) and all(_is_num(b) and b > 0 for b in v) and
          all(a < b for a, b in zip(v, v[1:])))


def _layers(v) -> bool:
  if isinstance(v, str):
    return v in models.allcnn.LAYER_SETS
  return _seq(v) and len(v) > 0 and all(
      _seq(s) and len(s) == 4 and all(_is_int(x) and x >= 1 for x in s[:3]) and
      str(s[3]).upper() in ("SAME", "VALID") for s in v)


# Every field a config may have: one row each (a field of base_config() or of a model
# needs one). Cross-field checks are in `validate` below.
FIELDS: dict[str, Rule] = {
    "model.name": _choice(models.names),
    "model.width": _num(0, lo_open=True),
    "model.layers": Rule(_layers, _LazyText(lambda: (
        f"one of {sorted(models.allcnn.LAYER_SETS)} or a non-empty list of (features, "
        "kernel, stride, 'SAME' or 'VALID') with positive integers"))),
    "model.depth": _int(1, note=" (6n + 4 for wrn and densenet, e.g. 28 or 100)"),
    "model.widen": _int(1),
    "model.strides": Rule(lambda v: _seq(v) and len(v) == 3 and all(
        _is_int(x) and x >= 1 for x in v), "3 positive integers"),
    "model.growth": _int(1),
    "model.compression": _num(0, 1, lo_open=True),
    "model.num_blocks": _int(1),
    "model.widen_bottlenecks": _BOOL,
    "model.kernel_init": _choice(lambda: models.layers.KERNEL_INITS),
    "dataset": _NAME,
    "data_dir": _STR,
    "manual_dir": _STR,
    "test_split": _NAME,
    "image_shape": Rule(_image_shape, "(height, width, channels) of positive integers, "
                        "or () to take the data's"),
    "num_classes": Rule(lambda v: _is_int(v) and (v == 0 or v >= 2),
                        "an integer >= 2, or 0 to take the data's"),
    "train_examples": _int(0, note=" (0: all)"),
    "test_examples": _int(0, note=" (0: all)"),
    "variant": Rule(lambda v: isinstance(v, str) and (v in VARIANTS or v == ""),
                    f"one of {sorted(VARIANTS)}"),
    "batch_size": _int(1),
    "copies": _int(1, note=" (1 is the baseline)"),
    "alpha": _num(0, 1, hi_open=True),
    "invariance_copies": _int(1),
    "invariance_alpha": _num(0, 1, hi_open=True),
    "alpha_ratio": _num(0, lo_open=True),
    "layer_weight_law": _choice(lambda: losses.WEIGHT_LAWS),
    "alpha_boundaries": Rule(_boundaries, "increasing epochs > 0, e.g. (100,), or () "
                             "for a constant alpha"),
    "alpha_decay": _num(0),
    "class_alpha": _num(0, 1, hi_open=True),
    "invariance_denominator": _choice(lambda: losses.DENOMINATORS),
    "loss_method": _choice(lambda: losses.METHODS),
    "num_epochs": _num(0, lo_open=True),
    "learning_rate": _num(0, lo_open=True),
    "lr_boundaries": Rule(_boundaries, "increasing epochs > 0, e.g. (200, 250, 300), "
                          "or () for a constant rate"),
    "lr_decay": _num(0, 1, lo_open=True),
    "momentum": _num(0, 1, hi_open=True),
    "nesterov": _BOOL,
    "augment.flip": _num(0, 1, note=" (a probability)"),
    "augment.translate": _num(0, 1, note=" (a fraction of the image size)"),
    "augment.scale": _num(0, 1, hi_open=True),
    "augment.rotation": _num(0, 180, note=" (degrees)"),
    "augment.shear": _num(0, 1.5, note=" (radians)"),
    "augment.contrast": _num(0, 1),
    "augment.brightness": _num(0, 1),
    "augment.cutout": _num(0, 1, note=" (the cut-out square's side over the shorter "
                           "image side)"),
    "augment_preset": _choice(lambda: augment.PRESETS),
    "half_precision": _BOOL,
    "batch_norm": _choice(lambda: models.batch_norm.CHOICES),
    "gpu_compile": _choice(lambda: placement.GPU_COMPILE),
    "seed": _SEED,
    "data_on_device": _BOOL,
    "steps_per_dispatch": _int(0, note=" (0: automatic)"),
    "log_every_steps": _int(1),
    "eval_every_epochs": _num(0, lo_open=True),
    "checkpoint_every_steps": _int(0, note=" (0: once per epoch)"),
    "keep_checkpoints": _int(0, note=" (0: keep all)"),
    "eval_batch_size": _int(1),
    "probe_seeds": _int(2),
    "probe_copies": _int(2),
    "analysis.num_transforms": _int(1),
    "analysis.batch_size": _int(1),
    "analysis.seed": _SEED,
    "divergence_factor": Rule(lambda v: _is_num(v) and (v == 0 or v >= 2),
                              "a finite number >= 2, or 0 to never stop for it"),
    "stop_dead_network": _BOOL,
    "time_limit_minutes": _num(0, note=" of minutes (0: no limit), e.g. 55"),
}


def flat_fields(c, prefix: str = "") -> dict[str, Any]:
  """{"a.b": value} of every leaf field of a config (or of nested dicts)."""
  out = {}
  for k in c.keys():
    v = c[k]
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flat_fields(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _show(v) -> str:
  return repr(tuple(v)) if isinstance(v, list) else repr(v)


def check_fields(c) -> list[str]:
  """One message per field whose value breaks its rule or that no rule knows."""
  errors = []
  for path, value in flat_fields(c).items():
    rule = FIELDS.get(path)
    if rule is None:
      group = path.rsplit(".", 1)[0] + "." if "." in path else ""
      known = [f[len(group):] for f in FIELDS
               if f.startswith(group) and "." not in f[len(group):]]
      errors.append(f"config.{path} is not a field invjax knows; the fields"
                    f"{' of config.' + group[:-1] if group else ''} are: "
                    f"{', '.join(known)}.")
    elif not rule.check(value):
      errors.append(f"config.{path}={_show(value)} must be {rule.must}.")
  return errors


def validate(c: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError naming each bad field, its value and the fix. Runs before
  anything loads or compiles: every field by its rule in FIELDS, then the checks
  between fields."""
  errors = check_fields(c)
  if errors:  # the checks below assume each field of the right type
    raise errors_lib.ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
  if c.batch_size % c.copies:
    errors.append(f"config.batch_size={c.batch_size} is not a multiple of "
                  f"config.copies={c.copies}; choose a batch of K * M images.")
  elif (c.batch_size // c.copies) % num_devices:
    errors.append(f"config.batch_size={c.batch_size} gives "
                  f"{c.batch_size // c.copies} seed images per batch, not a multiple of "
                  f"the {num_devices} devices; make batch_size / copies a multiple of "
                  f"{num_devices}.")
  if c.alpha > 0 and c.copies < 2:
    errors.append(f"config.alpha={c.alpha} needs copies of each seed in the batch, "
                  f"but config.copies={c.copies}; set copies >= 2 or alpha=0.")
  model_fields = {k for k in c.model.keys() if k != "name"}
  cls = models._REGISTRY[c.model.name]  # pylint: disable=protected-access
  valid = {f.name for f in dataclasses.fields(cls)} - models.NOT_CONFIG_FIELDS
  if model_fields - valid:
    errors.append(f"config.model has field(s) {sorted(model_fields - valid)} that model "
                  f"{c.model.name!r} does not take; its fields are {sorted(valid)}.")
  if c.alpha + c.class_alpha >= 1.0:
    errors.append(f"config.alpha={c.alpha} + config.class_alpha={c.class_alpha} must be "
                  "< 1: the cross-entropy weighs 1 - alpha - class_alpha.")
  elif c.alpha_boundaries and c.alpha * max(alpha_scales(c)) + c.class_alpha >= 1.0:
    errors.append(
        f"config.alpha={c.alpha} reaches {c.alpha * max(alpha_scales(c)):g} with "
        f"config.alpha_decay={c.alpha_decay} at config.alpha_boundaries="
        f"{tuple(c.alpha_boundaries)}; with config.class_alpha={c.class_alpha} it must "
        "stay < 1 (the cross-entropy weighs 1 - alpha - class_alpha): lower alpha or "
        "alpha_decay.")
  for field in ("lr_boundaries", "alpha_boundaries"):
    late = [b for b in c[field] if b >= c.num_epochs]
    if late:
      errors.append(f"config.{field}={tuple(c[field])} has epoch(s) {late} at or past "
                    f"config.num_epochs={c.num_epochs}; scale them with the schedule "
                    "(e.g. the same fractions of num_epochs).")
  if errors:
    raise errors_lib.ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


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


def scaled_boundaries(c: ml_collections.ConfigDict, num_epochs: float,
                      field: str = "lr_boundaries"):
  """A schedule's boundaries (`field`: "lr_boundaries" or "alpha_boundaries") moved to
  a run of `num_epochs`, same fractions."""
  return tuple(b * num_epochs / c.num_epochs for b in c[field])


def alpha_scales(c: ml_collections.ConfigDict) -> tuple[float, ...]:
  """alpha's factor in each phase of its schedule: 1, then alpha_decay ** k after the
  k-th of alpha_boundaries."""
  return tuple(c.alpha_decay ** k for k in range(len(c.alpha_boundaries) + 1))
