"""Where a training step's device time goes: a JAX profiler trace, attributed by scope.

  python -m experiments.profile_step --models=allcnn,wrn --variants=baseline,moments --out=DIR

For each model and variant this builds the real training program as
experiments/benchmark.py does (`benchmark.TrainingVariant`: seeds gathered on device,
expanded, augmented, forward, backward, update; same sizes and defaults: --size=small
and float32 on CPU, the paper's models in bfloat16 elsewhere), warms it up, times a few
programs without the profiler (wall time), then captures a JAX profiler trace of
--programs more. Afterwards, from the captured files alone (the trace's xplane.pb, or
its trace.json.gz, and the program's optimised HLO text saved beside it), it attributes
every executed kernel (GPU) or thunk (XLA:CPU) to a part of the step:

  seed gather       seed_order.seed_indices and the gather from the resident set
  seed expansion    expand_seeds (M copies) and uint8 -> float
  augmentation      augment.augment
  network: convolutions and matmuls   convolution / dot instructions (cuDNN, cuBLAS,
                    fusions holding one), forward and backward
  network: batch norm                 flax BatchNorm_* scopes, forward and backward
  network: other    the rest under the forward pass and its transpose: ReLU, pooling,
                    the classifier's cross-entropy
  invariance loss   losses.grouped_invariance_losses, forward and backward
  optimizer update  TrainState.apply_gradients
  other (in the step program)        no scope: RNG key folding, metrics, loop control
  other (unattributed)               kernels whose HLO instruction is not in the
                    program's HLO text, or that carry no instruction name

How: invjax/steps.py wraps each part in `jax.named_scope`; XLA keeps the scopes in every
HLO instruction's metadata (op_name, "jvp(...)" forward and "transpose(jvp(...))"
backward). A kernel event of the trace names its HLO instruction (stat "hlo_op"; on a
GPU from XLA's thunk annotation, on XLA:CPU from the thunk executor); the instruction's
op_name, or for a fusion the op_names of the instructions fused into it, gives the part.
A fusion that mixes parts (e.g. the loss's gradient fused into a ReLU's) has its time
split in proportion to its instructions of each part, and is listed as mixed.
Time is the events' own time (nested events subtracted), summed over the device's
streams (GPU) or the XLA threads (CPU, where thunks also run in parallel: the sum can
exceed the wall time), divided by the steps traced.

Writes DIR/profile.md and DIR/profile.json after every model (a stopped run keeps the
models it finished): per variant the parts (ms per step, share, forward / backward),
the top --top kernels by time with their part, the launches by duration (under 5, 10,
20, 50 us and over: how much of the step is short kernels, bound by launching them),
the top --top kinds of instruction (the name without XLA's number: input_reduce_fusion,
cudnn-conv-bw-filter, ...) with their launches and mean time, the wall time per step
with and without the profiler, the FLOP floor (analytic FLOPs at the matmul peak,
measured as benchmark.py does or --peak_tflops) against the device time and the
convolution kernels' time, and the achieved TFLOP/s inside the convolution kernels
(analytic FLOPs, benchmark's count; where a convolution's metadata names no direction,
as XLA:CPU's rewritten ones, its time is in the part's total but in neither the fwd nor
the bwd column). The raw trace is deleted; --keep_trace keeps one file per variant
(perfetto_trace.json.gz, for ui.perfetto.dev) if under --max_trace_mb.

If most of a GPU step lands in "other (unattributed)", XLA ran kernels inside CUDA
graphs that name no instruction: rerun with XLA_FLAGS=--xla_gpu_enable_command_buffer=.
XLA 0.11 itself runs its command buffers op by op while a profiler is active (unless
XLA_FLAGS has --xla_enable_command_buffers_during_profiling=true), so the traced
programs launch every kernel on its own: the "with the profiler" wall time then
includes what the CUDA graphs spare the untraced step (experiments/launches.py counts
those launches).
"""

from __future__ import annotations

