"""One accelerator window, one command: train the next unfinished variants of a cell at
full scale and hand each one back as a packed run record.

  python -m experiments.window --data=/tmp/cifar10.npz --out=$OUT --budget_minutes=9.3

For each variant of --variants in order (All-CNN-C: baseline, invariance, batchaug) that
has no finished record in --records yet, it trains the paper's configuration of --cell
in bfloat16 on the decoded CIFAR-10 .npz, in WORKDIR/<cell>/<tag>/<variant>, with a
time limit (config.time_limit_minutes) set to what is left of --budget_minutes less
--analysis_minutes. A run that finishes is analyzed; a run that would pass the budget
saves a checkpoint and stops. A finished run is also attacked (FGSM and PGD at
--robustness_eps, every test image; invjax/robustness.py), unless --norobustness: the
accelerator does in seconds what a CPU does in hours (a committed finished record that
has weights and no report is attacked too, and packed again). Either way its record (invjax/records.py: config, metrics,
run card, weights, and the analysis of a finished run) goes into --out as one
`<cell>.<tag>.<variant>.tar` under 16 MiB, and the command stops at the first
unfinished variant. `python -m invjax.records unpack OUT/*.tar` puts them into
experiments/results/records.

A stopped run's record also holds its newest checkpoint (`records.write(...,
checkpoint=True)`) where the pack stays under 16 MiB with it (DenseNet-BC's, about
6 MB, does; WRN-28-10's, about 290 MB, does not). Committed, the record carries the run
to the next window: on a fresh machine the command finds the unfinished variant's
record with a checkpoint in --records, puts it into the variant's workdir
(`records.seed_workdir`) and resumes the run from there, so a run longer than a window
advances window by window. Rerun on the same machine, it resumes from the workdir's
own checkpoint, or from the record's where that one is newer. A run whose record holds
no checkpoint starts again from step 0 on a fresh machine.

The cadence is set for a short step: metrics and the L_inv probe once per epoch, a
test evaluation every --eval_every_epochs, a checkpoint every --checkpoint_every_epochs
(and at a stop), and --steps_per_dispatch steps per dispatched program (0: the largest
divisor of an epoch's steps up to 100 on an accelerator, 1 on a CPU). None of these
change what is computed. --epochs, --train_examples, --test_examples and --set FIELD=VALUE
shorten or change the runs as in reproduce.py (and name their records' tag); the
tiny-scale test of this command uses them. --run VARIANT:FIELD=VALUE;... (repeated)
replaces --variants where one window should train runs that differ by more than their
variant, e.g. the invariance model with either of Eq. 3's denominators: each run's own
overrides join --set's and name its own tag.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging

from experiments import paper
from invjax import analyze as analyze_lib
from invjax import input_pipeline
from invjax import records as records_lib
from invjax import robustness as robustness_lib
from invjax import run_card
from invjax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "The decoded CIFAR-10 .npz (x_train, y_train, x_test, "
                    "y_test), e.g. from data/decode.py.")
flags.DEFINE_string("out", None, "Where the packed records go (the window's $OUT).")
flags.DEFINE_float("budget_minutes", 9.3, "Wall time this command may take, from its "
                   "start to its last record written.")
flags.DEFINE_float("analysis_minutes", 0.8, "Kept back from each training's time limit "
                   "for its analysis, attacks and record.")
flags.DEFINE_bool("robustness", True, "Attack each finished run (FGSM, PGD) on every "
                  "test image; the report goes into its record.")
flags.DEFINE_list("robustness_eps", ["2", "8"], "The attacks' L-inf radii, in 1/255.")
flags.DEFINE_float("min_minutes", 1.0, "Start (or resume) no variant with less left.")
flags.DEFINE_string("cell", "allcnn_cifar10", f"One of {sorted(paper.CELLS)}.")
flags.DEFINE_list("variants", ["baseline", "invariance", "batchaug"],
                  "Variants in the order they are run.")
flags.DEFINE_string("workdir", os.path.join(paper.ROOT, "workdirs", "window"),
                    "Root of the training runs (kept between commands on one machine).")
flags.DEFINE_string("records", paper.RECORDS, "Committed records: variants with a "
                    "finished record here are skipped.")
flags.DEFINE_bool("half_precision", True, "bfloat16 activations and matmuls.")
flags.DEFINE_integer("steps_per_dispatch", 0, "0: automatic (build.dispatch_steps): "
                     "with the window's cadence the largest divisor of an epoch's "
                     "steps up to 100 on an accelerator, 1 on a CPU.")
flags.DEFINE_float("eval_every_epochs", 10.0, "Test evaluation every N epochs (and at "
                   "the end).")
flags.DEFINE_integer("checkpoint_every_epochs", 25, "Checkpoint every N epochs (and at "
                     "a stop and the end).")
flags.DEFINE_float("epochs", 0.0, "As in reproduce.py: 0 is the paper's schedule.")
flags.DEFINE_integer("train_examples", 0, "Use the first N training images (0: all).")
flags.DEFINE_integer("test_examples", 0, "Use the first N test images (0: all).")
flags.DEFINE_multi_string("set", [], "FIELD=VALUE config override for every run.")
flags.DEFINE_multi_string("run", [], "VARIANT or VARIANT:FIELD=VALUE;FIELD=VALUE, once "
                          "per run, in the order they are run, in place of --variants: "
                          "runs of one variant with overrides of their own (on top of "
                          "--set), e.g. --run=invariance "
                          "--run=invariance:invariance_denominator=class.")


def variant_config(variant: str, scale: paper.Scale, data_path: str,
                   steps_per_epoch: int):
  """The cell's config for one variant at `scale`, on `data_path`, with the window's
  cadence (which changes nothing that is computed)."""
  config = paper.cell_config(FLAGS.cell, variant, scale)
  with config.unlocked():
    config.dataset = data_path
    config.half_precision = FLAGS.half_precision
    config.steps_per_dispatch = FLAGS.steps_per_dispatch
    config.log_every_steps = steps_per_epoch
    config.eval_every_epochs = FLAGS.eval_every_epochs
    config.checkpoint_every_steps = FLAGS.checkpoint_every_epochs * steps_per_epoch
  return config


def _pack_name(tag: str, variant: str) -> str:
  return f"{FLAGS.cell}.{tag}.{variant}.tar"


def _attack(config, workdir: str, variant: str, data) -> dict:
  """The run's robustness report (FGSM and PGD at --robustness_eps, every test image),
  written into `workdir` and printed in one line."""
  rob = robustness_lib.robustness(
      config, workdir, robustness_lib.Settings(eps=FLAGS.robustness_eps), data=data)
  print(f"{variant}: attacks " + ", ".join(
      f"{a} {e} {acc:.4f}" for a, by_eps in rob["attacks"].items()
      for e, acc in by_eps.items()), flush=True)
  return rob


def _attack_record(committed: str, variant: str, tag: str, staging: str,
                   out: str, data) -> dict | None:
  """A finished committed record with weights and no robustness report gets one here
  (the attacks take seconds on an accelerator) and goes back into `out` as a pack;
  returns what was done, or None if nothing was to do."""
  if not FLAGS.robustness or not records_lib.attackable(committed):
    return None
  record = records_lib.load(committed)
  copy = paper.record_dir(staging, FLAGS.cell, tag, variant)
  if os.path.exists(copy):
    shutil.rmtree(copy)
  shutil.copytree(committed, copy)
  config = record.config
  with config.unlocked():
    config.dataset = FLAGS.data
  rob = _attack(config, copy, variant, data(config))
  name = _pack_name(tag, variant)
  packed = records_lib.pack(copy, staging, os.path.join(out, name))
  print(f"{variant}: finished record attacked -> {packed}", flush=True)
  return {"variant": variant, "tag": tag, "step": rob["step"], "finished": True,
          "file": name, "bytes": os.path.getsize(packed), "attacked": True}


def _resume_from_record(committed: str, workdir: str, variant: str) -> int | None:
  """Puts the committed record's checkpoint into `workdir` where it is newer than
  the workdir's own (or the workdir has none); returns its step, or None where the
  workdir is left as it is."""
  carried = records_lib.resumable(committed)
  local = records_lib.resumable(workdir)
  if carried is None or (local is not None and local >= carried):
    return None
  records_lib.seed_workdir(committed, workdir)
  print(f"{variant}: resuming from step {carried}, the checkpoint in {committed}",
        flush=True)
  return carried


def _write_and_pack(workdir: str, record: str, staging: str, packed: str,
                    finished: bool) -> dict:
  """Writes the run's record and packs it into `packed`, with as much as fits in
  MAX_PACK_BYTES: the weights, and an unfinished run's checkpoint (the checkpoint
  before the weights, which it holds too). Returns the window report's entries: an
  unfinished run's "checkpoint" (its step, or why it was left out) and "weights" where
  they were left out."""
  tries = [(True, False), (False, False)]
  if not finished:
    tries = [(True, True), (False, True)] + tries
  for weights, checkpoint in tries:
    records_lib.write(workdir, record, weights=weights, checkpoint=checkpoint)
    records_lib.pack(record, staging, packed)
    if os.path.getsize(packed) <= records_lib.MAX_PACK_BYTES:
      break
  left = {}
  if not weights:
    left["weights"] = "left out: the pack would exceed 16 MiB"
  if not finished:
    step = records_lib.resumable(record)  # the checkpoint the record now holds
    left["checkpoint"] = (step if step is not None else
                          "left out: the pack would exceed 16 MiB; a fresh machine "
                          "starts this run again")
  return left


def training_minutes(left_seconds: float, analysis_minutes: float,
                     min_minutes: float) -> float:
  """A run's time limit, from the seconds the window has left: those less
  `analysis_minutes`, but at least `min_minutes` (loading the data since the window
  decided to start the run may have taken some of it), rounded up to a thousandth of
  a minute. Never 0, which would be no limit at all."""
  limit = max(min_minutes, (left_seconds - 60.0 * analysis_minutes) / 60.0)
  return max(0.001, math.ceil(limit * 1000) / 1000)


def parse_run(spec: str) -> tuple[str, tuple]:
  """"invariance:invariance_denominator=class;model.kernel_init=glorot_uniform" ->
  ("invariance", (("invariance_denominator", "class"), ("model.kernel_init", ...)))."""
  variant, _, rest = spec.partition(":")
  return variant, tuple(paper.parse_override(s) for s in rest.split(";") if s)


def planned_runs() -> list[tuple[str, paper.Scale, str]]:
  """(variant, scale, name) of each run of the window, in order: --run's, or else one
  per --variants entry. The scale holds the schedule flags and the overrides, --set's
  and the run's own; its tag names the run's record (not the data path or the
  precision)."""
  common = tuple(paper.parse_override(s) for s in FLAGS.set)
  scale = lambda overrides: paper.Scale(FLAGS.epochs, FLAGS.train_examples,
                                        FLAGS.test_examples, overrides)
  if FLAGS.run:
    return [(v, scale(common + own), spec) for spec in FLAGS.run
            for v, own in [parse_run(spec)]]
  return [(v, scale(common), v) for v in FLAGS.variants]


def run_window(out: str, t0: float | None = None) -> dict:
  """Runs the window's variants (see the module docstring); returns what it did."""
  t0 = time.time() if t0 is None else t0
  budget = 60.0 * FLAGS.budget_minutes
  left = lambda: budget - (time.time() - t0)
  os.makedirs(out, exist_ok=True)
  staging = os.path.join(FLAGS.workdir, "records")
  runs = planned_runs()
  report = {"cell": FLAGS.cell, "budget_minutes": FLAGS.budget_minutes, "runs": []}
  os.makedirs(staging, exist_ok=True)
  loaded = []

  def data(config):  # the --data set, loaded once for every run and record
    if not loaded:
      loaded.append(input_pipeline.load(config))
    return loaded[0]

  for variant, scale, name in runs:
    tag = scale.tag()
    committed = paper.record_dir(FLAGS.records, FLAGS.cell, tag, variant)
    card = run_card.read(committed)
    if card and card.get("finished"):
      entry = _attack_record(committed, variant, tag, staging, out, data)
      if entry:
        report["runs"].append(entry)
      else:
        print(f"{name}: finished record in {committed}; skipped")
      continue
    if left() < 60.0 * (FLAGS.min_minutes + FLAGS.analysis_minutes):
      print(f"{name}: {left() / 60:.1f} min left, too little to start; next time")
      report["next"] = name
      break
    probe = paper.cell_config(FLAGS.cell, variant, scale)
    with probe.unlocked():
      probe.dataset = FLAGS.data
    steps_per_epoch = len(data(probe).x_train) // probe.batch_size
    config = variant_config(variant, scale, FLAGS.data, steps_per_epoch)
    limit = training_minutes(left(), FLAGS.analysis_minutes, FLAGS.min_minutes)
    with config.unlocked():
      config.time_limit_minutes = limit
    workdir = os.path.join(FLAGS.workdir, FLAGS.cell, tag, variant)
    resumed = _resume_from_record(committed, workdir, variant)
    # (The training's log names the steps per dispatch it chose, when automatic.)
    print(f"{name}: training in {workdir}, time limit {limit:.2f} min, "
          f"{config.steps_per_dispatch or 'automatic'} steps per dispatch", flush=True)
    result = train.train_and_evaluate(config, workdir, data=data(config),
                                      tensorboard=False)
    entry = {"variant": variant, "tag": tag, "step": result["step"],
             "finished": result["finished"]}
    if resumed is not None:
      entry["resumed_from_record"] = resumed
    if result["finished"]:
      if analyze_lib.current_summary(workdir, result["step"]) is None:
        analyze_lib.analyze(config, workdir, data=data(config))
      if FLAGS.robustness:
        _attack(config, workdir, variant, data(config))
    record = paper.record_dir(staging, FLAGS.cell, tag, variant)
    pack = _pack_name(tag, variant)
    packed = os.path.join(out, pack)
    entry.update(_write_and_pack(workdir, record, staging, packed, result["finished"]))
    card = run_card.read(workdir)
    entry.update(file=pack, bytes=os.path.getsize(packed),
                 card=run_card.describe(card), seconds=card["seconds"],
                 wall_seconds=card["wall_seconds"])
    if result["finished"]:
      entry["test_accuracy"] = result.get("accuracy")
    report["runs"].append(entry)
    print(f"{name}: {entry['card']} -> {packed} ({entry['bytes'] / 2**20:.1f} MiB)",
          flush=True)
    if not result["finished"]:
      report["next"] = name
      rate = card.get("steps_per_second")
      if rate:  # the steps left at the measured rate, +10 %, + a start and an analysis
        steps_left = card["total_steps"] - card["final_step"]
        # rounded up to a tenth: a short remainder (a warm compilation cache, a toy
        # run) is never reported as 0.0 minutes
        report["next_minutes"] = math.ceil(10 * (
            (1.1 * steps_left / rate + card["seconds"]["compile"] +
             card["seconds"]["startup"]) / 60 + FLAGS.analysis_minutes)) / 10
      where = ("rerun this command here, or commit its record and run it on another "
               "machine, to resume it" if isinstance(entry["checkpoint"], int) else
               "rerun this command on this machine to resume it")
      print(f"{name}: stopped at step {result['step']} by the budget; {where}"
            + (f" (about {report['next_minutes']} min more)" if rate else ""))
      break
  report["wall_seconds"] = round(time.time() - t0, 1)
  with open(os.path.join(out, "window.json"), "w") as f:
    json.dump(report, f, indent=2)
  return report


