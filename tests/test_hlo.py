"""experiments/hlo.py: the kernels of an optimised HLO module's executed computations,
by part, and the bytes they move (the GPU compile itself needs JAX's CUDA plugin, not
here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments import hlo
from experiments import loss_cost
from invjax import losses

MODULE = """HloModule m

%fused_neg (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p), metadata={op_name="jit(f)/while/body/jvp(invariance_loss)/neg"}
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_neg, metadata={op_name="jit(f)/while/body/jvp(invariance_loss)/neg"}
  %c = f32[4]{0} custom-call(%f), custom_call_target="__cudnn$convForward", metadata={op_name="jit(f)/while/body/conv_general_dilated"}
  ROOT %r = (s32[], f32[4]{0}) tuple(%i, %c)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %k = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %k), direction=LT
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[4]{0}) tuple(%z, %a)
  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body
  %o = f32[4]{0} get-tuple-element(%w), index=1
  ROOT %cp = f32[4]{0} copy(%o)
}
"""


def test_kernels_are_the_launching_instructions_of_the_executed_computations():
  """A step: the loop body's fusion and cuDNN call and its condition's compare; once a
  program: the entry's copy. Not the fusion's inside, nor tuples, parameters,
  constants or the loop."""
  got = hlo.census(MODULE)
  assert got["kernels"] == 3
  assert got["kinds"] == {"fusion": 1, "__cudnn$convForward": 1, "compare": 1}
  assert got["parts"]["invariance loss"] == 1
  assert got["parts"]["network: convolutions and matmuls"] == 1
  assert sum(got["parts"].values()) == 3
  assert got["per_program"]["kernels"] == 1
  assert got["per_program"]["kinds"] == {"copy": 1}
  # Bytes: each kernel's result and operands. The fusion and the cuDNN call move
  # 16 + 16 bytes each, the compare 1 + 4 + 4; the entry's copy 16 + 16.
  assert got["bytes"] == 73 and got["per_program"]["bytes"] == 32


def test_shape_bytes():
  assert hlo.shape_bytes("f32[4,8]{1,0}") == 128
  assert hlo.shape_bytes("bf16[3]{0}") == 6 and hlo.shape_bytes("pred[]") == 1
  assert hlo.shape_bytes("(s32[], f32[2,2]{1,0})") == 20
  assert hlo.shape_bytes("f8e4m3fn[10]{0}") == 10


def _loss(form):
  rng = np.random.default_rng(0)
  feats = {k: jnp.asarray(rng.normal(size=(32, *s)), jnp.bfloat16)
           for k, s in {"a": (6, 6, 8), "b": (40,), "c": (3, 3, 16)}.items()}
  weights = losses.layer_weights(3, 0.1, 10.0)
  return loss_cost.loss_program(weights, 8, "moments", 1, form).lower(feats)


@pytest.mark.parametrize("program", [
    lambda: jax.jit(lambda x, y: jnp.sum(x * 2 + y, 0)).lower(
        jnp.ones((64, 128)), jnp.ones((64, 128))),
    lambda: jax.jit(lambda x, y: (jnp.exp(x) @ y.T).sum()).lower(
        jnp.ones((64, 128)), jnp.ones((64, 128))),
    lambda: jax.jit(jax.grad(lambda a, y: jnp.sum(jnp.tanh(a * y) ** 2))).lower(
        jnp.ones((64, 128)), jnp.ones((64, 128))),
    lambda: jax.jit(lambda x: x[:, :4] * 2).lower(jnp.ones((64, 128))),  # a slice
    lambda: jax.jit(lambda x: x[:, :4] * 2 + x[:, 4:8]).lower(jnp.ones((64, 128))),
    lambda: jax.jit(lambda x: jnp.concatenate([x[:, :4], x[:, 8:12]], 1) + 1).lower(
        jnp.ones((64, 128))),
    lambda: _loss("one_read"), lambda: _loss("per_seed")])
def test_bytes_are_what_xla_cpu_counts(program):
  """The bytes counted from a program XLA:CPU compiled against its own cost analysis:
  equal on plain fusions and on fusions that read slices of an operand (only the
  slices count), within 0.5 % on the loss's value and gradient (a deviceless GPU
  compile has no cost analysis, so this count stands in for it there)."""
  compiled = program().compile()
  xla = float(common.cost_analysis(compiled)["bytes accessed"])
  assert hlo.census(compiled.as_text())["bytes"] == pytest.approx(xla, rel=5e-3)


def test_a_program_without_a_loop_is_all_one_step():
  loopless = MODULE.replace(
      "  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body\n"
      "  %o = f32[4]{0} get-tuple-element(%w), index=1\n", "  %o = f32[4]{0} negate(%a)\n")
  got = hlo.census(loopless)
  assert got["kinds"] == {"negate": 1, "copy": 1}
  assert got["per_program"]["kernels"] == 0


def test_a_compiled_program_is_read_whole():
  """On a program XLA compiled here (a loop of two reductions): every loop iteration's
  kernels are in the body, counted once, and there are some."""
  def f(x):
    return jax.lax.fori_loop(0, 3, lambda i, x: x - jnp.mean(x) / jnp.max(x), x)
  text = jax.jit(f).lower(jnp.ones((64, 64))).compile().as_text()
  got = hlo.census(text)
  assert got["kernels"] >= 1 and sum(got["kinds"].values()) == got["kernels"]
  assert abs(sum(got["parts"].values()) - got["kernels"]) < 1e-9
  assert got["kernels"] > got["per_program"]["kernels"]  # the loop's body is the step


def test_without_the_cuda_plugin_it_says_what_to_install():
  import importlib.util  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  with pytest.raises(app.UsageError, match="--target=a100: no .*valid: \\['h100', 'h200'\\]"):
    hlo.gpu_placement("a100")
  if importlib.util.find_spec("jax_plugins") is None:  # JAX's CUDA plugin is absent
    with pytest.raises(app.UsageError, match="pip install jax-cuda12-plugin=="):
      hlo.gpu_placement("h100")


# XLA:GPU's thunk sequence after its thunk passes, as --xla_dump_to writes it (the
# layout of jaxlib 0.11.2's dumps; names and launch dimensions shortened): a command
# buffer and a loop whose condition is one kernel and whose body is two command
# buffers around a cuDNN convolution and a kernel, then a kernel after the loop.
THUNKS = """\
000: kCommandBuffer [source       | next=004 (1)]
    001: kCopy         [source | sink] kCopy
    002: kCustomKernel [source | sink] loop_add_fusion grid: [1, 1, 1] threads: [1, 1, 1]
