"""experiments/profile_step.py: a profiler trace of the real step, attributed by scope.

Timings are printed by the tool, never asserted; these check that the attribution is
computed from the trace and the program it claims to read.
"""

import glob
import json
import os

import pytest

from experiments import benchmark
from experiments import common
from experiments import hlo
from experiments import profile_step
from tests import helpers


# A hand-written optimised module: a fusion of two parts, a convolution fused with a
# bias, a loop whose body holds an instruction, an instruction with no scope.
HLO = """HloModule jit_chunk, is_scheduled=true

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  %a = f32[4]{0} multiply(%param_0, %param_0), metadata={op_name="jit(chunk)/jvp(invariance_loss)/mul"}
  %b = f32[4]{0} add(%a, %a), metadata={op_name="jit(chunk)/transpose(jvp(invariance_loss))/add"}
  %c = f32[4]{0} maximum(%b, %b), metadata={op_name="jit(chunk)/transpose(jvp(Net))/max"}
  ROOT %d = f32[4]{0} select(%c, %c, %c), metadata={op_name="jit(chunk)/transpose(jvp(Net))/select_n"}
}

%fused_conv (p0: f32[1,4,4,1], p1: f32[1,1,1,1]) -> f32[1,4,4,1] {
  %p0 = f32[1,4,4,1]{3,2,1,0} parameter(0)
  %p1 = f32[1,1,1,1]{3,2,1,0} parameter(1)
  %conv = f32[1,4,4,1]{3,2,1,0} convolution(%p0, %p1), window={size=1x1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(chunk)/jvp(Net)/Conv_0/conv_general_dilated"}
  ROOT %bias = f32[1,4,4,1]{3,2,1,0} add(%conv, %conv), metadata={op_name="jit(chunk)/jvp(Net)/Conv_0/add"}
}

%body (arg: (s32[], f32[4])) -> (s32[], f32[4]) {
  %arg = (s32[], f32[4]{0}) parameter(0)
  ROOT %upd = f32[4]{0} multiply(%arg, %arg), metadata={op_name="jit(chunk)/optimizer/mul"}
}

%cond (arg.1: (s32[], f32[4])) -> pred[] {
  %arg.1 = (s32[], f32[4]{0}) parameter(0)
  ROOT %lt = pred[] compare(%arg.1, %arg.1), direction=LT
}

ENTRY %main (x: f32[4], y: f32[1,4,4,1]) -> f32[4] {
  %x = f32[4]{0} parameter(0), metadata={op_name="x"}
  %y = f32[1,4,4,1]{3,2,1,0} parameter(1)
  %mixed_fusion = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(chunk)/transpose(jvp(Net))/select_n"}
  %conv_fusion = f32[1,4,4,1]{3,2,1,0} fusion(%y, %y), kind=kCustom, calls=%fused_conv
  %bn = f32[4]{0} multiply(%x, %x), metadata={op_name="jit(chunk)/transpose(jvp(Net))/BatchNorm_0/mul"}
  %aug = f32[4]{0} add(%x, %x), metadata={op_name="jit(chunk)/augment/jit(_uniform)/add"}
  %gather = f32[4]{0} add(%x, %x), metadata={op_name="jit(chunk)/seed_gather/gather"}
  %key = f32[4]{0} add(%x, %x), metadata={op_name="jit(chunk)/jit(_threefry_fold_in)/add"}
  %loop = (s32[], f32[4]{0}) while(%x), condition=%cond, body=%body, metadata={op_name="jit(chunk)/while"}
  ROOT %out = f32[4]{0} add(%x, %x)
}
"""


def test_hlo_index_splits_fusions_by_the_scopes_of_their_instructions():
  index = hlo.HloIndex(HLO)
  assert index.module == "jit_chunk"
  assert index.instrs["loop"]["calls"] == ["cond", "body"]
  # Two loss instructions and two network ones (the passive parameter not counted).
  assert index.split("mixed_fusion") == {("invariance loss", "forward"): 0.25,
                                         ("invariance loss", "backward"): 0.25,
                                         ("network: other", "backward"): 0.5}
  # A fusion around a convolution is the convolution's time, whatever else it fuses.
  assert index.split("conv_fusion") == {
      ("network: convolutions and matmuls", "forward"): 1.0}
  assert index.split("bn") == {("network: batch norm", "backward"): 1.0}
  assert index.split("aug") == {("augmentation", ""): 1.0}
  assert index.split("gather") == {("seed gather", ""): 1.0}
  assert index.split("upd") == {("optimizer update", ""): 1.0}
  assert index.split("key") == {("other (in the step program)", ""): 1.0}
  assert index.split("out") == {("other (in the step program)", ""): 1.0}
  assert index.split("not_in_the_module") is None