import collections
import datetime
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import benchmark
from experiments import common
from experiments.hlo import HloIndex, PARTS, UNATTRIBUTED, classify

FLAGS = flags.FLAGS
# --models, --variants, --size, --precision, --steps_per_dispatch, --repeats (programs
# timed without the profiler), --train_images, --peak_tflops (default: measured, as
# there) and --out are experiments/benchmark.py's
# flags (defined there, on import), with these defaults here:
FLAGS.set_default("models", ["allcnn", "wrn"])
FLAGS.set_default("variants", ["baseline", "moments"])
FLAGS.set_default("out", None)
flags.DEFINE_integer("programs", None, "Programs traced per variant, after warm-up and "
                     "--repeats untraced. Default: 2 on CPU, 3 elsewhere.")
flags.DEFINE_integer("top", 15, "Kernels listed per variant.")
flags.DEFINE_bool("keep_trace", False, "Keep each variant's trace as one file, "
                  "OUT/trace_<model>_<precision>_<variant>.json.gz (for "
                  "ui.perfetto.dev), if under --max_trace_mb.")
flags.DEFINE_float("max_trace_mb", 4.0, "Largest trace file kept by --keep_trace.")

# Kernel names of convolutions and products (cuDNN, cuBLAS, CUTLASS), for kernels whose
# instruction is not in the HLO text.
_MATMUL_KERNEL = re.compile(r"gemm|xmma|cutlass|cudnn|conv|fprop|dgrad|wgrad", re.I)


# The trace's events ----------------------------------------------------------------------

def _stat_str(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def _events_xspace(path: str):
  """(plane, line, name, start_ns, duration_ns, stats) of every event of an xplane.pb."""
  data = jax.profiler.ProfileData.from_file(path)
  for plane in data.planes:
    for line in plane.lines:
      for e in line.events:
        yield plane.name, line.name, e.name, e.start_ns, e.duration_ns, dict(e.stats)


def _events_json(path: str):
  """The same from a Chrome-format trace.json.gz (timestamps in microseconds)."""
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  procs, threads = {}, {}
  for e in trace.get("traceEvents", []):
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  for e in trace.get("traceEvents", []):
    if e.get("ph") == "X":
      yield (procs.get(e.get("pid"), ""), threads.get((e.get("pid"), e.get("tid")), ""),
             e.get("name", ""), e["ts"] * 1e3, e.get("dur", 0) * 1e3, e.get("args", {}))


def device_events(trace_dir: str, module: str | None):
  """Kernel/thunk events of `module` in a trace folder: [(hlo_op, kernel name, own ns,
  the op_name its annotation carries or "")].

  GPU: the device planes' stream lines. CPU (no device plane): the host's XLA thunk
  events. Own time = duration minus events nested in it on the same line. Also returns
  the source read and the time of events of other modules (left out)."""
  xplanes = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  jsons = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  events, source, errors = [], None, []
  # The xplane.pb first; the trace.json.gz if it is missing, unreadable or names no
  # instruction.
  for reader, paths, name in ((_events_xspace, xplanes, "xplane.pb"),
                              (_events_json, jsons, "trace.json.gz")):
    if not paths:
      continue
    try:
      events, source = list(reader(paths[0])), name
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"{name}: {e!r}")
      continue
    if any("hlo_op" in e[5] for e in events):
      break
  if source is None:
    raise RuntimeError(f"no readable trace in {trace_dir}: {errors or 'no files'}")
  with_op = [e for e in events if "hlo_op" in e[5]]
  on_device = [e for e in with_op if e[0].startswith("/device:")]
  if on_device:
    streams = [e for e in on_device if e[1].startswith("Stream")]
    with_op, where = streams or on_device, "device"
  elif any(e[0].startswith("/device:") for e in events):
    where = ("host annotations: the device plane has no kernel events naming an HLO "
             "instruction, so these are launch times, not device time")
  else:
    where = "host (XLA:CPU thunks)"
  lines = collections.defaultdict(list)
  for e in with_op:
    lines[(e[0], e[1])].append(e)
  out, other_ns = [], 0.0
  for evs in lines.values():
    evs.sort(key=lambda e: (e[3], -e[4]))
    own = [float(e[4]) for e in evs]
    stack = []  # indices of enclosing events
    for i, e in enumerate(evs):
      while stack and evs[stack[-1]][3] + evs[stack[-1]][4] <= e[3]:
        stack.pop()
      if stack:
        own[stack[-1]] -= float(e[4])
      stack.append(i)
    for e, ns in zip(evs, own):
      mod = _stat_str(e[5].get("hlo_module", ""))
      if module and mod and mod != module:
        other_ns += ns
        continue
      # XLA:GPU's kernel annotation also carries the op_name (past the module's
      # common prefix) as "name": the fallback for instructions not in the HLO text.
      hint = _stat_str(e[5].get("name", ""))
      if hint and e[5].get("prefix"):
        hint = _stat_str(e[5]["prefix"]) + "/" + hint
      out.append((_stat_str(e[5]["hlo_op"]), e[2], max(ns, 0.0), hint))
  return out, {"source": source, "events_from": where, "other_modules_ms": other_ns / 1e6}