004: kWhile         [prev=000 (1) | next=012 (1)]
condition:
    005: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]
  body:
    000: kCommandBuffer [source       | next=009 (1)]
        006: kCustomKernel [source       | next=007 (1)] loop_gather_fusion grid: [8, 1, 1]
        007: kCustomKernel [prev=006 (1) | next=008 (1)] input_reduce_fusion grid: [128, 1, 1]
        008: kCustomKernel [prev=007 (1) | sink        ] loop_convert_fusion grid: [768, 1, 1]
    009: kConvolution   [prev=000 (1) | next=010 (1)] kConvolution
    010: kCustomKernel  [prev=009 (1) | next=000 (1)] input_reduce_fusion_1 grid: [512, 1, 1]
    000: kCommandBuffer [prev=010 (1) | sink        ]
        011: kCustomKernel [source | sink] loop_add_fusion_1 grid: [2, 1, 1]
012: kCustomKernel  [prev=004 (1) | sink        ] wrapped_slice grid: [1, 1, 1]
"""


def test_launches_count_a_command_buffer_as_one():
  """A step launches its condition's kernel and its body's four top-level thunks (two
  command buffers, the convolution, the kernel between): 5, of 7 work thunks, 4 of
  them in the command buffers. Once a program: the first command buffer and the last
  kernel."""
  assert hlo.launches(THUNKS) == {"launches": 5, "graphs": 2, "thunks": 7,
                                  "in_graphs": 4, "loop_in_graph": False, "once": 2}


def test_a_loop_inside_a_command_buffer_launches_nothing_a_step():
  """With loops among the command types (WHILE), a body of commands only and a driver
  with conditional nodes, the whole program is one command buffer, the loop a command
  in it: the host launches it once a program. (XLA's layout: "condition:" unindented,
  "body:" under the loop; a command after the loop, in the same command buffer.)"""
  captured = """\
