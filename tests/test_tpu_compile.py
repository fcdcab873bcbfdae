"""experiments/tpu_compile.py, on this CPU's devices (libtpu is not a test dependency):
a run built for other devices than JAX's own, the training program's arguments as a
run passes them, and the record of a compile."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from experiments import hlo
from experiments import tpu_compile
from invjax import analyze
from invjax import build as build_lib
from invjax import flat_state
from invjax import placement as placement_lib
from invjax import programs as programs_lib
from tests import helpers


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What build() reads of a device: its platform (and a kind for the records)."""
  platform: str
  id: int = 0
  device_kind: str = "TPU v5 lite"


def _config(**overrides):
  c = helpers.tiny_config("stand-in")
  with c.unlocked():
    c.image_shape, c.num_classes = (16, 16, 3), 4
    for k, v in overrides.items():
      setattr(c, k, v)
  return c


def test_a_run_is_built_for_the_devices_it_is_given():
  """On 2 TPU devices: the accelerator's batch norm, moments form and dispatch, the
  loss in one part per device; on this CPU the CPU's."""
  config = _config()
  data = tpu_compile.stand_in_data(config)
  tpu = build_lib.build(config, data, devices=[FakeDevice("tpu", i) for i in range(2)])
  cpu = build_lib.build(config, data)
  assert (tpu.model.batch_norm, tpu.step_config.moments_form) == ("fused", "one_read")
  assert (cpu.model.batch_norm, cpu.step_config.moments_form) == ("flax", "per_seed")
  assert tpu.step_config.loss_parts == 2 and cpu.step_config.loss_parts == 1
  assert tpu.steps_per_dispatch > 1 and cpu.steps_per_dispatch == 1
  # On a TPU the update is per parameter and the step loop keeps the parameters' own
  # layout (flat_state.vector_in_loop); elsewhere the momentum is one vector.
  placement = placement_lib.Placement.create()
  momentum = lambda run: [a.shape for a in jax.tree.leaves(  # (and a step count)
      build_lib.initial_state(run, placement).opt_state) if a.ndim]
  params = [a.shape for a in jax.tree.leaves(build_lib.initial_state(
      tpu, placement).params)]
  assert momentum(tpu) == params
  assert momentum(cpu) == [(sum(math.prod(p) for p in params),)]
  state = build_lib.initial_state(tpu, placement)
  enter, leave = flat_state.enter_and_leave(state, "tpu")
  assert enter(state) is state and leave(state) is state


def test_a_slice_the_batch_does_not_split_over_is_refused_before_compiling():
  """16 seed images a batch (64 = 16 x 4) over 32 devices: the config check's error,
  naming the fields, is the record; nothing is compiled."""
  config = _config(batch_size=64)
  record = tpu_compile.check(config, "tiny:invariance",
                             [FakeDevice("tpu", i) for i in range(32)])
  assert "programs" not in record
  assert "batch_size / copies" in record["error"] and "32" in record["error"]
  table = tpu_compile.format_markdown([record], "v5e:8x4")
  row = next(line for line in table.splitlines() if line.startswith("| tiny:"))
  assert row.startswith("| tiny:invariance | 32 TPU v5 lite | not run: invalid ")
  assert row.endswith("|") and row.count("|") == table.splitlines()[2].count("|")


def test_training_arguments_are_those_a_run_passes():
  """hlo.train_args (tpu_compile's and kernel_census's) gives the shapes, dtypes and
  structure of what TrainPrograms.args passes a training program in the loop's layout
  (the program they lower is the run's)."""
  config = _config()
  run = build_lib.build(config, tpu_compile.stand_in_data(config).subset(256, 32))
  placement = placement_lib.Placement.create()
  state = build_lib.initial_state(run, placement)
  programs = programs_lib.TrainPrograms(run, placement, state, compile_now=False,
                                        unroll=False)
  real = programs.args(programs.enter(state), 0, 3)
  abstract = hlo.train_args(run, placement)
  def leaves(args):  # (path, shape, dtype) of each array
    return [(jax.tree_util.keystr(path), tuple(np.shape(a)), str(a.dtype))
            for path, a in jax.tree_util.tree_flatten_with_path(args)[0]]
  assert leaves(abstract) == leaves(real)
  assert len(leaves(real)) > 7  # the state's arrays, then the six others