def test_attribute_sums_events_per_part_and_keeps_unmatched_time():
  index = hlo.HloIndex(HLO)
  ns = 1e6  # 1 ms
  events = [("mixed_fusion", "k1", 4 * ns), ("mixed_fusion", "k1", 4 * ns),
            ("conv_fusion", "cudnn", 6 * ns), ("aug", "k2", 2 * ns),
            ("somewhere_else", "k3", 2 * ns)]
  r = profile_step.attribute(events, index, steps=2, top=3)
  parts = r["parts"]
  assert r["total_ms"] == pytest.approx(9.0)  # 18 ms over 2 steps
  assert parts["invariance loss"]["ms"] == pytest.approx(2.0)
  assert parts["invariance loss"]["forward_ms"] == pytest.approx(1.0)
  assert parts["network: other"]["backward_ms"] == pytest.approx(2.0)
  assert parts["network: convolutions and matmuls"]["ms"] == pytest.approx(3.0)
  assert parts["augmentation"]["ms"] == pytest.approx(1.0)
  assert parts["other (unattributed)"]["ms"] == pytest.approx(1.0)
  assert r["unmatched_instructions"] == 1
  # The mixed fusion, whole: the kernels the loss adds or joins.
  assert r["loss_kernels"] == 1 and r["loss_kernels_ms"] == pytest.approx(4.0)
  assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0)
  assert [o["hlo_op"] for o in r["top"]] == ["mixed_fusion", "conv_fusion", "aug"]
  assert r["top"][0]["launches_per_step"] == 1 and r["top"][0]["ms"] == 4.0


def test_kinds_and_durations_group_the_launches():
  index = hlo.HloIndex(HLO)
  us = 1e3
  # Two steps: "bn" (batch norm) and "gather" each launched once a step, 3 and 12 us;
  # the two loss-and-network fusions of one kind ("mixed_fusion" and
  # "mixed_fusion.1", the latter not in the HLO) once each, 60 us.
  events = [("bn", "k", 3 * us), ("bn", "k", 3 * us),
            ("gather", "g", 12 * us), ("gather", "g", 12 * us),
            ("mixed_fusion", "m", 60 * us), ("mixed_fusion.1", "m", 60 * us)]
  r = profile_step.attribute(events, index, steps=2)
  assert r["launches_per_step"] == 3
  assert [(k["kind"], k["part"]) for k in r["kinds"]] == [
      ("mixed_fusion", "network: other backward"),  # its main part
      ("mixed_fusion", "other (unattributed)"),
      ("gather", "seed gather"), ("bn", "network: batch norm backward")]
  bn = r["kinds"][-1]
  assert bn["launches_per_step"] == 1 and bn["us_per_launch"] == pytest.approx(3.0)
  assert bn["ms"] == pytest.approx(0.003) and bn["instructions"] == 1
  assert sum(k["share"] for k in r["kinds"]) == pytest.approx(1.0)
  assert [(d["from_us"], d["to_us"]) for d in r["durations"]] == [
      (0, 5), (5, 10), (10, 20), (20, 50), (50, None)]
  assert [d["launches_per_step"] for d in r["durations"]] == [1, 0, 1, 0, 1]
  assert [d["ms"] for d in r["durations"]] == pytest.approx([0.003, 0, 0.012, 0, 0.06])
  assert sum(d["ms"] for d in r["durations"]) == pytest.approx(r["total_ms"])
  assert profile_step.kind("cudnn-conv-bw-filter.3") == "cudnn-conv-bw-filter"
  assert profile_step.kind("input_reduce_fusion.1.2") == "input_reduce_fusion"
  assert profile_step.kind("wrapped_concatenate") == "wrapped_concatenate"


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
  """A tiny All-CNN profiled on CPU: baseline (M = 1) and the moments loss."""
  config = helpers.tiny_config("unused", "invariance", num_epochs=1.0, lr_boundaries=())
  config.image_shape, config.num_classes = (16, 16, 3), 4
  data = benchmark.synthetic_data(config, n_train=64, n_test=1)
  out = {}
  for key in ("baseline", "moments"):
    trace = str(tmp_path_factory.mktemp(key))
    out[key] = (profile_step.profile_variant(config, data, key, spd=1, programs=1,
                                             wall_repeats=1, trace_dir=trace, top=5),
                trace)
  return out


