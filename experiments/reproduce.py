"""One command per result of the paper: from the committed run records, or by training.

  python -m experiments.reproduce --result=table1               # from the records
  python -m experiments.reproduce --result=figure2              # All-CNN, CIFAR-10
  python -m experiments.reproduce --source=train --result=all --cells=allcnn_cifar10 \\
      --epochs=10 --train_examples=10000 --test_examples=2000 \\
      --set dataset=data/cifar10.npz --set model.width=0.25

--source=records (the default) builds each result from the run records in --records
(experiments/results/records/<cell>/<tag>/<variant>, see invjax/records.py): no
training, no checkpoint, no accelerator, seconds. Per variant it takes the best record
(a finished run of the paper's schedule, else a finished shortened run, else an
unfinished one), marks values from shortened or unfinished runs as such, and says which
records a result still lacks. --record_tag picks one tag's records instead. The result
files go to RESULTS_DIR/<tag> (RESULTS_DIR/mixed where the records' tags differ).
experiments/window.py makes the records on an accelerator.

--source=train trains what the result needs:

Results:  table1 (test accuracy of every cell), figure2 / figure3 / figure4 (invariance
scores per layer of All-CNN / WRN / DenseNet), figure5 (L_inv during training),
robustness (not in the paper: accuracy under transformations, FGSM, PGD and, with
--robustness_corruptions, common corruptions, with per-layer scores; --source=train
makes the reports, records carry theirs), all.
Each trains the baseline, the batch-augmentation control (M copies, alpha = 0) and the
invariance model of each cell (same seed and data), in WORKDIR/<cell>/<scale>/<variant>;
finished runs are reused and interrupted ones resume, so rerunning an interrupted sweep
picks up where it stopped. The result files (Markdown with the paper's numbers beside
ours, JSON, PNG) go to RESULTS_DIR/<scale>/, with this command and the hardware.

Scale knobs: --epochs (the learning-rate schedule keeps its shape), --train_examples,
--test_examples, and --set FIELD=VALUE for any config field (a data set path, a model
width, half_precision, ...).
"""

import os
import shlex
import sys
import time

from absl import app
from absl import flags

from experiments import paper
from invjax import cli
from invjax import compilation_cache
from invjax import config_lib
from invjax import distributed

RESULTS = ("table1", "figure2", "figure3", "figure4", "figure5", "robustness", "all")
FLAGS = flags.FLAGS
flags.DEFINE_enum("result", "all", RESULTS, "Which result to produce.")
flags.DEFINE_enum("source", "records", ["records", "train"],
                  "records: build the results from the run records in --records "
                  "(no training); train: train (or reuse) the runs in --workdir.")
flags.DEFINE_string("records", paper.RECORDS, "Root of the run records (--source=records).")
flags.DEFINE_string("record_tag", None, "Use the records of this tag only (default: the "
                    "best record of each variant).")
flags.DEFINE_list("cells", None, f"Cells (model, data) to run, from {sorted(paper.CELLS)}. "
                  "Default: table1 and all: the three CIFAR-10 cells; figureN: the "
                  "CIFAR-10 cell of its architecture; figure5: allcnn_cifar10.")
flags.DEFINE_list("variants", list(paper.VARIANTS), "Variants to train.")
flags.DEFINE_string("workdir", "runs/paper", "Root of the training runs.")
flags.DEFINE_string("results_dir", os.path.join(paper.ROOT, "experiments", "results"),
                    "Root of the result files; each scale writes a subfolder.")
flags.DEFINE_float("epochs", 0.0, "Train for this many epochs (0: the paper's), with the "
                   "learning-rate boundaries at the same fractions of training.")
flags.DEFINE_integer("train_examples", 0, "Use the first N training images (0: all).")
flags.DEFINE_integer("test_examples", 0, "Use the first N test images (0: all).")
flags.DEFINE_multi_string("set", [], "FIELD=VALUE config override for every run, e.g. "
                          "--set dataset=data/cifar10.npz --set model.width=0.25.")
flags.DEFINE_list("robustness_corruptions", ["none"], "--result=robustness with "
                  "--source=train: common corruptions to test ('all', 'none' or names; "
                  "see invjax/corruptions.py).")
flags.DEFINE_list("robustness_severities", ["1", "2", "3", "4", "5"],
                  "--result=robustness with --source=train: corruption severities.")
distributed.define_flags()  # the same command on every host: see invjax/distributed.py
compilation_cache.define_flags()  # --compilation_cache=DIR|off

