"""The paper's augmentation scheme (Appendix A, Table 2), per example, on device.

Images are float32 in [0, 1], HWC. Each image gets its own parameters:

  flip f = +-1, translation t_x, t_y (fraction of the image size), scale z_x, z_y,
  rotation theta, shear phi, contrast gamma, brightness delta.

The affine part is one warp about the image centre with the forward matrix

  A = [[f * z_x * cos(theta), -f * z_y * sin(theta + phi), f * t_x * W],
       [    z_x * sin(theta),      z_y * cos(theta + phi),     t_y * H]]

in (x right, y down) pixel coordinates centred on the image: a point p of the input lands
on A p of the output. The flip f multiplies the whole first row: the warped image is
mirrored (x -> -x about the centre), as the authors' code mirrors after its warp. The
matrix as FACTS.md gives it has f on the first entry alone, which is a mirror only
without rotation: with a rotation theta its determinant is -z_x z_y cos(2 theta + phi),
so a flipped copy was also squeezed and sheared (invjax before SCORING_VERSION 3).

The warp pulls (output coordinate -> input coordinate): output pixel
(i, j) (row, column) takes the input at the inverse of A in (y, x) order (`pull_matrix`),
bilinearly interpolated from its 4 neighbours with all channels at once, coordinates
outside the image clamped to its edge (`warp`). It is the arithmetic of dm-pix's
`affine_transform(order=1, mode="nearest")`, which it replaced: given an (h, w, c) image
that one interpolates in three dimensions, 8 corners per output value with the
coordinates computed for every channel, although the channel coordinate is always a whole
number (half its corners weigh 0); the tests hold `warp` to it (`pull_matrix_hwc` is the
same warp as dm-pix's 3x4 matrix).

Then contrast `gamma * (x - mean) + mean` (mean per image and channel), brightness
`x + delta`, and clipping to [0, 1]. Training may also cut out a square (`cutout`, off in
the paper's scheme): a side of `cutout` x the shorter image side, centred anywhere in the
image (so it may be cut off by the border), filled with the image's mean colour.

Training draws each parameter from a normal centred on its range with standard deviation
(max - min) / 4, truncated to the range; the scoring transformations (Eq. 2) take, for each
parameter, one of the two extremes of the halved range at random.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentRanges:
  """Half-widths of the parameter ranges (each range is centre +- half-width).

  Defaults are the paper's (FACTS.md). A half-width of 0 turns a transformation off;
  `flip` is the probability of a horizontal flip.
  """
  flip: float = 0.5
  translate: float = 0.1  # fraction of the image size
  scale: float = 0.15  # z in [1 - scale, 1 + scale], x and y independent
  rotation: float = 22.5  # degrees
  shear: float = 0.15  # radians
  contrast: float = 0.5  # gamma in [1 - contrast, 1 + contrast]
  brightness: float = 0.25  # delta in [-brightness, brightness]
  cutout: float = 0.0  # side of the cut-out square / the shorter side (training only)

  @classmethod
  def from_config(cls, cfg) -> "AugmentRanges":
    """From a mapping (e.g. an ml_collections ConfigDict) with some of the fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg.keys()) - names)
    if unknown:
      raise ValueError(
          f"config.augment has unknown field(s) {unknown}; valid fields are "
          f"{sorted(names)}.")
    return cls(**{k: float(cfg[k]) for k in cfg.keys()})

  def halved(self) -> "AugmentRanges":
    """The scoring ranges: every half-width halved (the flip probability is kept; no
    cutout: the scoring transformations are the paper's)."""
    return dataclasses.replace(
        self, translate=self.translate / 2, scale=self.scale / 2,
        rotation=self.rotation / 2, shear=self.shear / 2,
        contrast=self.contrast / 2, brightness=self.brightness / 2, cutout=0.0)


