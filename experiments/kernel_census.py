"""How many kernels a training step launches on a GPU, by part, compiled without a GPU.

  pip install jax-cuda12-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)') \
      jax-cuda12-pjrt==$(python -c 'import jaxlib; print(jaxlib.__version__)')
  python -m experiments.kernel_census --models=allcnn --variants=same_batch,moments

A step of a small network on a fast GPU is bound by launching its kernels, not by its
FLOPs or bytes: on an H200, All-CNN-C's step of about 200 kernels took 1.55 ms, and the
invariance loss added 0.34-0.36 ms in either moments form although one read of its
activations takes about 21 us there. XLA's GPU compiler decides which operations share
a kernel (its fusions), and it can compile for a described GPU without one: this
compiles the benchmark's training program (experiments/benchmark.py, --steps steps in
a loop, bfloat16, the paper's sizes) for the GPU in experiments/gpu_targets/<target>.txtpb
and counts, in the optimised program's executed computations (the entry and its loops'
bodies), the instructions that launch a kernel: fusions, cuDNN and cuBLAS calls,
copies and the rest, everything but tuples, bitcasts, parameters, constants and control
flow; those in the loop are a step's, the rest once a program. Each kernel is put in
a part of the step by the named scopes invjax/steps.py sets (experiments/hlo.py, the
profiler's attribution too; a fusion that mixes parts is split among them). "MB a
step" is what a step's kernels move, each kernel's result and operands as XLA's cost
analysis counts them (`hlo.kernel_bytes`; a deviceless compile has no cost analysis of
its own): an upper estimate of a step's memory traffic, not a measurement (a fusion
that computes a slice is charged its operands whole; caches are not modelled).
"Host launches a step" is what the host launches in the loop's body and condition,
read from XLA's thunk sequence after its thunk passes (`hlo.launches`): a command
buffer (a CUDA graph of kernels, launched whole) counts one. Which thunks XLA puts in
command buffers follows XLA_FLAGS (`--xla_gpu_enable_command_buffer=...`). Whether a
loop itself goes into one (WHILE: the whole program one launch, when its body holds
only commands) XLA decides from the driver's and the CUDA runtime's versions, which
the target's description gives (gpu_targets/: those of the window's image, as lower
bounds); experiments/launches.py reads what a compile on the GPU itself decided.

Counts, not times: what a change to the loss or the step does to the kernels it
launches, checked on a CPU before a GPU window times it. Autotuning needs the device,
so convolutions get XLA's default algorithms here; the fusions do not depend on them.
The compile column is this machine's tracing, lowering and XLA compiling of the
program, without that autotuning, with the XLA options invjax compiles it with on one
GPU (`placement.compiler_options`).
The JAX here may differ from the GPU machine's (the window's image: 0.11.2).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile
import time

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no CUDA libraries needed

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

from experiments import benchmark
from experiments import hlo
from invjax import build as build_lib
from invjax import models
from invjax import placement as placement_lib

FLAGS = flags.FLAGS
# --models and --variants are experiments/benchmark.py's (defined there, on import),
# with these defaults here:
FLAGS.set_default("models", ["allcnn"])
FLAGS.set_default("variants", ["same_batch", "moments_one_read", "moments_per_seed"])
# XLA's defaults, as the committed census tables were made: configs/allcnn.py and
# densenet.py ask for "graph", whose convolution fusions need cuDNN itself here
# (deviceless_cudnn/) and, for All-CNN-C's, engines cuDNN only builds on a GPU.
FLAGS.set_default("gpu_compile", "xla")
flags.DEFINE_string("target", "h100", "A GPU described in experiments/gpu_targets/ "
                    "(h100, h200).")
flags.DEFINE_enum("batch_norm", "auto", models.batch_norm.CHOICES,
                  "config.batch_norm of the counted steps (auto: what a GPU gets).")
flags.DEFINE_integer("steps", 10, "Steps in the compiled program (a loop; at least 2). "
                     "Kernels are counted per step; those outside the loop, once per "
                     "program, are shown apart.")

def step_hlo(model: str, key: str, placement: placement_lib.Placement,
             batch_norm: str = "auto", steps: int = 10,
             dump_to: str | None = None, gpu_compile: str | None = None) -> str | None:
  """XLA:GPU's optimised HLO of one variant's training program of `steps` steps in a
  loop, as on an accelerator (XLA removes a loop of one step, and with it the layouts
  of the state inside the loop that differ from those outside: count with 2 or more);
  the moments form the variant names, else the accelerators'; the batch norm
  `batch_norm` means on a GPU, unless the variant names one. None where the variant
  does not apply to the model (`benchmark.variant_config`). With `dump_to`, XLA
  writes its dumps of the program there (the thunk sequence among them). XLA's
  options are the model config's config.gpu_compile, or `gpu_compile`."""
  _, fields, overrides = benchmark.TRAIN_VARIANTS[key]
  config, _ = benchmark.load_config(model, "paper", "bfloat16", gpu_compile)
  with config.unlocked():
    config.batch_norm = models.batch_norm.implementation(batch_norm, "gpu")
  config = benchmark.variant_config(config, fields)
  if config is None:  # a variant of another model's field
    return None
  with config.unlocked():
    config.steps_per_dispatch = 1
  data = benchmark.synthetic_data(config, 2048, 32)
  run = build_lib.build(config, data)
  run.step_config = dataclasses.replace(
      run.step_config, **{"moments_form": "one_read", **overrides})
  chunk = hlo.train_chunk(run, placement, steps)
  args = hlo.train_args(run, placement)  # the state in the loop's layout, as a run's
  options = dict(dataclasses.replace(placement, gpu_compile=config.gpu_compile)
                 .compiler_options)
  if dump_to:
    options.update(xla_dump_to=dump_to, xla_dump_hlo_module_re="jit_chunk")
  return jax.jit(chunk, donate_argnums=0).lower(*args).compile(
      compiler_options=options or None).as_text()


