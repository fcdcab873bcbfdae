"""A config's programs compiled for a Cloud TPU slice without one: whether they
compile, whether they fit, what the chips exchange.

  pip install "libtpu==0.0.42.*"   # the version jax[tpu] pins for this JAX (0.10.2)
  python -m experiments.tpu_compile --topology=v5e:2x4 --configs=allcnn,wrn,densenet
  python -m experiments.tpu_compile --topology=v5e:4x4 --configs=densenet --out=DIR/t

The design card's target is Cloud TPU, which this repository has never had. libtpu
(JAX's TPU compiler) compiles for a slice named by its topology without its chips
(`jax.experimental.topologies`). For each config and variant this builds the run as
`python -m invjax.main` would build it on that slice (`build.build(..., devices=...)`:
the fused batch norm, the one-read moments form, the loss split over the chips, an
accelerator's steps per dispatch; the data-parallel mesh over every chip,
`placement.Placement.create(devices=...)`), on stand-in data of the config's data
set's shape and size (zeros: only shapes matter; the training set resident on every
chip, as a run keeps it), and compiles its training program (`steps.make_train_chunk`:
the steps per dispatch in a loop, the state in the loop's layout, each chip gathering
its own seeds), its evaluation program, the two programs of `--mode=analyze`
(`analyze.scorer`: the clean images' layer statistics, then every layer's scores of
the transformed copies) and `--mode=robustness`'s PGD attack, each on a batch as the
run passes it (`--programs` picks some). Per program:

  - whether XLA compiles it, or its error; a config the slice cannot run (e.g. fewer
    seed images a batch than chips) stops at the config check, as a run would;
  - this machine's trace, lower and compile seconds;
  - memory per chip, from XLA's memory analysis (arguments, outputs, temporaries and
    code; outputs aliased to donated arguments counted once), against the chip's HBM;
  - the collective operations of the optimised program (data parallelism needs
    all-reduces only: sums of gradients and statistics, never a batch's images);
  - per step and device, XLA's cost analysis of the training program (on a TPU it
    counts the convolutions; the loop's body once, so per step): its FLOPs, and the
    floor the chip's peak sets on the step (a floor from a count, not a timing);
  - the bytes the program spends changing layouts (copies, transposes, reshapes that
    are not views), per step by part of the step and once per program (the analysis
    programs: all of a batch's, loops as often as they run): a TPU stores
    an array's two minor axes in tiles, laid out for the convolutions, so that a
    reshape which is free on a CPU or GPU (row-major) can be a copy there.

What it cannot say: how fast anything runs (nothing runs). Of the analysis, only the
programs a batch runs are built: not the corruptions' scoring (`--corruptions`), nor
the merging of statistics between batches (small).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, Sequence

# Before JAX starts: this compiles for the TPU and runs on the CPU; libtpu should not
# ask a metadata server (there is none off Cloud TPU) which TPU it is on, nor take the
# lock that keeps a second process off a TPU's chips (it uses none).
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import hlo
from experiments import paper
from invjax import analysis
from invjax import analyze as analyze_lib
from invjax import build as build_lib
from invjax import config_lib
from invjax import errors
from invjax import input_pipeline
from invjax import placement as placement_lib
from invjax import robustness
from invjax import steps as steps_lib

FLAGS = flags.FLAGS

# Per chip, as Google Cloud publishes them: peak bfloat16 TFLOP/s, HBM GB/s, HBM GiB.
# A device is a chip, or on TPU v4 described without megacore one of its 2 cores
# (`devices_per_chip`): it gets its share.
CHIPS = {"TPU v4": (275, 1228, 32), "TPU v5 lite": (197, 819, 16),
         "TPU v5": (459, 2765, 95), "TPU v6 lite": (918, 1640, 32)}
# The data sets the configs name: (training, test) images.
DATA_SIZES = {"cifar10": (50_000, 10_000), "tiny_imagenet": (100_000, 10_000)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
# "train": the steps of a dispatch; "eval": a test batch's metrics; "score": the two
# passes of --mode=analyze over a batch ("score_stats", the clean images' layer
# statistics; "score", every layer's scores of the transformed copies); "attack": PGD
# on a batch, as --mode=robustness runs it (robustness.Settings()'s steps).
PROGRAMS = ("train", "eval", "score", "attack")
ANALYSIS_PROGRAMS = ("score_stats", "score", "attack")  # the compiled programs' names


def define_flags():
  """The flags, defined only when run as a program (tests import this module)."""
  flags.DEFINE_string("topology", "v5e:2x4", "A TPU slice as libtpu names it: "
                      "v5e:2x4 (8 v5e chips), v5e:4x4, v6e:2x4, v5p:2x2x1, v4:2x2x1.")
  flags.DEFINE_list("configs", ["allcnn", "wrn", "densenet"], "Config files in configs/.")
  flags.DEFINE_list("variants", ["baseline", "invariance"], "Their variants.")
  flags.DEFINE_multi_string("set", [], "FIELD=VALUE override of every config, e.g. "
                            "--set batch_size=256.")
  flags.DEFINE_list("programs", list(PROGRAMS), f"Which of {list(PROGRAMS)} to compile.")
  flags.DEFINE_string("out", None, "Output path without extension (OUT.md, OUT.json); "
                      "default: only print.")


def topology_devices(name: str) -> list:
  """The devices of the TPU slice `name` (e.g. "v5e:2x4"), compile-only."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise app.UsageError(
        f"--topology={name}: libtpu could not describe it ({first}). It needs libtpu "
        f"as jax[tpu] pins it for jax {jax.__version__} (pip install 'jax[tpu]', or "
        "pip install libtpu==<that version>) and a name as libtpu spells it: v5e:2x4, "
        "v6e:2x4, v5p:2x2x1, v4:2x2x1.") from e