def test_the_record_of_a_compile_on_this_cpu():
  """Every program (training, evaluation, the two scoring passes, PGD) compiles on
  this CPU's device; the record has their memory, XLA's counts and no collectives
  (one device), and each table its row."""
  config = _config(steps_per_dispatch=2)
  record = tpu_compile.check(config, "tiny:invariance", jax.devices())
  assert set(record["programs"]) == {"train", "eval", "score_stats", "score", "attack"}
  for program in record["programs"].values():
    assert program["memory"]["total"] > 0 and program["compile_s"] > 0
    assert tpu_compile.program_memory(program) == max(program["memory"]["total"],
                                                      program["memory"]["peak"])
    assert program["collectives"] == {}
  train = record["programs"]["train"]
  assert train["flops"] > 0 and train["bytes"] > 0
  assert record["floors"] is None  # no TPU chip to divide by
  assert record["steps_per_dispatch"] == 2
  table = tpu_compile.format_markdown([record], "cpu")
  assert "| tiny:invariance | 1 cpu | train " in table
  assert ("| tiny:invariance | 16 (2; 10) | score_stats " in table)  # the analysis table
  only = tpu_compile.check(config, "tiny:invariance", jax.devices(), ["score"])
  assert set(only["programs"]) == {"score_stats", "score"}


def test_scoring_and_attack_programs_take_what_a_run_passes_them():
  """The scoring programs lowered for a slice take what analyze.batches makes (images,
  labels, the mask of padding: shapes and dtypes) and the state as restored; PGD a
  batch of the analysis batch size. (One device here: the rounding of a batch to the
  devices is not exercised.)"""
  config = _config()
  with config.unlocked():
    config.analysis.batch_size = 10
  run = build_lib.build(config, tpu_compile.stand_in_data(config).subset(64, 32))
  placement = placement_lib.Placement.create()
  lowered = tpu_compile.lowered_programs(run, placement, ["score", "attack"])
  assert set(lowered) == {"score_stats", "score", "attack"}
  real = next(iter(analyze.batches(run.data.x_test, run.data.y_test, 10, placement)()))
  shapes = lambda tree: [(tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(tree)]
  scored = lowered["score_stats"].args_info[0][1]
  assert shapes(scored) == shapes(real)
  state = build_lib.initial_state(run, placement)
  assert shapes(lowered["score"].args_info[0][0]) == shapes(state)
  assert shapes(lowered["attack"].args_info[0][1])[0] == ((10, 16, 16, 3), "uint8")


def test_collectives_and_relayouts_are_read_from_the_program():
  """A module with a loop: the reshape in its body counts per step, the copy before
  it once per program (bytes read and written); collectives by kind."""
  text = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %r = f32[8,4]{1,0} reshape(%x)
  %s = f32[4,8]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add
  %t = f32[4,8]{1,0} all-reduce-start(%s), replica_groups={}, to_apply=%add
  ROOT %o = (s32[], f32[4,8]) tuple(%i, %t)
}

%cond (c: (s32[], f32[4,8])) -> pred[] {
  %c = (s32[], f32[4,8]) parameter(0)
  ROOT %k = pred[] constant(true)
}

ENTRY %main (a: f32[4,8]) -> (s32[], f32[4,8]) {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[4,8]{0,1} copy(%a)
  %z = s32[] constant(0)
  %w = (s32[], f32[4,8]) tuple(%z, %b)
  ROOT %l = (s32[], f32[4,8]) while(%w), condition=%cond, body=%body
}
"""
  moved = tpu_compile.relayout_bytes(text)
  assert (moved["step"], moved["program"]) == (2 * 128, 2 * 128)
  assert sum(moved["step_by_part"].values()) == 2 * 128
  assert moved["execution"] == 2 * 128 + 2 * 128  # XLA knows no trip count: once
  # With XLA's trip count (a PGD attack's steps), an execution runs the body 10 times.
  counted = text.replace("body=%body\n", 'body=%body, backend_config='
                         '{"known_trip_count":{"n":"10"}}\n')
  assert counted != text
  assert tpu_compile.relayout_bytes(counted)["execution"] == 2 * 128 + 10 * 2 * 128
  assert tpu_compile.collectives(text) == {"all-reduce": {"count": 2,
                                                          "largest_bytes": 128}}


def test_set_overrides_as_the_command_line_does():
  """--set FIELD=VALUE on a config file: the field is set, and the variant follows it
  (invariance_alpha reaches alpha, as --config.invariance_alpha does)."""
  config = tpu_compile.load("allcnn", "invariance",
                            ["invariance_alpha=0.3", "half_precision=True"])
  assert config.alpha == pytest.approx(0.3) and config.half_precision
  assert tpu_compile.load("allcnn", "baseline", ["invariance_alpha=0.3"]).alpha == 0


@pytest.mark.parametrize("kind,per_chip,hbm", [("TPU v5 lite", 1, 16),
                                               ("TPU v4", 2, 16)])
def test_floors_take_a_devices_share_of_its_chip(kind, per_chip, hbm):
  record = {"flops": 197e9, "bytes": 0.819e9}
  floors = tpu_compile.floors(record, kind, per_chip)
  assert floors["hbm_gib"] == hbm
  if kind == "TPU v5 lite":  # 197 TFLOP/s a chip
    assert floors["compute_ms"] == pytest.approx(1.0)
  assert tpu_compile.floors(record, "cpu", 1) is None