# Launch durations, in microseconds: how a step's time splits between many short
# kernels (bound by launching them) and fewer long ones.
DURATION_BINS_US = (5, 10, 20, 50)


def kind(op: str) -> str:
  """An HLO instruction's kind: its name without the number XLA appends
  ("input_reduce_fusion.12" -> "input_reduce_fusion", "cudnn-conv-bw-filter.3" ->
  "cudnn-conv-bw-filter")."""
  return re.sub(r"(\.\d+)+$", "", op) or op


def attribute(events, index: HloIndex, steps: int, top: int = 15) -> dict:
  """Per-step time of each part (and forward/backward), the top instructions, the
  kinds of instruction by time and the launches by duration."""
  parts = {p: {"ms": 0.0, "forward_ms": 0.0, "backward_ms": 0.0} for p in PARTS}
  per_op = collections.defaultdict(lambda: {"ns": 0.0, "count": 0, "kernels": set()})
  edges = [b * 1e3 for b in DURATION_BINS_US]  # ns
  bins = [{"launches": 0, "ns": 0.0} for _ in range(len(edges) + 1)]
  for op, kernel, ns, *hint in events:
    o = per_op[op]
    o["ns"] += ns
    o["count"] += 1
    o["kernels"].add(kernel)
    o["hint"] = o.get("hint") or (hint[0] if hint else "")
    b = bins[sum(ns >= e for e in edges)]
    b["launches"] += 1
    b["ns"] += ns
  total = 0.0
  unmatched = by_annotation = loss_ops = 0
  loss_ops_ms = 0.0  # every kernel with any instruction of the loss, whole
  for op, o in per_op.items():
    split = index.split(op)
    if split is None and o["hint"]:
      matmul = any(_MATMUL_KERNEL.search(k) for k in o["kernels"])
      split = {classify(o["hint"], matmul): 1.0}
      by_annotation += 1
    elif split is None:
      split = {(UNATTRIBUTED, ""): 1.0}
      unmatched += 1
    o["split"] = split
    ms = o["ns"] / 1e6 / steps
    total += ms
    if any(part == "invariance loss" for part, _ in split):
      loss_ops += 1
      loss_ops_ms += ms
    for (part, direction), frac in split.items():
      parts[part]["ms"] += ms * frac
      if direction:
        parts[part][direction + "_ms"] += ms * frac
  for p in parts.values():
    p["share"] = p["ms"] / total if total else 0.0
  ranked = sorted(per_op.items(), key=lambda kv: -kv[1]["ns"])[:top]
  top_ops = []
  for op, o in ranked:
    split = sorted(o["split"].items(), key=lambda kv: -kv[1])
    label = " / ".join(f"{p}{' ' + d if d else ''}"
                       + (f" {f:.0%}" if len(split) > 1 else "") for (p, d), f in split)
    ins = index.instrs.get(op, {})
    top_ops.append({"hlo_op": op, "opcode": ins.get("opcode", "?"),
                    "kernels": sorted(o["kernels"])[:2], "part": label,
                    "ms": o["ns"] / 1e6 / steps, "share": o["ns"] / 1e6 / steps / total,
                    "launches_per_step": o["count"] / steps})
  kinds = collections.defaultdict(lambda: {"ns": 0.0, "count": 0, "instructions": 0})
  for op, o in per_op.items():
    (part, direction), _ = max(o["split"].items(), key=lambda kv: kv[1])
    k = kinds[(kind(op), part + (" " + direction if direction else ""))]
    k["ns"] += o["ns"]
    k["count"] += o["count"]
    k["instructions"] += 1
  by_kind = [{"kind": name, "part": part, "instructions": k["instructions"],
              "launches_per_step": k["count"] / steps, "ms": k["ns"] / 1e6 / steps,
              "share": k["ns"] / 1e6 / steps / total if total else 0.0,
              "us_per_launch": k["ns"] / 1e3 / k["count"]}
             for (name, part), k in sorted(kinds.items(), key=lambda kv: -kv[1]["ns"])]
  lows = (0,) + DURATION_BINS_US
  highs = DURATION_BINS_US + (None,)
  durations = [{"from_us": lo, "to_us": hi, "launches_per_step": b["launches"] / steps,
                "ms": b["ns"] / 1e6 / steps,
                "share": b["ns"] / 1e6 / steps / total if total else 0.0}
               for lo, hi, b in zip(lows, highs, bins)]
  return {"total_ms": total, "parts": parts, "top": top_ops,
          "kinds": by_kind[:top], "kinds_total": len(by_kind), "durations": durations,
          "launches_per_step": sum(o["count"] for o in per_op.values()) / steps,
          "instructions": len(per_op), "unmatched_instructions": unmatched,
          "attributed_by_annotation": by_annotation,
          "loss_kernels": loss_ops, "loss_kernels_ms": loss_ops_ms}