def test_cpu_trace_puts_the_loss_in_its_part_and_nowhere_else(profiled):
  base, moments = profiled["baseline"][0], profiled["moments"][0]
  assert base["copies"] == 1 and moments["copies"] == 4
  assert base["parts"]["invariance loss"]["ms"] == 0
  loss = moments["parts"]["invariance loss"]
  assert loss["ms"] > 0 and loss["forward_ms"] > 0 and loss["backward_ms"] > 0
  for r in (base, moments):
    assert r["events_from"] == "host (XLA:CPU thunks)" and r["source"] == "xplane.pb"
    # Every thunk that ran is an instruction of the program's HLO text.
    assert r["unmatched_instructions"] == 0 and r["instructions"] > 10
    for part in ("augmentation", "network: convolutions and matmuls",
                 "network: batch norm", "optimizer update", "seed gather"):
      assert r["parts"][part]["ms"] > 0, part
    assert sum(p["ms"] for p in r["parts"].values()) == pytest.approx(r["total_ms"])
    assert all(o["part"].split(" ")[0] in {p.split(" ")[0] for p in profile_step.PARTS}
               for o in r["top"])


def test_total_is_the_traced_thunks_own_time(profiled):
  moments, trace = profiled["moments"]
  events, info = profile_step.device_events(trace, "jit_chunk")
  assert info["other_modules_ms"] >= 0
  assert sum(e[2] for e in events) / 1e6 == pytest.approx(moments["total_ms"])
  # Read again from the Chrome-format trace.json.gz alone: the same attribution
  # (its timestamps are in microseconds).
  for path in glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True):
    os.remove(path)
  again = profile_step.analyse(trace, os.path.join(trace, "program.hlo.txt"), steps=1)
  assert again["source"] == "trace.json.gz"
  assert again["total_ms"] == pytest.approx(moments["total_ms"], rel=0.02, abs=0.05)
  assert again["parts"]["invariance loss"]["ms"] == pytest.approx(
      moments["parts"]["invariance loss"]["ms"], rel=0.05, abs=0.05)


def test_tables_are_written(profiled, tmp_path):
  result = {"command": "test", "date": "today", "steps_per_dispatch": 1, "programs": 1,
            "hardware": common.hardware(),
            "models": [{"model": "tiny", "precision": "float32", "size": "small",
                        "overrides": {}, "batch_size": 16,
                        "variants": {r["name"]: r for r, _ in profiled.values()}}]}
  profile_step.write(result, str(tmp_path))
  text = (tmp_path / "profile.md").read_text()
  assert "| invariance loss | 0.000 |" in text  # the baseline's column
  assert "invariance moments" in text and "top 5 HLO instructions" in text
  assert "launches a step, by duration" in text and "kinds of instruction" in text
  assert json.loads((tmp_path / "profile.json").read_text())["models"][0]["variants"]


def test_kernels_missing_from_the_hlo_fall_back_on_their_annotation():
  index = hlo.HloIndex(HLO)
  ns = 1e6
  events = [("command_buffer.3", "sm90_xmma_fprop_kernel", ns,
             "jit(chunk)/jvp(Net)/Conv_0/conv_general_dilated"),
            ("fusion.77", "loop_fusion", ns, "jit(chunk)/transpose(jvp(invariance_loss))/mul"),
            ("fusion.78", "loop_fusion", ns, "")]
  r = profile_step.attribute(events, index, steps=1)
  assert r["parts"]["network: convolutions and matmuls"]["forward_ms"] == 1.0
  assert r["parts"]["invariance loss"]["backward_ms"] == 1.0
  assert r["parts"]["other (unattributed)"]["ms"] == 1.0
  assert r["attributed_by_annotation"] == 2 and r["unmatched_instructions"] == 1
