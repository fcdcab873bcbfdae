"""invjax/programs.py: the run's programs compiled before the loop, several at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from invjax import build as build_lib
from invjax import placement as placement_lib
from invjax import programs as programs_lib
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
