"""Analysis from Python: load a trained run and probe its layers, e.g. in a notebook.

  from invjax import api
  run = api.load_run("/tmp/invjax_quickstart/invariance")   # the latest checkpoint
  x = run.data.x_test[:500]                                  # uint8 [N, H, W, C]
  acts = run.activations(x, ["conv3", "conv9"])              # {layer: [N, ...]} numpy
  scores = run.invariance_scores(x)                          # {layer: [N, 5]} (Eq. 2)
  inv = run.invariance_loss(run.augmented_copies(x[:16], 8)) # {layer: L_inv} (Eq. 3)
  cka = api.similarity_matrix(acts, other.activations(x))    # [2, L] linear CKA
  rec = api.load_run("experiments/results/records/allcnn_cifar10/paper/invariance",
                     dataset="data/cifar10.npz")  # a run record: its final weights

Everything runs in eval mode (running batch-norm statistics), in batches split over
every device there is (a last batch that does not fill them is padded, and its padding
dropped), and comes back as numpy (activations and logits as float32, whatever the
run computes in). Images are uint8 in [0, 255] or float in [0, 1], [N, H, W, C]. A run
trained on any number of devices loads on any other. Importing this module imports no
TensorFlow (loading a run whose config names a tfds data set, without `image_shape`
and `num_classes`, reads the data set to learn them, and so needs it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from invjax import analysis
from invjax import analyze as analyze_lib
from invjax import augment
from invjax import build as build_lib
from invjax import checkpoints
from invjax import input_pipeline
from invjax import losses
from invjax import models
from invjax import placement as placement_lib
from invjax import steps as steps_lib
from invjax import workdirs
from invjax.similarity import linear_cka, rsa, similarity_matrix  # pylint: disable=unused-import


def _train_hint(workdir: str) -> str:
  return (f"train it first (python -m invjax.main --config=... --workdir={workdir}), "
          "or give the workdir of a trained run")


@dataclasses.dataclass
class LoadedRun:
  """A trained run: its configuration, model and restored state at one step."""
  workdir: str
  step: int
  config: Any  # the run's saved config.json (ml_collections.ConfigDict)
  model: Any  # the flax module
  state: steps_lib.TrainState  # restored, replicated on every device
  image_shape: tuple[int, int, int]
  layer_shapes: dict[str, tuple[int, ...]]  # sown layers, depth order, per image
  placement: placement_lib.Placement
  _data: input_pipeline.Dataset | None = None
  _programs: dict = dataclasses.field(default_factory=dict)

  # What the run holds --------------------------------------------------------------

  @property
  def layers(self) -> list[str]:
    """"pixels" (the input) and the sown layers, in depth order."""
    return ["pixels", *self.layer_shapes]

  @property
  def data(self) -> input_pipeline.Dataset:
    """The run's data set (loaded on first use)."""
    if self._data is None:
      self._data = input_pipeline.load(self.config)
    return self._data

  @property
  def ranges(self) -> augment.AugmentRanges:
    """The run's augmentation ranges (the scoring transformations halve them)."""
    return augment.AugmentRanges.from_config(self.config.augment)

  @property
  def variables(self) -> dict[str, Any]:
    """{"params", "batch_stats"} as numpy: the weights for use anywhere."""
    return jax.device_get({"params": self.state.params,
                           "batch_stats": self.state.batch_stats})

  def __repr__(self):
    return (f"LoadedRun({self.workdir!r}, step={self.step}, "
            f"model={self.config.model.name}, variant={self.config.variant}, "
            f"layers={self.layers})")

  # Checks ---------------------------------------------------------------------------

  def _where(self) -> str:
    return f"the run in {self.workdir} (step {self.step})"

  def _images(self, images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f"images of shape {x.shape} do not fit {self._where()}, whose "
                       f"model takes [N, {', '.join(map(str, self.image_shape))}]; "
                       "give a batch of such images (one image: x[None]).")
    if len(x) == 0:
      raise ValueError("no images given.")
    if x.dtype == np.uint8:
      return x
    if not np.issubdtype(x.dtype, np.floating):
      raise ValueError(f"images of dtype {x.dtype}: give uint8 in [0, 255] or float "
                       "in [0, 1].")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
      raise ValueError(f"float images must be in [0, 1] (these span [{lo:.3g}, "
                       f"{hi:.3g}]): divide uint8 images by 255, or pass them as uint8.")
    return x.astype(np.float32)

  def _layers(self, layers, default) -> list[str]:
    if layers is None:
      return list(default)
    if isinstance(layers, str):
      layers = [layers]
    unknown = [k for k in layers if k not in self.layers]
    if unknown:
      raise ValueError(f"layer(s) {unknown} are not sown by {self._where()}; its "
                       f"layers are {self.layers}.")
    return list(layers)

  def _batch_size(self, n: int, batch_size: int) -> int:
    """A multiple of the device count, no larger than n needs."""
    n_dev = jax.device_count()
    return min(placement_lib.device_multiple(batch_size, n_dev),
               placement_lib.padded_to_devices(n, n_dev))

  @staticmethod
  def _preprocess(x: np.ndarray):
    return steps_lib.to_float if x.dtype == np.uint8 else (lambda a: a)

  # Forward passes -------------------------------------------------------------------

  def _program(self, layers: tuple[str, ...], logits: bool, dtype) -> Callable:
    key = (layers, logits, np.dtype(dtype).name)
    if key not in self._programs:
      pre = steps_lib.to_float if np.dtype(dtype) == np.uint8 else (lambda a: a)

      # float32 out, whatever the model computes in: bfloat16 -> float32 is exact, and
      # numpy arithmetic on bfloat16 arrays accumulates in bfloat16 (a mean over a few
      # hundred thousand values comes out wrong by tens of percent).
      def forward(state, x):
        feats, out = steps_lib.features_and_logits(state, pre(x))
        f32 = lambda a: a.astype(jnp.float32)
        return {k: f32(feats[k]) for k in layers}, (f32(out) if logits else None)

      self._programs[key] = jax.jit(forward)
    return self._programs[key]

  def _forward(self, images, layers: Sequence[str], logits: bool, batch_size: int):
    x = self._images(images)
    n = len(x)
    size = self._batch_size(n, batch_size)
    program = self._program(tuple(layers), logits, x.dtype)
    acts, outs = {k: [] for k in layers}, []
    for start in range(0, n, size):
      part, _, _ = placement_lib.pad_batch(x[start:start + size],
                                   np.zeros(min(size, n - start), np.int32), size)
      feats, out = analysis.fetch(program(self.state, self.placement.shard(part)))
      real = min(size, n - start)
      for k in layers:
        acts[k].append(np.asarray(feats[k][:real]))
      if logits:
        outs.append(np.asarray(out[:real]))
    acts = {k: np.concatenate(v) for k, v in acts.items()}
    return acts, (np.concatenate(outs) if logits else None)

  def activations(self, images, layers: Sequence[str] | str | None = None,
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """{layer: float32 activations [N, ...]} of `images`, eval mode, in depth order.
    `layers` defaults to all of `self.layers` ("pixels" is the input, in [0, 1])."""
    layers = self._layers(layers, self.layers)
    return self._forward(images, layers, False, batch_size)[0]

  def logits(self, images, batch_size: int = 256) -> np.ndarray:
    """float32 [N, num_classes] eval-mode logits of `images`."""
    return self._forward(images, [], True, batch_size)[1]

  def predict(self, images, batch_size: int = 256) -> np.ndarray:
    """[N] predicted classes."""
    return np.argmax(self.logits(images, batch_size), axis=-1)

  # Transformations, scores, L_inv ---------------------------------------------------

  def _scoring(self, num_transforms, seed, batch_size):
    ac = self.config.analysis
    return (ac.num_transforms if num_transforms is None else num_transforms,
            ac.seed if seed is None else seed,
            ac.batch_size if batch_size is None else batch_size)

  def _default_transform(self):
    ranges = self.ranges
    return lambda key, x: augment.augment_each(key, x, ranges, scoring=True)

  def _batches(self, x: np.ndarray, batch_size: int):
    return analyze_lib.batches(x, np.zeros(len(x), np.int32), batch_size,
                               self.placement)

  def transformed(self, images, num_transforms: int | None = None,
                  seed: int | None = None, transform=None,
                  batch_size: int | None = None) -> np.ndarray:
    """float [N, num_transforms, H, W, C] in [0, 1]: the transformed copies of `images`
    that `invariance_scores` with the same arguments scores."""
    x = self._images(images)
    num, seed, batch_size = self._scoring(num_transforms, seed, batch_size)
    transform = transform or self._default_transform()
    pre = self._preprocess(x)
    key = jax.random.key(seed)
    # The keys of analysis.score_dataset: batch i, copy c -> fold_in(fold_in(key, i), c).
    move = jax.jit(lambda k, imgs: jnp.stack(
        [transform(jax.random.fold_in(k, c), pre(imgs)) for c in range(num)], axis=1))
    out = []
    for i, batch in enumerate(self._batches(x, batch_size)()):
      moved, valid = analysis.fetch((move(jax.random.fold_in(key, i), batch.images),
                                     batch.valid))
      out.append(moved[valid > 0])
    return np.concatenate(out)

  def invariance_scores(self, images, layers: Sequence[str] | str | None = None,
                        num_transforms: int | None = None, seed: int | None = None,
                        transform: Callable | None = None,
                        batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Per-image invariance scores (Eq. 2), {layer: [N, num_transforms]}.

    The N `images` are the reference set of the score's denominator. Defaults are the
    run's `--mode=analyze` settings (config.analysis: num_transforms, seed, batch_size)
    and its scoring transformations, so the run's test images give the scores of
    analysis/scores.npz. `transform` (key, float images [n, H, W, C]) -> images of the
    same shape replaces them; it should transform each image from its own part of the
    key (as augment.augment_each does) for the scores not to depend on the batching.
    """
    x = self._images(images)
    layers = self._layers(layers, self.layers)
    num, seed, batch_size = self._scoring(num_transforms, seed, batch_size)

    def feature_fn(state, imgs):
      feats = steps_lib.features(state, imgs)
      return {k: feats[k] for k in layers}

    return analysis.score_dataset(
        feature_fn, self._batches(x, batch_size), jax.random.key(seed), num,
        transform or self._default_transform(), preprocess=self._preprocess(x),
        weights=self.state).scores

  def augmented_copies(self, images, copies: int, seed: int = 0) -> np.ndarray:
    """float [K, copies, H, W, C]: `copies` training-style augmentations (the run's
    ranges) of each of the K images, each copy from its own key."""
    x = self._images(images)
    k = len(x)
    pre = self._preprocess(x)
    rep = np.repeat(x, copies, axis=0)
    out = jax.jit(lambda key, imgs: augment.augment_each(key, pre(imgs), self.ranges))(
        jax.random.key(seed), rep)
    return np.asarray(out).reshape(k, copies, *self.image_shape)

  def invariance_loss(self, copies, layers: Sequence[str] | str | None = None,
                      method: str | None = None, batch_size: int = 256,
                      labels=None, denominator: str = "batch") -> dict[str, float]:
    """L_inv (Eq. 3) of each layer over a batch of copies [K, M, H, W, C] (M copies of
    each of K seed images, e.g. from `augmented_copies`), eval mode. `layers` defaults
    to the sown layers (those of the training loss), `method` to config.loss_method.
    `denominator` is "batch" (every pair, the paper's text) whatever the run trained
    with, so that runs compare alike; "class" (same-class pairs, the authors' code)
    needs the seeds' `labels` [K]."""
    c = np.asarray(copies)
    if c.ndim != 5 or c.shape[1] < 2 or c.shape[0] * c.shape[1] < 2:
      raise ValueError(f"copies of shape {c.shape}: give [K, M, H, W, C] with M >= 2 "
                       "copies of each of K seed images.")
    k, m = c.shape[:2]
    if denominator not in losses.DENOMINATORS:
      raise ValueError(f"denominator={denominator!r}: give one of "
                       f"{list(losses.DENOMINATORS)}.")
    seed_classes = None
    if denominator == "class":
      if labels is None or np.shape(labels) != (k,):
        raise ValueError(f"the class denominator needs labels=[{k}], the class of each "
                         f"seed image, got {None if labels is None else np.shape(labels)}.")
      seed_classes = jnp.asarray(labels, jnp.int32)
    layers = self._layers(layers, self.layer_shapes)
    acts = self._forward(c.reshape(k * m, *c.shape[2:]), layers, False, batch_size)[0]
    method = method or self.config.loss_method
    inv = jax.jit(lambda feats, sc: losses.grouped_invariance_losses(
        feats, m, method, seed_classes=sc))(acts, seed_classes)
    return {name: float(inv[name]) for name in layers}

  # Export ---------------------------------------------------------------------------

  def export_activations(self, path: str, images,
                         layers: Sequence[str] | str | None = None,
                         batch_size: int = 256) -> str:
    """Writes the activations of `layers` for `images` to `path`: .npz (one array per
    layer) or .h5 / .hdf5 (one dataset per layer; needs h5py). The .npz also holds
    `_workdir`, `_step` and `_layers` (depth order); the HDF5 file holds them as the
    attributes `workdir`, `step` and `layers`."""
    layers = self._layers(layers, self.layers)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npz", ".h5", ".hdf5"):
      raise ValueError(f"export path {path!r}: give a name ending in .npz, .h5 or "
                       ".hdf5.")
    if ext != ".npz":
      try:
        import h5py  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(f"writing {path} needs h5py (pip install h5py); or export "
                          "to .npz.") from e
    acts = self.activations(images, layers, batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"_workdir": os.path.abspath(self.workdir), "_step": self.step,
            "_layers": np.array(layers)}
    if ext == ".npz":
      np.savez(path, **acts, **meta)
    else:
      with h5py.File(path, "w") as f:
        for k, v in acts.items():
          f.create_dataset(k, data=v)
        f.attrs["workdir"], f.attrs["step"] = meta["_workdir"], self.step
        f.attrs["layers"] = layers
    return path


# Loading ---------------------------------------------------------------------------

def _shapes(config, workdir: str, data):
  """(image_shape, num_classes, data or None) from the config or else the data."""
  shape, classes = tuple(config.image_shape), config.num_classes
  if shape and classes and data is None:
    return shape, classes, None
  if data is None:
    try:
      data = input_pipeline.load(config)
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f"the config of {workdir} sets no image_shape and num_classes, and its data "
          f"set {config.dataset!r} does not load here ({type(e).__name__}: {e}); pass "
          "data=input_pipeline.Dataset(...) of the same data to load_run.") from e
  return tuple(data.image_shape), data.num_classes, data


def load_run(workdir: str, step: int | None = None,
             data: input_pipeline.Dataset | None = None,
             dataset: str | None = None) -> LoadedRun:
  """The run in `workdir` at checkpoint `step` (default: the latest).

  Reads WORKDIR/config.json (the config the run was trained with), builds its model
  and restores the checkpoint onto this machine's devices (replicated), whatever
  devices and processes wrote it. A directory without checkpoints but with a
  weights.npz (a run record, `invjax.records`) loads those final weights. Writes
  nothing into the workdir. `data` (optional) is the run's data set, where it cannot
  be loaded from the config here; `dataset` replaces the config's data path (a record
  made on another machine names that machine's).
  """
  workdir = os.fspath(workdir)
  if not os.path.exists(os.path.join(workdir, workdirs.CONFIG_FILE)):
    raise FileNotFoundError(f"{workdir} holds no run (no {workdirs.CONFIG_FILE}): "
                            f"{_train_hint(workdir)}.")
  config = workdirs.load_config(workdir)
  if dataset is not None:
    with config.unlocked():
      config.dataset = dataset
  weights = os.path.join(workdir, workdirs.WEIGHTS_FILE)
  if not workdirs.has_checkpoint(workdir) and os.path.exists(weights):
    return _from_weights(config, workdir, weights, step, data)
  return _from_checkpoint(config, workdir, step, data)


def _model_and_optimizer(config, workdir, data):
  """(model, optimizer, image_shape, num_classes, data or None) of the run's config."""
  image_shape, num_classes, data = _shapes(config, workdir, data)
  model = build_lib.create_model(config, num_classes)
  tx = steps_lib.create_optimizer(
      steps_lib.create_learning_rate_fn(config.learning_rate, config.lr_boundaries,
                                        config.lr_decay, 1),
      config.momentum, config.nesterov)
  return model, tx, image_shape, num_classes, data


def _from_weights(config, workdir: str, weights: str, step: int | None, data):
  """The run's final weights (weights.npz: no optimizer state) in an initial state."""
  model, tx, image_shape, _, data = _model_and_optimizer(config, workdir, data)
  placement = placement_lib.Placement.create()
  # Replicated whole, as a restored checkpoint is (LoadedRun.state).
  state = placement.replicate(
      steps_lib.create_train_state(jax.random.key(0), model, image_shape, tx))
  state, saved = analyze_lib.with_weights(state, placement, weights, config.model)
  if step is not None and step != saved:
    raise ValueError(f"{workdir} holds the weights of step {saved} only (its "
                     f"{workdirs.WEIGHTS_FILE}, no checkpoints): load_run({workdir!r}).")
  return LoadedRun(workdir, int(saved), config, model, state, image_shape,
                   models.layer_shapes(model, image_shape), placement, data)


def _from_checkpoint(config, workdir: str, step: int | None, data):
  """The run's checkpoint of `step` (default: the latest)."""
  directory = os.path.join(workdir, workdirs.CHECKPOINTS_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir} has no checkpoints/ yet: {_train_hint(workdir)}.")
  ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
  try:
    saved = sorted(ckpts.manager.all_steps())
    if not saved:
      raise FileNotFoundError(f"{directory} holds no checkpoint: "
                              f"{_train_hint(workdir)}.")
    if step is None:
      step = saved[-1]
    elif step not in saved:
      raise ValueError(f"{workdir} has no checkpoint of step {step}; its checkpoints "
                       f"are of steps {saved}: load_run({workdir!r}, step=one of them).")
    model, tx, image_shape, num_classes, data = _model_and_optimizer(config, workdir,
                                                                     data)
    placement = placement_lib.Placement.create()
    target = steps_lib.train_state_shapes(model, image_shape, tx, placement.replicated)
    try:
      state = ckpts.restore(target, step)
    except Exception as e:  # pylint: disable=broad-except
      others = [s for s in saved if s != step]
      raise ValueError(
          f"checkpoint {step} in {directory} does not restore into the model of "
          f"{os.path.join(workdir, workdirs.CONFIG_FILE)} ({config.model.name}, "
          f"{num_classes} classes, images {image_shape}): {type(e).__name__}: "
          f"{str(e)[:300]}. If the checkpoint is damaged, load another "
          f"(step=one of {others}); if config.json was edited, restore it."
      ) from e
  finally:
    ckpts.close()
  return LoadedRun(workdir, int(step), config, model, state, image_shape,
                   models.layer_shapes(model, image_shape), placement, data)


def compare(run_a: LoadedRun, run_b: LoadedRun, images,
            layers_a: Sequence[str] | None = None, layers_b: Sequence[str] | None = None,
            measure: str = "cka", batch_size: int = 256):
  """(matrix [len(layers_a), len(layers_b)], layers_a, layers_b): the similarity
  (linear "cka" or "rsa") of every layer of run_a with every layer of run_b on the
  same images (run_b may be run_a). Defaults: the sown layers."""
  layers_a = run_a._layers(layers_a, run_a.layer_shapes)  # pylint: disable=protected-access
  layers_b = run_b._layers(layers_b, run_b.layer_shapes)  # pylint: disable=protected-access
  acts_a = run_a.activations(images, layers_a, batch_size)
  acts_b = acts_a if run_b is run_a and layers_b == layers_a else run_b.activations(
      images, layers_b, batch_size)
  return similarity_matrix(acts_a, acts_b, measure), layers_a, layers_b