def analyse(trace_dir: str, hlo_path: str, steps: int, top: int = 15) -> dict:
  """The attribution of a captured trace folder, from its files alone."""
  with open(hlo_path) as f:
    index = HloIndex(f.read())
  events, info = device_events(trace_dir, index.module)
  if not events:
    raise RuntimeError(f"the trace in {trace_dir} has no kernel events of "
                       f"{index.module} carrying an hlo_op")
  result = attribute(events, index, steps, top)
  result.update(info, module=index.module, steps=steps)
  return result


# Capture ------------------------------------------------------------------------------

def _dir_mb(path: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
             for f in fs) / 2**20


def profile_variant(config, data, key: str, spd: int, programs: int, wall_repeats: int,
                    trace_dir: str, top: int = 15, perfetto: bool = False) -> dict:
  """Builds, warms up and times variant `key`, traces `programs` programs into
  `trace_dir` (with a perfetto_trace.json.gz if `perfetto`) and attributes the trace."""
  name, fields, step_overrides = benchmark.TRAIN_VARIANTS[key]
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for k, v in fields.items():
      c[k] = v
  t = time.perf_counter()
  v = benchmark.TrainingVariant(c, data, step_overrides, spd)  # compiles, warms up
  build_s = time.perf_counter() - t
  for _ in range(wall_repeats):
    v.run_once()
  wall_ms = float(np.median(v.times)) / spd * 1e3
  v.times = []
  os.makedirs(trace_dir, exist_ok=True)
  with open(os.path.join(trace_dir, "program.hlo.txt"), "w") as f:
    f.write(v.programs.compiled[spd].as_text())
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # no Python frames: a smaller trace, less overhead
  options.enable_hlo_proto = False  # the HLO text is saved above
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=perfetto,
                           profiler_options=options)
  try:
    for _ in range(programs):
      v.run_once()
  finally:
    jax.profiler.stop_trace()
  traced_ms = float(np.median(v.times)) / spd * 1e3
  t = time.perf_counter()
  result = analyse(trace_dir, os.path.join(trace_dir, "program.hlo.txt"),
                   programs * spd, top)
  conv = result["parts"]["network: convolutions and matmuls"]["ms"]
  result.update(
      name=name, copies=c.copies, alpha=c.alpha, loss_method=c.loss_method,
      wall_ms_per_step=wall_ms, traced_wall_ms_per_step=traced_ms,
      build_s=build_s, analyse_s=time.perf_counter() - t,
      analytic_flops_per_step=v.analytic_flops,
      conv_tflops=v.analytic_flops / (conv / 1e3) / 1e12 if conv else None,
      trace_mb=_dir_mb(trace_dir))
  return result