def thunk_sequence(dump_dir: str) -> str:
  """The thunk sequence, after XLA's thunk passes, of the one program dumped in
  `dump_dir` (`step_hlo(..., dump_to=dump_dir)`)."""
  found = glob.glob(os.path.join(dump_dir, "*.thunk_sequence_after_thunk_passes.txt"))
  if len(found) != 1:
    raise RuntimeError(f"expected one thunk sequence dumped in {dump_dir}, found "
                       f"{len(found)} (this JAX's XLA may name its dumps otherwise)")
  with open(found[0]) as f:
    return f.read()


def format_markdown(rows: dict[str, dict], target: str, xla_flags: str = "") -> str:
  parts = [p for p in hlo.PARTS if any(p in r["parts"] for r in rows.values())]
  flags_said = f" with `XLA_FLAGS={xla_flags}`" if xla_flags else ""
  lines = [f"Kernels a training step launches, compiled for an {target.upper()} without "
           f"one (`python -m experiments.kernel_census`){flags_said}:", "",
           "| step | kernels a step | " + " | ".join(parts) +
           " | MB a step | host launches a step | of them command buffers "
           "| kernels in them | once a program | compile, s |",
           "| --- | ---: | " + " | ".join("---:" for _ in parts) +
           " | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, r in rows.items():
    launched = r["launched"]
    lines.append(f"| {name} | {r['kernels']} | " + " | ".join(
        f"{r['parts'].get(p, 0):.0f}" for p in parts) +
                 f" | {r['bytes'] / 1e6:,.0f}"
                 f" | {launched['launches']}"
                 f"{' (the loop in a graph)' if launched['loop_in_graph'] else ''}"
                 f" | {launched['graphs']} | {launched['in_graphs']}"
                 f" | {r.get('per_program', {}).get('kernels', 0)} | "
                 f"{r.get('compile_s', float('nan')):.1f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  bad = sorted(set(FLAGS.variants) - set(benchmark.TRAIN_VARIANTS))
  if bad:
    raise app.UsageError(f"--variants: unknown {bad}; valid: "
                         f"{list(benchmark.TRAIN_VARIANTS)}.")
  if FLAGS.steps < 2:
    raise app.UsageError(f"--steps={FLAGS.steps}: count with 2 or more (XLA removes a "
                         "loop of one step, unlike the training program's).")
  placement = hlo.gpu_placement(FLAGS.target)
  for model in FLAGS.models:
    rows, failed = {}, {}
    for key in FLAGS.variants:
      name = f"{model}: {benchmark.TRAIN_VARIANTS[key][0]}"
      t = time.perf_counter()
      with tempfile.TemporaryDirectory() as dump:
        try:
          text = step_hlo(model, key, placement, FLAGS.batch_norm, FLAGS.steps, dump,
                          FLAGS.gpu_compile)
        except jax.errors.JaxRuntimeError as e:  # e.g. a fusion no backend here takes
          failed[name] = hlo.compile_error(str(e))
          print(f"{name}: XLA could not compile it: {failed[name]}", flush=True)
          continue
        if text is None:
          print(f"{name}: skipped, the variant does not apply to {model}", flush=True)
          continue
        compile_s = time.perf_counter() - t
        launched = hlo.launches(thunk_sequence(dump))
      rows[name] = {**hlo.census(text), "compile_s": compile_s, "launched": launched}
      print(f"{name}: {rows[name]['kernels']} kernels a step moving "
            f"{rows[name]['bytes'] / 1e6:,.0f} MB, "
            f"{rows[name]['per_program']['kernels']} a program; the host launches "
            + (f"none a step (the loop and its {launched['thunks']} thunks in a command "
               "buffer); " if launched["loop_in_graph"] else
               f"{launched['launches']} a step ({launched['graphs']} command buffers "
               f"holding {launched['in_graphs']} of its {launched['thunks']} thunks); ")
            + f"traced, lowered and compiled in {compile_s:.1f} s", flush=True)
    print(format_markdown(rows, FLAGS.target, os.environ.get("XLA_FLAGS", "")) +
          "".join(f"\n{name}: XLA could not compile it ({why})\n"
                  for name, why in failed.items()))


if __name__ == "__main__":
  app.run(main)