# Named augmentation schemes (the authors' code has these three), chosen with
# config_lib.apply_variant, e.g. --config=configs/allcnn.py:invariance,light.
PRESETS = {
    # The paper's scheme (Table 2, Appendix A): affine, contrast and brightness.
    "heavier": AugmentRanges(),
    # Horizontal flips and translations of up to 10 % of the image size only.
    "light": AugmentRanges(flip=0.5, translate=0.1, scale=0.0, rotation=0.0, shear=0.0,
                           contrast=0.0, brightness=0.0),
    # "light" plus a square of half the image side cut out of every training image.
    "cutout": AugmentRanges(flip=0.5, translate=0.1, scale=0.0, rotation=0.0, shear=0.0,
                            contrast=0.0, brightness=0.0, cutout=0.5),
}


class AugmentParams(NamedTuple):
  """Per-image parameters, each of shape [N]."""
  flip: jax.Array  # +1 (keep) or -1 (mirror)
  tx: jax.Array  # translation, fraction of the width
  ty: jax.Array  # translation, fraction of the height
  zx: jax.Array
  zy: jax.Array
  theta: jax.Array  # rotation, radians
  phi: jax.Array  # shear, radians
  gamma: jax.Array  # contrast factor
  delta: jax.Array  # brightness offset
  cut: jax.Array  # side of the cut-out square / the shorter side (0: none)
  cy: jax.Array  # its centre, fraction of the height
  cx: jax.Array  # its centre, fraction of the width

  @classmethod
  def identity(cls, n: int) -> "AugmentParams":
    zeros, ones = jnp.zeros((n,)), jnp.ones((n,))
    return cls(flip=ones, tx=zeros, ty=zeros, zx=ones, zy=ones, theta=zeros,
               phi=zeros, gamma=ones, delta=zeros, cut=zeros, cy=ones / 2, cx=ones / 2)


def _centres_and_half_widths(r: AugmentRanges):
  # Order matches AugmentParams after `flip`.
  centres = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0)
  halves = (r.translate, r.translate, r.scale, r.scale, math.radians(r.rotation),
            r.shear, r.contrast, r.brightness)
  return centres, halves


def sample_params(key: jax.Array, n: int, ranges: AugmentRanges) -> AugmentParams:
  """Training parameters: truncated normals (range = +-2 sigma), Bernoulli flip."""
  flip_key, key = jax.random.split(key)
  flip = jnp.where(jax.random.bernoulli(flip_key, ranges.flip, (n,)), -1.0, 1.0)
  centres, halves = _centres_and_half_widths(ranges)
  # std = (max - min) / 4 = half / 2, truncated at +-2 std = the range.
  z = jax.random.truncated_normal(key, -2.0, 2.0, (len(centres), n), jnp.float32)
  values = [c + (h / 2.0) * z[i] for i, (c, h) in enumerate(zip(centres, halves))]
  # From a key of its own, so that the other parameters' draws do not depend on it;
  # drawn only where there is a square to cut (on a GPU each draw is a kernel).
  if ranges.cutout > 0:
    cy, cx = jax.random.uniform(jax.random.fold_in(flip_key, 1), (2, n))
  else:
    cy = cx = jnp.full((n,), 0.5, jnp.float32)
  return AugmentParams(flip, *values, jnp.full((n,), ranges.cutout, jnp.float32), cy, cx)


def sample_scoring_params(key: jax.Array, n: int,
                          ranges: AugmentRanges) -> AugmentParams:
  """Scoring parameters: each at one extreme of the halved range, sign at random."""
  r = ranges.halved()
  flip_key, key = jax.random.split(key)
  flip = jnp.where(jax.random.bernoulli(flip_key, r.flip, (n,)), -1.0, 1.0)
  centres, halves = _centres_and_half_widths(r)
  signs = jnp.where(jax.random.bernoulli(key, 0.5, (len(centres), n)), 1.0, -1.0)
  values = [c + h * signs[i] for i, (c, h) in enumerate(zip(centres, halves))]
  none = AugmentParams.identity(n)
  return AugmentParams(flip, *values, none.cut, none.cy, none.cx)