def devices_per_chip(devices: Sequence[Any]) -> int:
  """Devices that share a chip (its coordinates): 2 for a v4 described by cores."""
  coords = [tuple(getattr(d, "coords", ()) or (d.id,)) for d in devices]
  return max(1, len(devices) // len(set(coords)))


def stand_in_data(config) -> input_pipeline.Dataset:
  """Zeros of the config's data set's shape and size (DATA_SIZES; a path: CIFAR-10's
  sizes), labels cycling through the classes. np.zeros takes no memory until written."""
  n_train, n_test = DATA_SIZES.get(config.dataset, DATA_SIZES["cifar10"])
  shape, classes = tuple(config.image_shape), config.num_classes
  if not shape or not classes:
    raise app.UsageError(f"config.dataset={config.dataset!r} declares no image_shape "
                         "or num_classes: set them (--set) to compile without the data.")
  labels = lambda n: (np.arange(n) % classes).astype(np.int32)
  return input_pipeline.Dataset(
      "stand-in", np.zeros((n_train, *shape), np.uint8), labels(n_train),
      np.zeros((n_test, *shape), np.uint8), labels(n_test), num_classes=classes)


def lowered_programs(run: build_lib.Run, placement: placement_lib.Placement,
                     which: Sequence[str] = PROGRAMS) -> dict:
  """{name: program lowered for `placement`'s devices} of the programs in `which`
  (PROGRAMS), on the shapes and shardings a run passes them."""
  out = {}
  if {"train", "eval"} & set(which):
    args = hlo.train_args(run, placement)
  if "train" in which:
    chunk = hlo.train_chunk(run, placement, run.steps_per_dispatch)
    out["train"] = jax.jit(chunk, donate_argnums=0, out_shardings=(
        placement.replicated, placement.replicated)).lower(*args)
  x = run.data.x_test
  split = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                    sharding=placement.batch)
  rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                  sharding=placement.replicated)
  def batch(size):  # images, labels and the mask of padding, split over the devices
    return (split((size, *x.shape[1:]), x.dtype), split((size,), jnp.int32),
            split((size,), jnp.float32))
  n = placement.mesh.size
  if "eval" in which:  # a test batch, as TestBatches has it
    size = placement_lib.device_multiple(run.config.eval_batch_size, n)
    out["eval"] = jax.jit(steps_lib.make_eval_step(run.step_config.top5),
                          out_shardings=placement.replicated).lower(args[0], *batch(size))
  # Scoring and attacks take the state as checkpoints keep it (not the loop's layout).
  if {"score", "attack"} & set(which):
    state = hlo.state_args(run, placement)
  if "score" in which:  # a batch as analyze.batches pads it: up to a multiple of n
    scorer = analyze_lib.scorer(run.config, run)
    scored = analysis.Batch(*batch(placement_lib.padded_to_devices(
        run.config.analysis.batch_size, n)))
    out["score_stats"] = scorer.stats_program.lower(state, scored)
    stats = jax.eval_shape(scorer.stats_program, state, scored)[0]
    out["score"] = scorer.scores_program.lower(
        state, jax.tree.map(lambda a: rep(a.shape, a.dtype), stats), scored,
        rep((), jax.random.key(0).dtype))
  if "attack" in which:  # a batch as robustness.attack_accuracy's TestBatches has it
    size = placement_lib.device_multiple(run.config.analysis.batch_size, n)
    settings = robustness.Settings()
    pgd = robustness.make_attack_program("pgd", run.step_config.top5,
                                         settings.pgd_steps)
    out["attack"] = pgd.lower(state, *batch(size), rep((), jnp.float32),
                              rep((), jnp.float32), rep((), jax.random.key(0).dtype))
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{operation: {"count": n, "largest_bytes": of the largest result}} of the
  collective operations in an optimised program: what the devices exchange. A
  data-parallel step exchanges sums (gradients, statistics), never a batch's images;
  XLA may exchange a small sum as an all-gather of each device's part (WRN-28-10's
  batch-norm statistics on a TPU: [8, 1, 640] float32)."""
  out = {}
  for op in COLLECTIVES:
    shapes = re.findall(rf"=\s*(\S+(?:\s\S+)*?)\s{op}(?:-start)?\(", hlo_text)
    if shapes:
      out[op] = {"count": len(shapes),
                 "largest_bytes": max(hlo.shape_bytes(s) for s in shapes)}
  return out


# Operations that only move data from one layout to another (on a TPU an array's two
# minor dimensions are stored in tiles, so a reshape across them is a copy).
RELAYOUTS = ("copy", "transpose", "reshape")


def relayout_bytes(hlo_text: str) -> dict[str, Any]:
  """Bytes (read and written, `hlo.kernel_bytes`) of the relayouts (RELAYOUTS) an
  optimised program executes: "step", in its loops' bodies (per step; all of them if
  it has no loop), "program", once per program outside them, "step_by_part": the
  step's by part of the step (`hlo.PARTS`, from invjax/steps.py's named scopes), and
  "execution": all that one execution moves, each loop's as often as XLA's known trip
  count says (`hlo.executions`)."""
  index, step_kernels, program_kernels = hlo.step_and_program_kernels(hlo_text)
  relayouts = lambda names: [n for n in names if index.instrs[n]["opcode"] in RELAYOUTS]
  runs = hlo.executions(index, hlo.entry_computation(hlo_text))
  out = {"step": 0, "program": sum(hlo.kernel_bytes(index, n)
                                   for n in relayouts(program_kernels)),
         "step_by_part": {},
         "execution": sum(hlo.kernel_bytes(index, n) * times
                          for n, times in runs.items()
                          if index.instrs[n]["opcode"] in RELAYOUTS)}
  for name in relayouts(step_kernels):
    moved = hlo.kernel_bytes(index, name)
    out["step"] += moved
    for (part, _), share in index.split(name).items():
      out["step_by_part"][part] = out["step_by_part"].get(part, 0) + share * moved
  return out


def _first(analysis):
  return analysis[0] if isinstance(analysis, (list, tuple)) else (analysis or {})


def inspect(compiled) -> dict[str, Any]:
  """What a compiled program says of itself: memory per device (bytes), XLA's counts
  (per execution of a loop's body) and its collectives."""
  m = compiled.memory_analysis()
  memory = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "code": m.generated_code_size_in_bytes}
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                     + memory["temporaries"] + memory["code"])
  # XLA's own peak of live buffers. On a TPU the sum above can undercount: XLA reports
  # no temporaries at all for the evaluation and PGD programs, whose peaks are 7 and 9
  # times their arguments (All-CNN-C, 8 v5e chips); the tables give the larger
  # (`program_memory`).
  memory["peak"] = getattr(m, "peak_memory_in_bytes", 0)
  cost = _first(compiled.cost_analysis())
  text = compiled.as_text()
  return {"memory": memory, "flops": float(cost.get("flops", 0.0)),
          "bytes": float(cost.get("bytes accessed", 0.0)),
          "relayout_bytes": relayout_bytes(text), "collectives": collectives(text)}


