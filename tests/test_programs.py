"""invjax/programs.py: the run's programs compiled before the loop, several at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invjax import build as build_lib
from invjax import flat_state
from invjax import placement as placement_lib
from invjax import programs as programs_lib
from invjax import steps
from tests import helpers


def test_programs_compiled_at_once_compute_what_they_compute_one_by_one():
  x = jnp.arange(12.0).reshape(3, 4)
  fns = {"sum": jnp.sum, "tanh": jnp.tanh, "matmul": lambda a: a @ a.T}
  lowered = {name: jax.jit(f).lower(x) for name, f in fns.items()}
  got = programs_lib.compile_concurrently(lowered)
  assert set(got) == set(fns)
  for name, f in fns.items():
    compiled, seconds = got[name]
    assert seconds > 0
    np.testing.assert_allclose(compiled(x), f(x), rtol=1e-6)


def test_a_failed_compile_names_its_program():
  class Broken:
    def compile(self, compiler_options=None):
      raise ValueError("no memory")
  ok = jax.jit(jnp.sin).lower(jnp.ones(3))
  with pytest.raises(RuntimeError, match="compiling the probe program failed: no memory"):
    programs_lib.compile_concurrently({"eval": ok, "probe": Broken()})


def test_the_run_programs_and_those_alongside_are_all_compiled_before_the_loop(npz):
  config = helpers.tiny_config(str(npz), num_epochs=1.0, lr_boundaries=())
  config.steps_per_dispatch = 2
  run = build_lib.build(config)
  placement = placement_lib.Placement.create()
  state = build_lib.initial_state(run, placement)
  extra = {"norm": jax.jit(lambda s: sum(jnp.sum(p ** 2) for p in
                                         jax.tree.leaves(s.params))).lower(state)}
  programs = programs_lib.TrainPrograms(run, placement, state, single=True,
                                        alongside=extra)
  assert set(programs.compiled) == {1, 2} and set(programs.alongside) == {"norm"}
  assert programs.wall_seconds >= programs.compile_seconds[2] > 0
  assert float(programs.alongside["norm"](state)) > 0
  new, metrics = programs(state, 0, 1)  # the 1-step program, compiled: runs
  assert metrics["loss"].shape == (1,) and int(new.step) == 1
  only = programs_lib.TrainPrograms(run, placement, new, single=False)
  assert set(only.compiled) == {2} and only.alongside == {}


def test_xla_options_on_one_gpu_only_and_never_over_xla_flags():
  """No latency-hiding scheduler for a program on one GPU (nothing to overlap); none
  on several devices (it overlaps their collectives) or off a GPU; an option that
  XLA_FLAGS sets is left to XLA_FLAGS."""
  option = "xla_gpu_enable_latency_hiding_scheduler"
  assert placement_lib.compiler_options("gpu", 1) == {option: False}
  assert placement_lib.compiler_options("cuda", 1) == {option: False}
  assert placement_lib.compiler_options("gpu", 8) == {}
  assert placement_lib.compiler_options("cpu", 1) == placement_lib.compiler_options(
      "tpu", 1) == {}
  assert placement_lib.compiler_options("gpu", 1, f"--{option}=true") == {}
  assert placement_lib.Placement.create().compiler_options == {}  # this CPU


def test_gpu_compile_graph_adds_its_options_on_one_gpu_and_xla_flags_still_win():
  graph = placement_lib.GPU_COMPILE["graph"]
  latency = {"xla_gpu_enable_latency_hiding_scheduler": False}
  assert placement_lib.compiler_options("gpu", 1, gpu_compile="graph") == {**latency,
                                                                             **graph}
  assert "WHILE" in graph["xla_gpu_enable_command_buffer"]  # the step loop too
  assert graph["xla_gpu_experimental_enable_conv_fusion"] is True
  assert placement_lib.compiler_options("gpu", 1, gpu_compile="xla") == latency
  assert placement_lib.compiler_options("gpu", 2, gpu_compile="graph") == {}
  assert placement_lib.compiler_options("tpu", 1, gpu_compile="graph") == {}
  # XLA_FLAGS naming one option takes that option alone out of the program's options
  got = placement_lib.compiler_options("gpu", 1, "--xla_gpu_enable_command_buffer=",
                                       gpu_compile="graph")
  assert "xla_gpu_enable_command_buffer" not in got
  assert got["xla_gpu_experimental_enable_conv_fusion"] is True
  with pytest.raises(ValueError, match="gpu_compile='cuda'.*graph"):
    placement_lib.compiler_options("gpu", 1, gpu_compile="cuda")
  # The fallback: the options without gpu_compile's (None where it adds none)
  assert placement_lib.Placement.create("graph").fallback_compiler_options == {}  # CPU
  assert placement_lib.Placement.create("xla").fallback_compiler_options is None


def test_a_program_gpu_compile_breaks_compiles_again_with_xla_defaults(caplog):
  graph = {"xla_gpu_experimental_enable_conv_fusion": True}
  tried = []

  class NeedsDefaults:
    def compile(self, compiler_options=None):
      tried.append(compiler_options)
      if compiler_options and "xla_gpu_experimental_enable_conv_fusion" in compiler_options:
        raise RuntimeError("INTERNAL: cuDNN could not build the fusion\nmore lines")
      return "compiled"
  fell_back = []
  assert programs_lib.compile_with(NeedsDefaults(), graph, {}, fell_back,
                                   "probe") == "compiled"
  assert tried == [graph, None] and fell_back == ["probe"]
  assert "compiling probe with" in caplog.text
  assert "cuDNN could not build the fusion" in caplog.text
  assert "more lines" not in caplog.text
  # Without a fallback (gpu_compile "xla"), or one that is the same, the error stands.
  for fallback in (None, graph):
    with pytest.raises(RuntimeError, match="cuDNN"):
      programs_lib.compile_with(NeedsDefaults(), graph, fallback)
  got = programs_lib.compile_concurrently({"a": NeedsDefaults(), "b": NeedsDefaults()},
                                          graph, {})
  assert {name: compiled for name, (compiled, _) in got.items()} == {
      "a": "compiled", "b": "compiled"}


def test_every_program_of_a_run_compiles_with_the_mesh_xla_options(npz, monkeypatch):
  config = helpers.tiny_config(str(npz), num_epochs=1.0, lr_boundaries=())
  config.steps_per_dispatch = 2
  run = build_lib.build(config)
  placement = placement_lib.Placement.create()
  state = build_lib.initial_state(run, placement)
  options = {"xla_gpu_enable_latency_hiding_scheduler": False}
  monkeypatch.setattr(placement_lib.Placement, "compiler_options",
                      property(lambda self: options))
  seen, real = [], jax.stages.Lowered.compile

  def spy(self, compiler_options=None, **kwargs):
    seen.append(compiler_options)
    return real(self, **kwargs)  # a GPU's option: not for this CPU's XLA
  monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
  extra = {"eval": jax.jit(lambda s: s.step + 1).lower(state)}
  programs_lib.TrainPrograms(run, placement, state, single=True, alongside=extra)
  assert seen == [options] * 3  # the 2-step, 1-step and eval programs


def test_a_run_whose_gpu_compile_options_fail_compiles_every_program_without_them(
    npz, monkeypatch):
  config = helpers.tiny_config(str(npz), num_epochs=1.0, lr_boundaries=())
  config.steps_per_dispatch = 2
  run = build_lib.build(config)
  placement = placement_lib.Placement.create("graph")
  state = build_lib.initial_state(run, placement)
  graph = placement_lib.compiler_options("gpu", 1, gpu_compile="graph")
  plain = placement_lib.compiler_options("gpu", 1, gpu_compile="xla")
  monkeypatch.setattr(placement_lib.Placement, "compiler_options",
                      property(lambda self: graph))
  monkeypatch.setattr(placement_lib.Placement, "fallback_compiler_options",
                      property(lambda self: plain))
  seen, real = [], jax.stages.Lowered.compile

  def spy(self, compiler_options=None, **kwargs):
    seen.append(compiler_options)
    if compiler_options == graph:
      raise jax.errors.JaxRuntimeError("UNIMPLEMENTED: no cuDNN engine for the fusion")
    return real(self, **kwargs)  # a GPU's options: not for this CPU's XLA
  monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
  extra = {"eval": jax.jit(lambda s: s.step + 1).lower(state)}
  programs = programs_lib.TrainPrograms(run, placement, state, single=True,
                                        alongside=extra)
  assert sorted(map(str, seen)) == sorted(map(str, [graph, plain] * 3))
  assert programs.compile_record()["fell_back"] == ["1", "2", "eval"]  # the run card's
  assert programs.compile_record()["gpu_compile"] == "graph"
  new, metrics = programs(state, 0, 2)  # the 2-step program, compiled: runs
  assert int(new.step) == 2 and np.isfinite(metrics["loss"]).all()


def test_the_state_kept_in_the_loop_layout_between_programs(npz, monkeypatch):
  """Programs that loop over their steps take and return the state in the loop's
  layout (here cuDNN's filter layout, as on a GPU): entered once, run as two programs,
  taken out, it is the state the unrolled programs give, and it goes in and out bit
  for bit. The eval-mode programs read it as they read the state itself."""
  monkeypatch.setattr(flat_state, "filters_out_first", lambda platform: True)
  config = helpers.tiny_config(str(npz), num_epochs=1.0, lr_boundaries=())
  config.steps_per_dispatch = 2
  run = build_lib.build(config)
  placement = placement_lib.Placement.create()
  state = build_lib.initial_state(run, placement)
  copy = lambda s: jax.tree.map(jnp.copy, s)
  loop = programs_lib.TrainPrograms(run, placement, state, unroll=False)
  assert set(loop.compiled) == {1, 2}
  entered = loop.enter(state)
  assert set(entered.params) == {"vector"}
  jax.tree.map(np.testing.assert_array_equal, loop.leave(entered), state)
  images, labels = run.data.x_test[:8], run.data.y_test[:8]
  eval_step = jax.jit(steps.make_eval_step(False))
  mask = jnp.ones(8)
  jax.tree.map(np.testing.assert_array_equal, eval_step(entered, images, labels, mask),
               eval_step(state, images, labels, mask))
  # A state put into the layout by another trace (JAX's caches cleared) fits the same
  # compiled programs: the layout's apply_fn is compared by value.
  jax.clear_caches()
  again = jax.jit(loop.layout[0])(state)
  assert jax.tree.structure(again) == jax.tree.structure(entered)
  s, m1 = loop(again, 0, 2)
  s, m2 = loop(s, 2, 1)
  got = loop.leave(s)
  unrolled = programs_lib.TrainPrograms(run, placement, state, unroll=True)
  t, n1 = unrolled(copy(state), 0, 2)
  t, n2 = unrolled(t, 2, 1)
  assert int(got.step) == int(t.step) == 3
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, (got.params, got.opt_state, got.batch_stats),
               (t.params, t.opt_state, t.batch_stats))
  jax.tree.map(close, (m1, m2), (n1, n2))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got.params,
                       state.params)
  assert max(jax.tree.leaves(moved)) > 1e-4  # the steps did something
