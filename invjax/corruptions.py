"""Common corruptions of a test set (CIFAR-10-C's 15 corruptions x 5 severities).

Two sources, the same images' corrupted versions in the same order as the test set:

- "official": CIFAR-10-C as tensorflow-datasets ships it (`cifar10_corrupted/<name>_<s>`),
  for runs on CIFAR-10. tfds prepares it on first use where there is a network (2.9 GB);
  `--config.data_dir` points at a prepared copy.
- "generated": made here from any test set by the corrupt-tta library (ImageNet-C's
  corruption functions, modernised; `pip install corrupt-tta`). Its severities are
  ImageNet-C's, tuned for 224-pixel images, so on 32-pixel images they are not
  CIFAR-10-C's: compare generated results with generated results only. The draws are
  seeded, so a set is the same every time.

Corrupted images are uint8, used exactly as read (or as generated and rounded once to
uint8, as CIFAR-10-C is stored): no re-normalisation. This module is shell: it imports
tfds or corrupt-tta only when asked.
"""

from __future__ import annotations

import numpy as np

# CIFAR-10-C's corruptions, in its order (noise, blur, weather, digital).
NAMES = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
         "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
         "elastic_transform", "pixelate", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
SOURCES = ("auto", "official", "generated")


def parse(names: str | list[str], severities) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """("all" | "none" | names, severities) checked -> (names, severities)."""
  if isinstance(names, str):
    names = [n for n in names.split(",") if n]
  names = list(names)
  if names == ["none"] or not names:
    names = []
  elif names == ["all"]:
    names = list(NAMES)
  unknown = sorted(set(names) - set(NAMES))
  if unknown:
    raise ValueError(f"corruptions {unknown} are unknown; valid are 'all', 'none' or "
                     f"names from {list(NAMES)}.")
  try:
    sev = tuple(int(s) for s in severities)
  except (TypeError, ValueError) as e:
    raise ValueError(f"severities {severities!r} must be integers in 1..5.") from e
  if any(s not in SEVERITIES for s in sev) or (names and not sev):
    raise ValueError(f"severities {list(sev)} must be one or more of {list(SEVERITIES)}.")
  return tuple(names), sev


def official(name: str, severity: int, data_dir: str | None = None,
             count: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 32, 32, 3], labels) of CIFAR-10-C's `name` at `severity`, in
  the order of CIFAR-10's test set (the first `count`; 0 = all 10,000)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("CIFAR-10-C is read with tensorflow-datasets, which needs "
                      "TensorFlow; without it use --robustness_corruption_source="
                      "generated.") from e
  tf.config.set_visible_devices([], "GPU")
  builder = tfds.builder(f"cifar10_corrupted/{name}_{severity}", data_dir=data_dir)
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"CIFAR-10-C ({builder.name}/{name}_{severity}) is not prepared in "
        f"{builder.data_dir} and could not be downloaded ({type(e).__name__}: "
        f"{str(e)[:200]}). Prepare it where there is a network and point "
        "--config.data_dir at it, or use --robustness_corruption_source=generated."
        ) from e
  split = "test" if not count else f"test[:{count}]"
  ds = builder.as_dataset(split=split, as_supervised=True, batch_size=10_000,
                          shuffle_files=False)
  parts = list(tfds.as_numpy(ds))
  return (np.concatenate([p[0] for p in parts]).astype(np.uint8),
          np.concatenate([p[1] for p in parts]).astype(np.int32))


def generated(images: np.ndarray, name: str, severity: int,
              seed: int = 0) -> np.ndarray:
  """`images` uint8 [N, H, W, C] corrupted by corrupt-tta's `name` at `severity`,
  rounded to uint8. Seeded by (seed, name, severity): the same set every time."""
  try:
    import corrupt_tta  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("generated corruptions need the corrupt-tta library: "
                      "pip install corrupt-tta (or pip install -e '.[robustness]').") from e
  if name not in NAMES:
    raise ValueError(f"corruption {name!r} is unknown; valid are {list(NAMES)}.")
  # corrupt-tta draws from numpy's global generator: seed it, and restore it after.
  # Its impulse noise is scikit-image's random_noise, which draws from a generator of
  # its own, unseeded unless given `rng`: give it one drawn from the seeded global
  # generator, or that corruption differs on every call.
  saved = np.random.get_state()
  np.random.seed((seed * 1000 + NAMES.index(name) * 10 + severity) % 2**32)
  module = getattr(corrupt_tta, "corruptions", None)
  noise = getattr(module, "random_noise", None)
  if noise is not None:
    module.random_noise = lambda *a, **k: noise(
        *a, **{"rng": np.random.randint(2**31 - 1), **k})
  try:
    out = np.empty_like(images)
    for i, image in enumerate(images):
      rgb = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
      moved = np.asarray(corrupt_tta.corrupt(rgb, severity=severity,
                                             corruption_name=name), np.float64)
      moved = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
      out[i] = moved if image.shape[-1] == 3 else moved[..., :1]
  finally:
    np.random.set_state(saved)
    if noise is not None:
      module.random_noise = noise
  return out


def library_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return f"corrupt-tta {metadata.version('corrupt-tta')}"
  except Exception:  # pylint: disable=broad-except
    return "corrupt-tta"


def resolve_source(source: str, dataset: str) -> str:
  """"auto" -> "official" for a run on tfds's CIFAR-10, else "generated"."""
  if source not in SOURCES:
    raise ValueError(f"corruption source {source!r} is unknown; valid are "
                     f"{list(SOURCES)}.")
  if source != "auto":
    return source
  return "official" if dataset == "cifar10" else "generated"


def corrupted_test_set(source: str, name: str, severity: int, x_test: np.ndarray,
                       y_test: np.ndarray, data_dir: str | None = None,
                       seed: int = 0) -> np.ndarray:
  """The corrupted versions of `x_test` (same order) from `source` (resolved)."""
  if source == "official":
    x, y = official(name, severity, data_dir or None, len(x_test))
    if x.shape != x_test.shape or not np.array_equal(y, y_test):
      raise ValueError(
          f"CIFAR-10-C {name}_{severity} does not pair with this test set (shapes "
          f"{x.shape} and {x_test.shape}, or labels in another order): use "
          "--robustness_corruption_source=generated.")
    return x
  return generated(x_test, name, severity, seed)