def program_memory(program: dict) -> float:
  """A compiled program's memory a device: the larger of the sum of its parts and
  XLA's peak of live buffers (`inspect`)."""
  return max(program["memory"]["total"], program["memory"].get("peak", 0))


def floors(record: dict, device_kind: str, per_chip: int) -> dict[str, float] | None:
  """A device's share of its chip: "compute_ms", the ms its share of the chip's peak
  needs for the training program's FLOPs a step, and "hbm_gib", its HBM (None: chip
  unknown). No floor from XLA's bytes: it charges the seed gather the whole training
  set, of which a step reads a few images."""
  if device_kind not in CHIPS:
    return None
  tflops, _, gib = CHIPS[device_kind]
  return {"compute_ms": record["flops"] / (tflops * 1e12 / per_chip) * 1e3,
          "hbm_gib": gib / per_chip}


def check(config, name: str, devices: Sequence[Any],
          programs: Sequence[str] = PROGRAMS) -> dict[str, Any]:
  """The record of one config on `devices`: the run's settings, then per program
  (`programs`, of PROGRAMS) whether and how it compiled (`inspect`), or the error that
  stopped it."""
  record: dict[str, Any] = {"config": name, "devices": len(devices),
                            "device_kind": devices[0].device_kind}
  try:
    run = build_lib.build(config, stand_in_data(config), devices=devices)
  except (errors.ConfigError, ValueError) as e:
    record["error"] = str(e)
    return record
  placement = placement_lib.Placement.create(devices=devices)
  k = config.batch_size // config.copies
  record.update(batch_size=config.batch_size, seeds_per_device=k // len(devices),
                steps_per_dispatch=run.steps_per_dispatch,
                batch_norm=getattr(run.model, "batch_norm", None),
                moments_form=run.step_config.moments_form,
                precision="bfloat16" if config.half_precision else "float32",
                scoring_batch=config.analysis.batch_size,
                scored_copies=config.analysis.num_transforms,
                pgd_steps=robustness.Settings().pgd_steps, programs={})
  t = time.perf_counter()
  lowered = lowered_programs(run, placement, programs)
  record["trace_lower_s"] = time.perf_counter() - t
  for program, low in lowered.items():
    t = time.perf_counter()
    try:
      compiled = low.compile()
    except Exception as e:  # pylint: disable=broad-except  # XLA's errors vary in type
      record["programs"][program] = {"error": str(e).splitlines()[0][:500]}
      continue
    record["programs"][program] = {"compile_s": time.perf_counter() - t,
                                   **inspect(compiled)}
  train = record["programs"].get("train", {})
  if "flops" in train:
    record["floors"] = floors(train, record["device_kind"], devices_per_chip(devices))
  return record


