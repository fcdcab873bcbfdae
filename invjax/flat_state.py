"""The train state as vectors: the optimizer's flat layout and the step loop's.

Two layouts of one train state (`steps.TrainState`), the same numbers:
  - the optimizer's (`steps.create_optimizer`): for a model of few parameter tensors,
    SGD's momentum is one vector of every parameter; checkpoints keep it per parameter
    (`opt_state_per_param`, `opt_state_flat`);
  - the step loop's (`flat_parameters`): the parameters and the momentum one vector
    each, on a GPU every convolution kernel output axis first (cuDNN's filter layout,
    `filters_out_first`). On a GPU a run keeps its state in it between programs
    (`enter_and_leave`, `programs.TrainPrograms.enter` and `leave`).
On a TPU neither: there the vectors cost copies of every kernel and gradient, and
save nothing (`vector_in_loop`).

Pure JAX: no TensorFlow, tfds, clu or orbax.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import jax
import jax.flatten_util
import jax.numpy as jnp

from invjax import placement


# The optimizer's flat layout ----------------------------------------------------------

def opt_state_per_param(opt_state, params):
  """The optimizer state with each vector of every parameter (the flat layout of
  `steps.create_optimizer`) unraveled into the parameters' tree: the layout checkpoints
  keep, which optax.sgd itself has (checkpoints written before the flat update
  restore).
  Arrays in, arrays out (jax.eval_shape gives the layout of shapes)."""
  n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  _, unravel = jax.flatten_util.ravel_pytree(params)
  is_flat = lambda a: getattr(a, "shape", None) == (n,) and n > 1
  return jax.tree.map(lambda a: unravel(a) if is_flat(a) else a, opt_state)


def opt_state_flat(opt_state, params):
  """`opt_state_per_param` undone: every subtree shaped like the parameters raveled."""
  shape = jax.tree.structure(params)
  like = lambda t: jax.tree.structure(t) == shape
  return jax.tree.map(lambda t: jax.flatten_util.ravel_pytree(t)[0] if like(t) else t,
                      opt_state, is_leaf=like)


# The step loop's layout ---------------------------------------------------------------

# A convolution kernel's axes (H, W, in, out) -> (out, H, W, in), and back: the filter
# layout of cuDNN's NHWC convolutions, which XLA:GPU otherwise transposes to and from.
_OUT_FIRST, _OUT_LAST = (3, 0, 1, 2), (1, 2, 3, 0)


def vector_in_loop(platform: str) -> bool:
  """Whether the step loop keeps the parameters and the optimizer's buffers as one
  vector each on `platform` (`flat_parameters`, and the optimizer's flat layout,
  `steps.create_optimizer`): everywhere but on a TPU. A GPU launches a kernel per
  tensor for a per-tensor update, hence the vector. A TPU launches nothing from the
  host inside a program, and stores an array's two minor axes in tiles: there every
  convolution kernel is a copy out of the vector in the forward pass and its gradient
  one into it in the backward. Compiled for 8 v5e chips without them
  (`experiments/tpu_compile.py`), WRN-28-10's step relaid 438 MB a chip that way
  (3 x its 146 MB of float32 parameters); per parameter, none."""
  return platform != "tpu"


def filters_out_first(platform: str) -> bool:
  """Whether the step loop's vector keeps each convolution kernel with its output axis
  first on `platform`: on a GPU. A filter gradient then goes into the vector as cuDNN
  wrote it, where in the parameters' own layout XLA transposes each one at every step.
  Compiled for an H200 without one (bfloat16, kernels a step): All-CNN-C 133 -> 124,
  WRN-28-10 358 -> 327, DenseNet-BC-100 1,232 -> 1,132. The state goes in and out
  of that layout once a run and at checkpoints (`enter_and_leave`), not in the training
  programs."""
  return placement.is_gpu(platform)


def _filters(tree, axes):
  return jax.tree.map(lambda a: jnp.transpose(a, axes) if a.ndim == 4 else a, tree)


def flat_parameters(state, out_first: bool = False) -> tuple[Any, Callable]:
  """(the state with its parameters, and its optimizer's per-parameter buffers, each in
  one vector; the function that gives the state back as it was), for a loop of steps.

  Inside the step loop the update is then one elementwise pass over one vector in
  place, where per tensor it is a kernel per tensor: XLA batches small kernels
  (horizontal fusion) on a program's entry computation only, not inside its loops.
  DenseNet-BC-100's step (299 tensors, compiled for an H200 without one) launched
  1,218 kernels against 1,422, and 1 outside its loop against 397. The model sees
  the parameters' tree (`apply_fn` unravels the vector); the gradient is the
  vector's; the SGD arithmetic is the same on the same numbers, in any order.
  `out_first`: every 4-D parameter (a convolution's kernel) lies in the vector with
  its output axis first (`filters_out_first`)."""
  to_loop = (lambda t: _filters(t, _OUT_FIRST)) if out_first else (lambda t: t)
  from_loop = (lambda t: _filters(t, _OUT_LAST)) if out_first else (lambda t: t)
  loop_tree = to_loop(state.params)
  flat = jax.flatten_util.ravel_pytree(loop_tree)[0]
  apply_flat = _ApplyFlat(state.apply_fn, jax.tree.structure(loop_tree),
                          tuple((a.shape, a.dtype) for a in jax.tree.leaves(loop_tree)),
                          out_first)
  # A dict of one vector, not the bare vector: flax's apply_gradients looks into it.
  params = {"vector": flat}
  apply_fn = state.apply_fn
  # The optimizer state: every per-parameter tree in the loop's layout and raveled
  # (a flat layout keeps its vectors where the loop's is the parameters' own), its
  # leaves then in the layout the optimizer makes for one vector.
  params_def = jax.tree.structure(state.params)
  like_params = lambda t: jax.tree.structure(t) == params_def
  in_loop = lambda t, f: jax.tree.map(lambda u: f(u) if like_params(u) else u, t,
                                      is_leaf=like_params)
  raveled = opt_state_flat(state.opt_state, state.params)
  was_flat = jax.tree.structure(raveled) == jax.tree.structure(state.opt_state)
  if out_first:
    raveled = opt_state_flat(in_loop(opt_state_per_param(state.opt_state, state.params),
                                     to_loop), state.params)
  raveled_def = jax.tree.structure(raveled)
  wanted = jax.eval_shape(state.tx.init, params)
  shapes = lambda t: [(a.shape, a.dtype) for a in jax.tree.leaves(t)]
  if shapes(wanted) != shapes(raveled):  # an optimizer not elementwise: as it is
    return state, lambda s: s

  def back(s):
    loop_tree = apply_flat.loop_tree(s.params["vector"])
    tree = from_loop(loop_tree)
    opt = jax.tree.unflatten(raveled_def, jax.tree.leaves(s.opt_state))
    if out_first or not was_flat:  # each vector back in the layout the state had
      opt = in_loop(opt_state_per_param(opt, loop_tree), from_loop)
      opt = opt_state_flat(opt, tree) if was_flat else opt
    return s.replace(params=tree, apply_fn=apply_fn, opt_state=opt)

  opt_state = jax.tree.unflatten(jax.tree.structure(wanted), jax.tree.leaves(raveled))
  return state.replace(params=params, opt_state=opt_state, apply_fn=apply_flat), back


@dataclasses.dataclass(frozen=True)
class _ApplyFlat:
  """The `apply_fn` of a state in the loop's layout: unravels the vector into the
  parameters' tree (in their own layout), then applies the model. A value, compared
  by its fields (a state's tree structure holds it), so that states put into the
  loop's layout by separate traces fit the same compiled programs."""
  apply_fn: Callable
  tree: Any  # the tree structure of the parameters in the loop's layout
  leaves: tuple  # (shape, dtype) of each of its leaves, in order
  out_first: bool

  def loop_tree(self, vector: jax.Array):
    """The vector as the parameters' tree in the loop's layout (kernels output axis
    first where `out_first`)."""
    # One split, as jax.flatten_util.ravel_pytree's unravel (XLA groups the slices of
    # a split into fewer kernels than slices taken one by one: 1 fewer for All-CNN-C).
    ends = list(itertools.accumulate(math.prod(shape) for shape, _ in self.leaves))
    pieces = jnp.split(vector, ends[:-1])
    return jax.tree.unflatten(self.tree, [
        piece.reshape(shape).astype(dtype)
        for piece, (shape, dtype) in zip(pieces, self.leaves)])

  def unravel(self, vector: jax.Array):
    """The vector as the parameters' tree in their own layout."""
    tree = self.loop_tree(vector)
    return _filters(tree, _OUT_LAST) if self.out_first else tree

  def __call__(self, variables, *args, **kwargs):
    return self.apply_fn({**variables, "params": self.unravel(
        variables["params"]["vector"])}, *args, **kwargs)


def enter_and_leave(state, platform: str) -> tuple[Callable, Callable]:
  """(enter, leave): functions of arrays (jit them) that put a train state shaped like
  `state` (arrays or ShapeDtypeStructs) into the step loop's layout on `platform`
  (`flat_parameters`, `filters_out_first`; on a TPU the parameters' own,
  `vector_in_loop`) and take it back out, bit for bit.

  A run keeps its state in the loop's layout between programs (`make_train_chunk`
  with loop_state=True), so that no training program converts it: on a GPU the
  conversion is a transpose per convolution kernel and per momentum buffer and a
  copy per tensor, each way (DenseNet-BC-100: 810 kernels a program). The state in
  that layout serves every eval-mode forward pass as it is (its `apply_fn` unravels
  the vector); checkpoints and weights take it back out."""
  if not vector_in_loop(platform):  # the parameters' own layout: nothing to convert
    return (lambda s: s), (lambda s: s)
  out_first = filters_out_first(platform)
  leave = []
  jax.eval_shape(lambda s: leave.append(flat_parameters(s, out_first)[1]), state)
  return (lambda s: flat_parameters(s, out_first)[0]), leave[0]


def platform_of(sharding) -> str:
  """The platform of `sharding`'s devices (JAX's default backend without one)."""
  if sharding is None:
    return jax.default_backend()
  return next(iter(sharding.device_set)).platform