def forward_matrix(p: AugmentParams, height: int, width: int) -> jax.Array:
  """The forward affine matrices [N, 2, 3] in centred (x, y) pixel coordinates."""
  row0 = jnp.stack([p.zx * jnp.cos(p.theta), -p.zy * jnp.sin(p.theta + p.phi),
                    p.tx * width], axis=-1)
  row0 = p.flip[..., None] * row0  # f mirrors the warped image
  row1 = jnp.stack([p.zx * jnp.sin(p.theta), p.zy * jnp.cos(p.theta + p.phi),
                    p.ty * height], axis=-1)
  return jnp.stack([row0, row1], axis=-2)


def pull_matrix(forward: jax.Array, height: int, width: int) -> jax.Array:
  """The pull matrices [..., 2, 3] in (y, x) order of forward warps [..., 2, 3].

  Output pixel (i, j) (row, column) samples the input at (y, x) = P[:, :2] (i, j) + P[:, 2],
  which is c + L^-1 ((j, i) - c - t) put in (y, x) order, with c the centre, L the linear
  part and t the translation of the forward matrix. L^-1 in closed form (L is 2 x 2), so
  that it fuses with the rest instead of a batched LU decomposition.
  """
  a, b, t_x = forward[..., 0, 0], forward[..., 0, 1], forward[..., 0, 2]
  c, d, t_y = forward[..., 1, 0], forward[..., 1, 1], forward[..., 1, 2]
  det = a * d - b * c
  # L^-1 = [[d, -b], [-c, a]] / det in (x, y) order; in (y, x) order its rows and
  # columns swap: [[a, -c], [-b, d]] / det.
  yy, yx, xy, xx = a / det, -c / det, -b / det, d / det
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  off_y = cy - (yy * (cy + t_y) + yx * (cx + t_x))
  off_x = cx - (xy * (cy + t_y) + xx * (cx + t_x))
  return jnp.stack([jnp.stack([yy, yx, off_y], axis=-1),
                    jnp.stack([xy, xx, off_x], axis=-1)], axis=-2)


def pull_matrix_hwc(forward: jax.Array, height: int, width: int) -> jax.Array:
  """`pull_matrix` as dm-pix's 3x4 matrix over (h, w, c) (the channel axis left alone):
  `pix.affine_transform(image, pull_matrix_hwc(...), order=1, mode="nearest")` is `warp`
  of one image (`dm_pix_warp`)."""
  return _hwc(pull_matrix(forward, height, width))


def _hwc(pull: jax.Array) -> jax.Array:
  """Pull matrices [..., 2, 3] ((y, x) order) as dm-pix's [..., 3, 4] over (h, w, c)."""
  m = jnp.zeros((*pull.shape[:-2], 3, 4), pull.dtype)
  return m.at[..., :2, :2].set(pull[..., :2]).at[..., :2, 3].set(pull[..., 2]).at[
      ..., 2, 2].set(1.0)


def dm_pix_warp(images: jax.Array, pull: jax.Array) -> jax.Array:
  """`warp`'s contract by dm-pix's `affine_transform` of each image (order 1, mode
  "nearest"): the three-dimensional interpolation `warp` replaced, the reference the
  tests hold it to and `experiments.augment_cost` times it against."""
  return jax.vmap(lambda x, m: pix.affine_transform(x, m, order=1, mode="nearest"))(
      images, _hwc(pull.astype(jnp.float32)))