def _gb(n: float) -> str:
  return f"{n / 2**30:.2f}"


def _exchanges(found: dict) -> str:
  """"all-reduce x21 (<= 5.5 MB), ..." of `collectives`."""
  size = lambda n: (f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB" if n >= 1e3
                    else f"{n} B")
  return ", ".join(f"{op} x{c['count']} (<= {size(c['largest_bytes'])})"
                   for op, c in found.items())


def format_markdown(records: list[dict], topology: str) -> str:
  lines = [f"Programs compiled for a TPU slice `{topology}` without one "
           f"(`python -m experiments.tpu_compile`, jax {jax.__version__}); memory per "
           "device in GiB (the larger of XLA's peak of live buffers and the sum of "
           "arguments, outputs, temporaries and code), XLA's counts per training step "
           "and device; the floor from a count, not a timing:", ""]
  training = [r for r in records if "error" in r or {"train", "eval"} & set(r["programs"])]
  if training:
    lines += ["| config | devices | compiled (this CPU, s) | train memory / HBM | eval "
              "memory | collectives a step | GFLOP a step | compute floor, ms | relayouts "
              "a step, MB (the loss's) | relayouts a program, MB |",
              "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
  for r in training:
    head = f"| {r['config']} | {r['devices']} {r['device_kind']}"
    if "error" in r:
      lines.append(f"{head} | not run: {' '.join(r['error'].split())} | | | | | | | |")
      continue
    progs = r["programs"]
    said = _compiled(progs, ("train", "eval"))
    train, ev, fl = progs.get("train", {}), progs.get("eval", {}), r.get("floors") or {}
    train_memory = (f"{_gb(program_memory(train))} / {fl.get('hbm_gib', math.nan):.0f}"
                    if "memory" in train else "")
    moved = train.get("relayout_bytes", {})
    loss = moved.get("step_by_part", {}).get("invariance loss", 0)
    lines.append(
        f"{head} | {said} | {train_memory} | "
        f"{_gb(program_memory(ev)) if 'memory' in ev else ''} | "
        f"{_exchanges(train.get('collectives', {}))} | "
        f"{train.get('flops', math.nan) / 1e9:.1f} | "
        f"{fl.get('compute_ms', math.nan):.2f} | "
        f"{moved.get('step', math.nan) / 1e6:.0f} ({loss / 1e6:.0f}) | "
        f"{moved.get('program', math.nan) / 1e6:.0f} |")
  analysis_rows = [r for r in records if "error" not in r and any(
      p in r["programs"] for p in ANALYSIS_PROGRAMS)]
  if analysis_rows:
    if training:
      lines.append("")
    lines += ["The analysis programs on the same slice, a batch each (scoring: "
              "`--mode=analyze`'s two passes, the second scoring every copy; PGD: "
              "`--mode=robustness`'s attack); memory per device in GiB, as above; "
              "relayouts in MB a batch (PGD: every step's):", "",
              "| config | batch (copies; PGD steps) | compiled (this CPU, s) | memory: "
              "statistics / scores / PGD | collectives: scores | collectives: PGD "
              "| relayouts: statistics / scores / PGD |",
              "| --- | --- | --- | ---: | --- | --- | ---: |"]
    for r in analysis_rows:
      progs = r["programs"]
      get = lambda p, f: f(progs[p]) if p in progs and "memory" in progs[p] else "-"
      said = _compiled(progs, ANALYSIS_PROGRAMS)
      lines.append(
          f"| {r['config']} | {r['scoring_batch']} ({r['scored_copies']}; "
          f"{r['pgd_steps']}) | {said} | "
          + " / ".join(get(p, lambda v: _gb(program_memory(v)))
                       for p in ANALYSIS_PROGRAMS) + " | "
          f"{get('score', lambda v: _exchanges(v['collectives']))} | "
          f"{get('attack', lambda v: _exchanges(v['collectives']))} | "
          + " / ".join(get(p, lambda v: f"{v['relayout_bytes']['execution'] / 1e6:.0f}")
                       for p in ANALYSIS_PROGRAMS) + " |")
  return "\n".join(lines) + "\n"


def _compiled(programs: dict, names: Sequence[str]) -> str:
  """"train 41; eval 3" (this CPU's compile seconds) or the error, of `names`."""
  return "; ".join(f"{p} " + (f"{programs[p]['compile_s']:.0f}" if "compile_s" in
                              programs[p] else f"failed: {programs[p]['error']}")
                   for p in names if p in programs)


def load(name: str, variant: str, sets: Sequence[str]):
  """configs/<name>.py as `variant`, with --set's FIELD=VALUE overrides applied as the
  command line's --config.FIELD does (`config_lib.override`: the variant follows, so
  that invariance_alpha reaches alpha)."""
  config = paper.load_config_module(os.path.join("configs", f"{name}.py")).get_config(
      variant)
  with config.unlocked():
    return config_lib.override(config, dict(paper.parse_override(t) for t in sets))


def main(argv):
  del argv
  known = sorted(f[:-3] for f in os.listdir(os.path.join(common.ROOT, "configs"))
                 if f.endswith(".py") and not f.startswith("_"))
  unknown = sorted(set(FLAGS.configs) - set(known))
  if unknown:
    raise app.UsageError(f"--configs: no configs/{unknown[0]}.py; valid: {known}.")
  configs = {}
  for name in FLAGS.configs:  # every config made before anything compiles
    for variant in FLAGS.variants:
      try:
        configs[f"{name}:{variant}"] = load(name, variant, FLAGS.set)
      except (errors.ConfigError, ValueError, TypeError) as e:
        raise app.UsageError(f"configs/{name}.py:{variant} with --set {FLAGS.set}: "
                             f"{e}") from e
  bad = sorted(set(FLAGS.programs) - set(PROGRAMS))
  if bad:
    raise app.UsageError(f"--programs: unknown {bad}; valid: {list(PROGRAMS)}.")
  devices = topology_devices(FLAGS.topology)
  records = []
  for label, config in configs.items():
    r = check(config, label, devices, FLAGS.programs)
    r["topology"] = FLAGS.topology
    print(json.dumps(r), flush=True)
    records.append(r)
  text = format_markdown(records, FLAGS.topology)
  print(text)
  if FLAGS.out:
    common.write_md_and_json(FLAGS.out, text, records)


if __name__ == "__main__":
  define_flags()
  app.run(main)
