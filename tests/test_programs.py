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
    def compile(self):
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