# Output ---------------------------------------------------------------------------------

def format_markdown(result: dict) -> str:
  lines = common.report_header("invjax step profile", result) + [
      f"Steps per program: {result['steps_per_dispatch']}; {result['programs']} programs "
      "traced per variant after warm-up. Time per step is the kernels' (GPU) or XLA:CPU "
      "thunks' own time, summed over streams or threads (on CPU thunks run in parallel, "
      "so the sum can exceed the wall time), divided by the steps traced; each kernel is "
      "put in a part by the named scopes of its HLO instruction (a fusion of several "
      "parts is split by its instructions). Wall: median time per step without the "
      "profiler (and with it).  ",
  ]
  for r in result["models"]:
    size = (" (size small: " + ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
            + ")") if r["overrides"] else ""
    names = list(r["variants"])
    vs = [r["variants"][n] for n in names]
    lines += ["", f"## {r['model']}, {r['precision']}{size}: batch {r['batch_size']}", "",
              "| part (ms per step) | " + " | ".join(
                  f"{n} | fwd | bwd | share" for n in names) + " |",
              "| --- |" + " ---: | ---: | ---: | ---: |" * len(names)]
    for part in PARTS:
      cells = []
      for v in vs:
        p = v["parts"][part]
        fb = [f"{p['forward_ms']:.3f}" if p["forward_ms"] else "",
              f"{p['backward_ms']:.3f}" if p["backward_ms"] else ""]
        cells.append(f"{p['ms']:.3f} | {fb[0]} | {fb[1]} | {p['share']:.1%}")
      lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| **total (device)** | " + " | ".join(
        f"**{v['total_ms']:.3f}** | | | 100%" for v in vs) + " |")
    lines.append("| wall, no profiler (traced) | " + " | ".join(
        f"{v['wall_ms_per_step']:.3f} ({v['traced_wall_ms_per_step']:.3f}) | | |"
        for v in vs) + " |")
    lines.append("")
    for n, v in zip(names, vs):
      tf = f"{v['conv_tflops']:.2f}" if v["conv_tflops"] else "n/a"
      lines.append(
          f"{n}: M = {v['copies']}, alpha = {v['alpha']}, {v['instructions']} HLO "
          f"instructions ran, {v['unmatched_instructions']} not found in the program's "
          f"HLO (their time is 'other (unattributed)'), "
          f"{v.get('attributed_by_annotation', 0)} not found but placed by the "
          f"op_name of their kernel annotation; events from "
          f"{v['events_from']} ({v['source']}); other programs in the trace: "
          f"{v['other_modules_ms']:.2f} ms left out. Analytic "
          f"{v['analytic_flops_per_step'] / 1e9:,.1f} GFLOP/step over the convolution "
          f"and matmul kernels' time: {tf} TFLOP/s. "
          + (f"Kernels holding any instruction of the loss: {v['loss_kernels']}, "
             f"{v['loss_kernels_ms']:.3f} ms/step whole (the loss's part counts only "
             "its instructions' share of the mixed ones). " if v.get("loss_kernels")
             else "") +
          f"Compile + warm-up "
          f"{v['build_s']:.1f} s, trace {v['trace_mb']:.1f} MB.  ")
    peak = result.get("peak_tflops", {}).get(r["precision"])
    if peak:
      floors = []
      for n, v in zip(names, vs):
        floor_ms = v["analytic_flops_per_step"] / (peak * 1e12) * 1e3
        conv_ms = v["parts"]["network: convolutions and matmuls"]["ms"]
        floors.append(f"{n} {floor_ms:.3f} ms/step; the device time "
                      f"{v['total_ms'] / floor_ms:.2f} x that, the convolution and "
                      f"matmul kernels {conv_ms / floor_ms:.2f} x")
      lines.append(f"FLOP floor (the analytic FLOPs at the {r['precision']} matmul "
                   f"peak, {peak:.1f} TFLOP/s, {result['peak_source']}): "
                   + "; ".join(floors) + ".  ")
    for n, err in r.get("failed", {}).items():
      lines.append(f"{n}: not attributed: {err}  ")
    if any(v["parts"][UNATTRIBUTED]["share"] > 0.1 for v in vs):
      lines.append("Over 10 % of a variant's time is unattributed: kernels that name no "
                   "HLO instruction of the program (on a GPU, CUDA graphs hide theirs: "
                   "rerun with XLA_FLAGS=--xla_gpu_enable_command_buffer=).  ")
    for n, v in zip(names, vs):
      if "durations" in v:  # profiles written before these tables lack them
        lines += ["", f"### {r['model']} {n}: {v['launches_per_step']:,.0f} launches a "
                  f"step, by duration", "",
                  "| launch | launches/step | ms/step | share |",
                  "| --- | ---: | ---: | ---: |"]
        for d in v["durations"]:
          span = (f"{d['from_us']}-{d['to_us']} us" if d["to_us"] else
                  f">= {d['from_us']} us")
          lines.append(f"| {span} | {d['launches_per_step']:,.1f} | {d['ms']:.3f} | "
                       f"{d['share']:.1%} |")
        lines += ["", f"### {r['model']} {n}: top {len(v['kinds'])} of "
                  f"{v['kinds_total']} kinds of instruction (the name without its "
                  "number) by time, each in its main part", "",
                  "| kind | part | instructions | launches/step | ms/step | share | "
                  "us/launch |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for k in v["kinds"]:
          lines.append(f"| {k['kind']} | {k['part']} | {k['instructions']} | "
                       f"{k['launches_per_step']:g} | {k['ms']:.3f} | {k['share']:.1%} "
                       f"| {k['us_per_launch']:.1f} |")
      lines += ["", f"### {r['model']} {n}: top {len(v['top'])} HLO instructions", "",
                "| instruction | opcode | kernel | part | ms/step | share | launches/step |",
                "| --- | --- | --- | --- | ---: | ---: | ---: |"]
      for o in v["top"]:
        kernel = ", ".join(k[:60] for k in o["kernels"])
        lines.append(f"| {o['hlo_op']} | {o['opcode']} | {kernel} | {o['part']} | "
                     f"{o['ms']:.3f} | {o['share']:.1%} | {o['launches_per_step']:g} |")
  return "\n".join(lines) + "\n"


def write(result: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "profile.md"), "w") as f:
    f.write(format_markdown(result))
  with open(os.path.join(out, "profile.json"), "w") as f:
    json.dump(result, f, indent=2)