DEFAULT_CELLS = {
    "table1": ["allcnn_cifar10", "wrn_cifar10", "densenet_cifar10"],
    "all": ["allcnn_cifar10", "wrn_cifar10", "densenet_cifar10"],
    "figure2": ["allcnn_cifar10"], "figure3": ["wrn_cifar10"],
    "figure4": ["densenet_cifar10"], "figure5": ["allcnn_cifar10"],
    "robustness": ["allcnn_cifar10"],
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cells = FLAGS.cells or DEFAULT_CELLS[FLAGS.result]
  unknown = sorted(set(cells) - set(paper.CELLS))
  if unknown:
    raise app.UsageError(f"--cells: unknown {unknown}; valid: {sorted(paper.CELLS)}")
  figure = {"figure2": 2, "figure3": 3, "figure4": 4}.get(FLAGS.result)
  if figure and any(paper.CELLS[c].figure != figure for c in cells):
    raise app.UsageError(f"--result={FLAGS.result} shows "
                         f"{[c for c in paper.CELLS if paper.CELLS[c].figure == figure]}")
  try:
    overrides = tuple(paper.parse_override(s) for s in FLAGS.set)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  scale = paper.Scale(FLAGS.epochs, FLAGS.train_examples, FLAGS.test_examples, overrides)
  for cell in cells:  # refuse bad overrides before loading or training anything
    for variant in FLAGS.variants:
      config_lib.validate(paper.cell_config(cell, variant, scale))
  command = " ".join(["python -m experiments.reproduce"] +
                     [shlex.quote(a) for a in sys.argv[1:]])
  if FLAGS.source == "records":
    if FLAGS.epochs or FLAGS.train_examples or FLAGS.test_examples or FLAGS.set:
      raise app.UsageError("--epochs, --train_examples, --test_examples and --set "
                           "shape runs to train: use them with --source=train (records "
                           "carry their own configuration).")
    _from_records(cells, command)
    return
  out_dir = os.path.join(FLAGS.results_dir, scale.tag())
  t0 = time.time()
  distributed.initialize_from_flags()
  compilation_cache.configure()  # before anything compiles
  results = {c: paper.run_cell(c, scale, FLAGS.workdir, FLAGS.variants) for c in cells}
  if FLAGS.result == "robustness":
    _robustness_reports(results)
  if not distributed.is_primary():  # process 0 writes the results
    return
  _write(cells, results, scale, out_dir, command, {})
  print(f"wall time {time.time() - t0:.0f} s")


def _robustness_reports(results) -> None:
  """Adds each run's robustness report (made, or reused where it has the settings)."""
  from invjax import robustness  # pylint: disable=g-import-not-at-top
  settings = robustness.Settings(corruptions=FLAGS.robustness_corruptions,
                                 severities=FLAGS.robustness_severities)
  for runs in results.values():
    for run in runs.values():
      try:
        report = robustness.load(run["workdir"])
      except FileNotFoundError:
        report = None
      if (report is None or report["step"] != run["summary"]["step"] or
          report["settings"] != robustness.settings_dict(settings)):
        report = robustness.robustness(run["config"], run["workdir"], settings)
      run["robustness"] = report


def _write(cells, results, scale, out_dir, command, lacks):
  """Writes the results FLAGS.result asks for; `lacks` maps a result name to the
  records it lacks (records source only)."""
  written = []
  analyzed = {c: {v: r for v, r in runs.items() if r["summary"] is not None}
              for c, runs in results.items()}
  if FLAGS.result in ("table1", "all"):
    written.append(paper.write_table1(results, scale, out_dir, command,
                                      lacks.get("table1", ())))
  for cell in cells:
    fig = paper.CELLS[cell].figure
    if FLAGS.result == "all" or FLAGS.result == f"figure{fig}":
      if analyzed[cell]:
        written.append(paper.write_scores_figure(cell, analyzed[cell], scale, out_dir,
                                                 command, lacks.get(f"figure{fig}", ())))
      else:
        print(f"figure{fig} of {cell}: no analyzed record; nothing written")
    if FLAGS.result == "robustness" or (FLAGS.result == "all" and any(
        r.get("robustness") for r in results[cell].values())):
      if any(r.get("robustness") for r in results[cell].values()):
        written.append(paper.write_robustness(cell, results[cell], scale, out_dir,
                                              command, lacks.get("robustness", ())))
      else:
        print(f"robustness of {cell}: no robustness report; nothing written")
    if FLAGS.result in ("figure5", "all"):
      if results[cell]:
        written.append(paper.write_figure5(cell, results[cell], scale, out_dir, command,
                                           lacks.get("figure5", ())))
      else:
        print(f"figure5 of {cell}: no record; nothing written")
  for path in written:
    print(f"== {path}")
    with open(path) as f:
      print(f.read())


def _from_records(cells, command):
  t0 = time.time()
  results = {c: paper.record_runs(c, FLAGS.records, FLAGS.variants, FLAGS.record_tag)
             for c in cells}
  lacks = {}
  for name in ("table1", "figure2", "figure3", "figure4", "figure5"):
    need = {c: r for c, r in results.items()
            if name in ("table1", "figure5") or name == f"figure{paper.CELLS[c].figure}"}
    lacks[name] = paper.lacking(need, FLAGS.variants, need_analysis=name != "figure5")
  lacks["robustness"] = [f"{c}/{v} (no robustness report)" for c, runs in results.items()
                         for v in FLAGS.variants
                         if not (runs.get(v) or {}).get("robustness")]
  tags = {r["tag"] for runs in results.values() for r in runs.values()}
  out_dir = os.path.join(FLAGS.results_dir,
                         tags.pop() if len(tags) == 1 else "mixed" if tags else "none")
  asked = [n for n in lacks if FLAGS.result in (n, "all")]
  missing = sorted({m for n in asked for m in lacks[n]})
  if missing:
    print(f"lacking records ({FLAGS.records}): {', '.join(missing)}")
  if not any(results.values()):
    print("no records: nothing to write. Make them with experiments/window.py.")
    return
  _write(cells, results, paper.Scale(), out_dir, command, lacks)
  print(f"built from records in {time.time() - t0:.1f} s")


if __name__ == "__main__":
  cli.run(main)  # app.run, with refused input as a short message and exit status 2
