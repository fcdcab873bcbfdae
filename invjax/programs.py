"""The training programs of a run, compiled ahead of time, and how to call them."""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from invjax import build as build_lib
from invjax import flat_state
from invjax import placement as placement_lib
from invjax import seed_order
from invjax import steps as steps_lib


def compile_with(program, options: Mapping[str, Any] | None = None,
                 fallback: Mapping[str, Any] | None = None,
                 fell_back: list | None = None, name: str = ""):
  """`program` (lowered) compiled with XLA's compiler `options`; where that fails and
  `fallback` is given (`placement.fallback_compiler_options`: config.gpu_compile's
  options left out, e.g. a convolution fusion cuDNN cannot build), compiled again with
  `fallback`, the log says so and `name` joins `fell_back`."""
  try:
    return program.compile(compiler_options=dict(options) if options else None)
  except Exception as e:  # pylint: disable=broad-except
    if fallback is None or dict(fallback) == dict(options or {}):
      raise
    logging.warning("compiling %s with %s failed (%s); compiling it with XLA's "
                    "defaults instead (config.gpu_compile='xla' skips the first try)",
                    name or "a program", options,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
    compiled = program.compile(compiler_options=dict(fallback) if fallback else None)
    if fell_back is not None:
      fell_back.append(name)
    return compiled


def compile_concurrently(lowered: Mapping[str, Any],
                         options: Mapping[str, Any] | None = None,
                         fallback: Mapping[str, Any] | None = None,
                         fell_back: list | None = None
                         ) -> dict[str, tuple[Any, float]]:
  """{name: (compiled, seconds)} of lowered programs compiled at the same time, each
  in a thread of its own: XLA compiles a program on about one core and lets go of
  Python's lock meanwhile (two of All-CNN-C's training programs compiled for an H200
  without one, on a 2-core CPU: 17.8 s at once against 27.9 s one after the other).
  `options`, `fallback`, `fell_back`: XLA's compiler options for each (`compile_with`)."""
  def one(item):
    name, program = item
    t = time.perf_counter()
    try:
      return name, (compile_with(program, options, fallback, fell_back, str(name)),
                    time.perf_counter() - t)
    except Exception as e:
      raise RuntimeError(f"compiling the {name} program failed: {e}") from e
  if len(lowered) < 2:
    return dict(map(one, lowered.items()))
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    return dict(pool.map(one, lowered.items()))


def as_rows(images: np.ndarray) -> np.ndarray:
  """Images [N, H, W, C] as rows [N, H * W * C] (a view): how the training set is kept
  on the devices (`steps.make_train_chunk`'s `image_shape`)."""
  return images.reshape(len(images), -1)


def unrolled_by_default() -> bool:
  """Whether a program's steps are straight-line code here: on a CPU, where XLA runs a
  step inside a loop about 15 times slower (`steps.make_train_chunk`)."""
  return jax.default_backend() == "cpu"


class TrainPrograms:
  """The run's training programs, compiled ahead of time, and how to call them.

  A program runs S steps (`run.steps_per_dispatch`) in one dispatch; a 1-step
  program fills the gaps up to log, evaluation and checkpoint steps. Both are compiled
  before the first step (`compiled[S]`; `compile_seconds[S]` says how long) and called as
  compiled executables, which refuse arguments of other shapes or shardings rather
  than recompiling: nothing compiles inside the step loop. The S-step program is
  compiled first, alone (on a GPU, XLA times candidate convolution algorithms on the
  device as it compiles; the 1-step program then finds them cached), then the 1-step
  program and the run's other programs (`alongside`: {name: lowered}, e.g. the eval
  step) at the same time (`compile_concurrently`); `wall_seconds` is the whole. Each
  with the mesh's XLA options (`placement.compiler_options`: on one GPU, no
  latency-hiding scheduler, and config.gpu_compile's), XLA's defaults where those fail.

  With the training set on the device (`config.data_on_device`, the default where it
  fits), each step gathers its seeds there from the epoch's permutation; otherwise the
  host gathers each program's batches and sends them.

  Where the steps run in a loop (off a CPU), the programs take and return the state in
  the loop's layout (`flat_state.enter_and_leave`: on a GPU the parameters and
  momentum one vector each, the convolution kernels in cuDNN's layout; on a TPU the
  parameters' own): `enter(state)` puts a train state into it before the first
  program, `leave(loop_state)` takes it back out for a checkpoint or the weights, both
  compiled beside the 1-step program. Elsewhere both are the identity. The eval-mode
  programs (evaluation, probe) read either layout.
  """

  def __init__(self, run: build_lib.Run, placement: placement_lib.Placement, state,
               single: bool = True, compile_now: bool = True,
               alongside: Mapping[str, Any] | None = None,
               unroll: bool | None = None):
    """`single=False` leaves out the 1-step program, for runs whose every stop (log,
    evaluation, checkpoint, end, resume point) is a multiple of steps_per_dispatch.
    `compile_now=False` compiles nothing (for tools that compile `chunk(size)`
    themselves, e.g. vmapped or timed). `alongside`: other lowered programs to compile
    with the 1-step program; compiled, they are in `self.alongside`. `unroll`: the
    steps of a program as straight-line code (default: on a CPU), else a loop whose
    state is kept in the loop's layout between programs."""
    config, data = run.config, run.data
    self.run, self.placement = run, placement
    self.k = config.batch_size // config.copies
    self.steps_per_dispatch = run.steps_per_dispatch
    self.on_device = bool(config.data_on_device)
    if self.on_device and not placement_lib.data_fits_on_device(data):
      logging.warning("the training set (%.1f GB) takes over half of a device's "
                      "memory: the host gathers the batches instead "
                      "(config.data_on_device=False).", data.x_train.nbytes / 1e9)
      self.on_device = False
    self.schedule = seed_order.SeedSchedule(len(data.x_train), self.k,
                                                config.seed, placement.replicated)
    self.aug_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    if self.on_device:  # the images as rows, [N, H * W * C] (`steps.make_train_chunk`)
      self.x_train = placement.replicate(as_rows(data.x_train))
      self.y_train = placement.replicate(data.y_train)
    self.unroll = unrolled_by_default() if unroll is None else unroll
    # (enter, leave) as functions of arrays, not compiled (e.g. to vmap)
    self.layout = ((lambda s: s, lambda s: s) if self.unroll else
                   flat_state.enter_and_leave(state,
                                              flat_state.platform_of(placement.batch)))
    self.compiled, self.compile_seconds, self.alongside = {}, {}, {}
    self.fell_back: list[str] = []  # programs compiled with XLA's defaults instead
    self._converters = {}
    self.wall_seconds = 0.0
    if compile_now:
      self.compile(state, single, alongside)

  def compile(self, state, single: bool = True,
              alongside: Mapping[str, Any] | None = None) -> None:
    """Compiles the S-step program, then the 1-step one (with `single`, where S > 1),
    `enter`, `leave` and `alongside` at once (see the class). `state`: a train state
    (or its shapes) in the parameters' own layout."""
    t = time.perf_counter()
    loop = self.loop_shapes(state)
    self._compile(loop, self.steps_per_dispatch)
    rest = dict(alongside or {})
    if single and self.steps_per_dispatch > 1:
      rest[1] = self._lower(loop, 1)
    if not self.unroll:
      rest["enter"] = self._jit(self.layout[0]).lower(state)
      rest["leave"] = self._jit(self.layout[1]).lower(loop)
    for name, (compiled, seconds) in compile_concurrently(
        rest, self.placement.compiler_options,
        self.placement.fallback_compiler_options, self.fell_back).items():
      if name == 1:
        self.compiled[1], self.compile_seconds[1] = compiled, seconds
      elif name in ("enter", "leave"):
        self._converters[name] = compiled
      else:
        self.alongside[name] = compiled
    self.wall_seconds = time.perf_counter() - t

  def compile_record(self) -> dict[str, Any]:
    """What the run card keeps of how the programs were compiled: config.gpu_compile,
    the XLA options asked for (none off a single GPU) and XLA_FLAGS, and the programs
    that fell back to XLA's defaults."""
    return {"gpu_compile": self.placement.gpu_compile,
            "xla_options": dict(self.placement.compiler_options),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "fell_back": sorted(set(self.fell_back))}

  def _jit(self, fn):
    return jax.jit(fn, out_shardings=self.placement.replicated)

  def loop_shapes(self, state):
    """The shapes (ShapeDtypeStructs, placed) of `state` in the loop's layout: what
    the training programs and, lowered for them, the eval-mode programs take."""
    shapes = jax.eval_shape(self.layout[0], state)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=self.placement.replicated), shapes)

  def enter(self, state):
    """The train state in the loop's layout (the state itself where steps are
    unrolled)."""
    return self._convert("enter", state)

  def leave(self, loop_state):
    """The train state in the parameters' own layout, from the loop's."""
    return self._convert("leave", loop_state)

  def _convert(self, name: str, state):
    """`name` ("enter" or "leave") applied to `state`: self.layout's function of it."""
    if self.unroll:  # nothing to convert: no program, no copy
      return state
    if name not in self._converters:  # not compiled with the programs: jit it once
      self._converters[name] = self._jit(self.layout[("enter", "leave").index(name)])
    return self._converters[name](state)

  def chunk(self, size: int):
    """The training program of `size` steps, not jitted: called with `args` (the state
    in the loop's layout: `enter`)."""
    return steps_lib.make_train_chunk(self.run.step_config, size, self.k,
                                      self.placement.batch, data_on_device=self.on_device,
                                      unroll=self.unroll, loop_state=not self.unroll,
                                      image_shape=self.run.data.image_shape)

  def _lower(self, state, size: int):
    jitted = jax.jit(self.chunk(size), donate_argnums=0,
                     out_shardings=(self.placement.replicated, self.placement.replicated))
    return jitted.lower(*self.args(state, 0, size))

  def _compile(self, state, size: int) -> None:
    t = time.perf_counter()
    self.compiled[size] = compile_with(self._lower(state, size),
                                       self.placement.compiler_options,
                                       self.placement.fallback_compiler_options,
                                       self.fell_back, str(size))
    self.compile_seconds[size] = time.perf_counter() - t

  def args(self, state, step0: int, size: int):
    """The arguments of `chunk(size)` for steps step0 .. step0 + size - 1."""
    if self.on_device:
      first, perms = self.schedule.window(step0, size)
      return (state, self.x_train, self.y_train, perms, np.int32(first),
              np.int32(step0), self.aug_key)
    # This process gathers only its own devices' seeds of each step.
    idx = self.schedule.host_indices(step0, size)
    local = idx[:, self.placement.local_rows(self.k)]
    data, shape = self.run.data, idx.shape
    put = lambda a: jax.make_array_from_process_local_data(
        self.placement.stacked_batch, a, (*shape, *a.shape[2:]))
    return (state, put(data.x_train[local]), put(data.y_train[local]), np.int32(step0),
            self.aug_key)

  def chunk_size(self, done: int, next_stop: int) -> int:
    """Steps to run from `done`: a whole program's if the next stop is that far."""
    return self.steps_per_dispatch if done + self.steps_per_dispatch <= next_stop else 1

  def __call__(self, state, step0: int, size: int):
    """(state after steps step0 .. step0 + size - 1, their metrics [size]); the state
    in the loop's layout, in and out (`enter`, `leave`)."""
    if size not in self.compiled:  # a stop off the multiples (not expected)
      logging.warning("compiling the %d-step program inside the loop", size)
      self._compile(state, size)
    return self.compiled[size](*self.args(state, step0, size))