def main(argv):
  del argv
  on_cpu = jax.default_backend() == "cpu"
  pick = lambda value, cpu, acc: value if value is not None else (cpu if on_cpu else acc)
  size = pick(FLAGS.size, "small", "paper")
  precisions = pick(FLAGS.precision, ["float32"], ["bfloat16"])
  spd = pick(FLAGS.steps_per_dispatch, 1, 10)
  programs = pick(FLAGS.programs, 2, 3)
  wall_repeats = pick(FLAGS.repeats, 3, 10)
  n_train = pick(FLAGS.train_images, 512, 50_000)
  if not FLAGS.out:
    raise app.UsageError("--out: give a folder for profile.md and profile.json.")
  bad = sorted(set(FLAGS.variants) - set(benchmark.TRAIN_VARIANTS))
  if bad:
    raise app.UsageError(f"--variants: unknown {bad}; valid here: "
                         f"{list(benchmark.TRAIN_VARIANTS)}.")
  bad = sorted(set(precisions) - {"float32", "bfloat16"})
  if bad:
    raise app.UsageError(f"--precision: unknown {bad}; valid: float32, bfloat16.")
  unknown = [m for m in FLAGS.models
             if not os.path.exists(os.path.join(common.ROOT, "configs", f"{m}.py"))]
  if unknown:
    raise app.UsageError(f"--models: no configs/<name>.py for {unknown}.")
  if min(spd, programs, wall_repeats, n_train) < 1:
    raise app.UsageError("--steps_per_dispatch, --programs, --repeats and "
                         "--train_images must be at least 1.")
  dtypes = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}
  peaks = {p: FLAGS.peak_tflops or benchmark.measure_peak_tflops(dtypes[p])
           for p in precisions}
  result = {"command": " ".join(["python", "-m", "experiments.profile_step",
                                 *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "hardware": common.hardware(), "steps_per_dispatch": spd,
            "programs": programs, "train_images": n_train, "parts": list(PARTS),
            "peak_tflops": peaks,
            "peak_source": "given" if FLAGS.peak_tflops else "measured here",
            "models": []}
  for precision, model in [(p, m) for p in precisions for m in FLAGS.models]:
    config, overrides = benchmark.load_config(model, size, precision, FLAGS.gpu_compile)
    data = benchmark.synthetic_data(config, n_train, 1)
    entry = {"model": model, "precision": precision, "size": size,
             "overrides": overrides, "batch_size": config.batch_size, "variants": {}}
    result["models"].append(entry)
    for key in FLAGS.variants:
      print(f"  {model} {precision}: {key} ...", flush=True)
      tmp = tempfile.mkdtemp(prefix=f"profile_{model}_{key}_")
      try:
        try:
          r = profile_variant(config, data, key, spd, programs, wall_repeats, tmp,
                              FLAGS.top, perfetto=FLAGS.keep_trace)
        except RuntimeError as e:  # a trace without kernel events: say so, go on
          name = benchmark.TRAIN_VARIANTS[key][0]
          entry["failed"] = {**entry.get("failed", {}), name: repr(e)}
          write(result, FLAGS.out)
          print(f"  {model} {name}: no attribution: {e}", flush=True)
          continue
        if FLAGS.keep_trace:  # one file: the window returns at most 8
          kept = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"),
                           recursive=True)
          mb = os.path.getsize(kept[0]) / 2**20 if kept else float("inf")
          if mb <= FLAGS.max_trace_mb:
            dest = os.path.join(FLAGS.out, f"trace_{model}_{precision}_{key}.json.gz")
            shutil.copyfile(kept[0], dest)
            r["trace_kept"] = dest
          else:
            print(f"  perfetto trace of {mb:.1f} MB not kept (--max_trace_mb="
                  f"{FLAGS.max_trace_mb:g})", flush=True)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
      entry["variants"][r["name"]] = r
      print(f"  {model} {r['name']}: {r['total_ms']:.3f} ms/step on the device "
            f"(wall {r['wall_ms_per_step']:.3f}); " + ", ".join(
                f"{p} {v['ms']:.3f}" for p, v in r["parts"].items() if v["ms"]),
            flush=True)
      write(result, FLAGS.out)  # what is finished survives a stopped run
    print(f"wrote {FLAGS.out}/profile.md and profile.json ({model})", flush=True)
  print(format_markdown(result))


if __name__ == "__main__":
  app.run(main)