def warp(images: jax.Array, pull: jax.Array) -> jax.Array:
  """Bilinear affine warp of a batch [N, H, W, C] by pull matrices [N, 2, 3] ((y, x) order,
  `pull_matrix`); output in the images' dtype, interpolated in float32.

  Per output pixel the source (y, x) is computed once and its 4 neighbours are gathered
  with all C channels each. Edges as dm-pix's mode "nearest": the corners are
  floor and ceil of the coordinate, weighted by its distance from the floor, and then
  clamped into the image, so a point outside takes the edge's value.
  """
  n, h, w, c = images.shape
  p = pull.astype(jnp.float32)[:, :, :, None, None]  # [N, 2, 3, 1, 1]
  rows = jnp.arange(h, dtype=jnp.float32)[:, None]
  cols = jnp.arange(w, dtype=jnp.float32)[None, :]
  sy = p[:, 0, 0] * rows + p[:, 0, 1] * cols + p[:, 0, 2]  # [N, H, W]
  sx = p[:, 1, 0] * rows + p[:, 1, 1] * cols + p[:, 1, 2]

  def corners(s, size):
    lower = jnp.floor(s)
    weight = s - lower
    lo = jnp.clip(lower.astype(jnp.int32), 0, size - 1)
    hi = jnp.clip(jnp.ceil(s).astype(jnp.int32), 0, size - 1)
    return lo, hi, weight

  y0, y1, wy = corners(sy, h)
  x0, x1, wx = corners(sx, w)
  # Each image's pixels as rows [H * W, C]; per corner one gather of C channels a pixel,
  # batched over the images (a gather with a batch dimension, so that with the batch
  # sharded over devices each device gathers from its own images). Four gathers, not
  # one of the four stacked: each fuses into the weighted sum, nothing [4, N, H, W, C]
  # is written.
  pixels = images.reshape(n, h * w, c)
  gather = jax.vmap(lambda x, i: x[i])
  v = [gather(pixels, i).astype(jnp.float32)  # [N, H, W, C]
       for i in (y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1)]
  wy, wx = wy[..., None], wx[..., None]
  out = ((1 - wy) * (1 - wx) * v[0] + (1 - wy) * wx * v[1]
         + wy * (1 - wx) * v[2] + wy * wx * v[3])
  return out.astype(images.dtype)


def apply(images: jax.Array, params: AugmentParams, cutout: bool = True) -> jax.Array:
  """Augments a batch [N, H, W, C] in [0, 1] with per-image parameters. `cutout=False`
  leaves the cut-out out of the program, for parameters whose squares are all empty
  (`params.cut` 0): the same images without computing each image's mean colour (on a
  GPU, a reduction kernel a step)."""
  _, h, w, _ = images.shape
  warped = warp(images, pull_matrix(forward_matrix(params, h, w), h, w))

  def one(out, gamma, delta, cut, cy, cx):
    out = pix.adjust_contrast(out, gamma)
    out = pix.adjust_brightness(out, delta)
    out = jnp.clip(out, 0.0, 1.0)
    if not cutout:
      return out
    # Cutout: rows top .. top + side - 1 and the same for columns, clipped by the
    # border; an empty square (side 0) leaves the image exactly as it is.
    side = jnp.round(cut * min(h, w))
    top, left = jnp.round(cy * h - side / 2), jnp.round(cx * w - side / 2)
    rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
    inside = ((rows >= top) & (rows < top + side) & (cols >= left) &
              (cols < left + side))
    return jnp.where(inside, jnp.mean(out, axis=(0, 1)), out)

  return jax.vmap(one)(warped, params.gamma, params.delta, params.cut, params.cy,
                       params.cx)


def augment(key: jax.Array, images: jax.Array, ranges: AugmentRanges,
            scoring: bool = False) -> jax.Array:
  """Draws per-image parameters and applies them."""
  sampler = sample_scoring_params if scoring else sample_params
  return apply(images, sampler(key, images.shape[0], ranges),
               cutout=not scoring and ranges.cutout > 0)


def augment_each(key: jax.Array, images: jax.Array, ranges: AugmentRanges,
                 scoring: bool = False) -> jax.Array:
  """Like `augment`, but image i's parameters come from split(key, n)[i] alone, which
  is the same for any n > i: padding a batch, or splitting it over another number of
  devices, leaves the transformations of its images unchanged."""
  return augment_with_keys(jax.random.split(key, images.shape[0]), images, ranges,
                           scoring)


def augment_with_keys(keys: jax.Array, images: jax.Array, ranges: AugmentRanges,
                      scoring: bool = False) -> jax.Array:
  """Like `augment`, image i's parameters drawn from keys[i] alone ([N] keys)."""
  sampler = sample_scoring_params if scoring else sample_params
  params = jax.vmap(lambda k: sampler(k, 1, ranges))(keys)
  return apply(images, jax.tree.map(lambda a: a[:, 0], params),
               cutout=not scoring and ranges.cutout > 0)