000: kCommandBuffer [source | sink]
    001: kCopy         [source       | next=002 (1)] kCopy
    002: kWhile        [prev=001 (1) | next=006 (1)]
condition:
        003: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1]
      body:
        004: kCustomKernel [source       | next=005 (1) ] loop_gather_fusion grid: [8, 1, 1]
        005: kCustomKernel [prev=004 (1) | sink         ] fusion_16 grid: [21, 1, 1]
    006: kCustomKernel [prev=002 (1) | sink        ] wrapped_slice grid: [1, 1, 1]
"""
  assert hlo.launches(captured) == {"launches": 0, "graphs": 0, "thunks": 3,
                                    "in_graphs": 3, "loop_in_graph": True, "once": 1}
  cb = hlo._thunk_tree(captured)[0]  # pylint: disable=protected-access
  assert [n["kind"] for n in cb["members"]] == ["kCopy", "kWhile", "kCustomKernel"]


def test_the_launches_of_each_dumped_program(tmp_path, capsys):
  """experiments/launches.py reads every thunk sequence XLA dumped, in XLA's order,
  and says what is wrong with a folder that has none."""
  from experiments import launches  # pylint: disable=g-import-not-at-top
  (tmp_path / "module_0012.jit_chunk.thunk_sequence_after_thunk_passes.txt").write_text(
      THUNKS)
  (tmp_path / "module_0003.jit_chunk.thunk_sequence_after_thunk_passes.txt").write_text(
      THUNKS.split("004: kWhile")[0])
  (tmp_path / "module_0012.jit_chunk.thunk_sequence.txt").write_text("not read")
  rows = launches.read_dump(str(tmp_path))
  assert [r["program"] for r in rows] == ["module_0003.jit_chunk",
                                          "module_0012.jit_chunk"]
  assert rows[1]["launches"] == 5 and rows[1]["graphs"] == 2 and rows[0]["once"] == 1
  launches.main(["launches", str(tmp_path), str(tmp_path / "out.md")])
  assert "| module_0012.jit_chunk | 5 | 2 | 7 | 4 | no | 2 |" in capsys.readouterr().out
  assert "| module_0003.jit_chunk | 0 |" in (tmp_path / "out.md").read_text()
  with pytest.raises(SystemExit, match="no .*thunk_sequence_after_thunk_passes"):
    launches.main(["launches", str(tmp_path / "module_0012.jit_chunk.thunk_sequence.txt")])


def test_launches_without_a_loop_and_a_stray_section():
  assert hlo.launches(THUNKS.split("004: kWhile")[0]) == {
      "launches": 0, "graphs": 0, "thunks": 0, "in_graphs": 0, "loop_in_graph": False,
      "once": 1}
  with pytest.raises(ValueError, match="'body:' follows no loop"):
    hlo.launches("  body:\n    001: kCustomKernel [source | sink] f\n")


def test_a_compile_error_in_one_line():
  """kernel_census and the benchmark report a variant XLA could not compile in one
  line: XLA's first, and the fused computation and operation of its example failure."""
  text = ("INTERNAL: Failed to get configs for: 6 out of 26 instructions. See logs for "
          "all failures. Example failure: \nNo supported config found for HLO: "
          "%fusion.13 = bf16[8]{0} fusion(%a, %b), kind=kCustom, "
          "calls=%conv_dgrad.6_fusion_comp, metadata={op_name=\"jit(chunk)/Conv_3/"
          "add_any\" stack_frame_id=217}\n - INTERNAL: more")
  assert hlo.compile_error(text) == (
      "INTERNAL: Failed to get configs for: 6 out of 26 instructions. See logs for all "
      "failures. (for example conv_dgrad.6_fusion_comp, jit(chunk)/Conv_3/add_any)")
  assert hlo.compile_error("INTERNAL: out of memory\nmore") == (
      "INTERNAL: out of memory")