def main(argv):
  t0 = time.time()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.data or not FLAGS.out:
    raise app.UsageError("--data and --out are required.")
  if not os.path.exists(FLAGS.data):
    raise app.UsageError(f"--data={FLAGS.data} does not exist (decode the pack first: "
                         "python3 data/decode.py /tmp/cifar10.npz).")
  if FLAGS.cell not in paper.CELLS:
    raise app.UsageError(f"--cell={FLAGS.cell}: valid cells are {sorted(paper.CELLS)}")
  if FLAGS.run and FLAGS["variants"].present:
    raise app.UsageError("give --variants or --run, not both (--run=VARIANT names the "
                         "variant of each run).")
  which = "--run" if FLAGS.run else "--variants"
  try:
    runs = planned_runs()
  except ValueError as e:
    raise app.UsageError(f"{which}: {e}") from e
  bad = sorted({v for v, _, _ in runs} - set(paper.VARIANTS))
  if bad:
    raise app.UsageError(f"{which}: unknown variant(s) {bad}; valid: "
                         f"{list(paper.VARIANTS)}")
  if FLAGS.min_minutes <= 0:
    raise app.UsageError(f"--min_minutes={FLAGS.min_minutes} must be > 0.")
  if FLAGS.budget_minutes <= FLAGS.min_minutes + FLAGS.analysis_minutes:
    raise app.UsageError(f"--budget_minutes={FLAGS.budget_minutes} leaves no time to "
                         f"train (min_minutes + analysis_minutes = "
                         f"{FLAGS.min_minutes + FLAGS.analysis_minutes}).")
  try:
    for variant, scale, _ in runs:  # refuse bad overrides before anything runs
      paper.cell_config(FLAGS.cell, variant, scale)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  tags = [f"{scale.tag()}/{v}" for v, scale, _ in runs]
  twice = sorted({t for t in tags if tags.count(t) > 1})
  if twice:
    raise app.UsageError(f"{which}: {twice} would each be trained twice into one "
                         "record: give the runs of one variant different overrides.")
  logging.set_verbosity(logging.INFO)
  report = run_window(FLAGS.out, t0)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  app.run(main)
