"""The paper's results as computations: train what a result needs, analyze it, and write
it beside the paper's numbers (FACTS.md).

A *cell* is one model on one data set (a column of Table 1). A *scale* shortens the
paper's schedule (fewer epochs, the same shape of learning-rate schedule), takes a subset
of the data or overrides other fields, so a result can be made on a CPU in minutes and at
full length on a TPU. Runs live in WORKDIR/<cell>/<scale tag>/<variant>: a finished run
is reused, an interrupted one resumes, so a sweep picks up where it stopped.

The command line is experiments/reproduce.py.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import re
from typing import Any, Sequence

from absl import logging
import numpy as np

from experiments import common
from invjax import config_lib
from invjax import experiment
from invjax import input_pipeline
from invjax import metrics_io
from invjax import records as records_lib
from invjax import report
from invjax import run_card
from invjax import steps

ROOT = common.ROOT
RECORDS = os.path.join(ROOT, "experiments", "results", "records")


@dataclasses.dataclass(frozen=True)
class Cell:
  config_file: str  # relative to the repository root
  figure: int  # the paper's figure of this architecture's scores
  label: str


CELLS = {
    "allcnn_cifar10": Cell("configs/allcnn.py", 2, "All-CNN, CIFAR-10"),
    "wrn_cifar10": Cell("configs/wrn.py", 3, "WRN-28-10, CIFAR-10"),
    "densenet_cifar10": Cell("configs/densenet.py", 4, "DenseNet-BC, CIFAR-10"),
    "allcnn_tinyimagenet": Cell("configs/allcnn_tinyimagenet.py", 2,
                                "All-CNN, Tiny ImageNet"),
    "wrn_tinyimagenet": Cell("configs/wrn_tinyimagenet.py", 3, "WRN-28-10, Tiny ImageNet"),
}
VARIANTS = ("baseline", "batchaug", "invariance")

# FACTS.md, Table 1: test accuracy in %, (top-1, top-5); top-5 only on Tiny ImageNet.
PAPER_ACCURACY = {
    "allcnn_cifar10": {"baseline": (91.48, None), "invariance": (92.47, None)},
    "wrn_cifar10": {"baseline": (94.58, None), "invariance": (94.86, None)},
    "densenet_cifar10": {"baseline": (94.88, None), "invariance": (93.98, None)},
    "allcnn_tinyimagenet": {"baseline": (51.09, 73.48), "invariance": (52.57, 76.53)},
    "wrn_tinyimagenet": {"baseline": (61.49, 82.99), "invariance": (61.23, 83.23)},
}
# FACTS.md, Figures 2-4: median invariance score of the deepest scored layer, read off
# the plots (approximate); the pixel space scores about 0.55.
PAPER_DEEPEST_MEDIAN = {
    "allcnn_cifar10": {"baseline": 0.48, "invariance": 0.98},
    "wrn_cifar10": {"baseline": 0.67, "invariance": 0.95},
    "densenet_cifar10": {"baseline": 0.54, "invariance": 0.97},
    "allcnn_tinyimagenet": {"baseline": 0.65, "invariance": 0.75},
    "wrn_tinyimagenet": {"baseline": 0.60, "invariance": 0.85},
}
PAPER_PIXELS_MEDIAN = 0.55


@dataclasses.dataclass(frozen=True)
class Scale:
  """How a result departs from the paper's runs. The default is the paper's."""
  epochs: float = 0.0  # 0: the config's (the paper's); else the schedule is scaled
  train_examples: int = 0  # 0: all
  test_examples: int = 0
  overrides: tuple[tuple[str, Any], ...] = ()  # (field path, value), e.g. model.width

  def tag(self) -> str:
    """A short folder name: readable for the usual knobs, a hash for the rest."""
    parts = []
    if self.epochs:
      parts.append(f"e{self.epochs:g}")
    if self.train_examples:
      parts.append(f"train{self.train_examples}")
    if self.test_examples:
      parts.append(f"test{self.test_examples}")
    rest = []
    for path, value in self.overrides:
      if path == "dataset":
        parts.append(os.path.splitext(os.path.basename(str(value)))[0])
      elif path == "model.width":
        parts.append(f"w{value:g}" if isinstance(value, float) else f"w{value}")
      elif path == "invariance_denominator":
        parts.append(f"{value}_denominator")
      else:
        rest.append(f"{path}={value!r}")
    if rest:
      parts.append("o" + hashlib.sha1("\n".join(sorted(rest)).encode()).hexdigest()[:8])
    return re.sub(r"[^A-Za-z0-9._-]", "", "_".join(parts).replace("+", "_")) or "paper"


def parse_override(text: str) -> tuple[str, Any]:
  """"model.width=0.25" -> ("model.width", 0.25); values are Python literals or text."""
  path, sep, raw = text.partition("=")
  if not sep or not path:
    raise ValueError(f"--set {text!r}: expected FIELD=VALUE, e.g. --set model.width=0.25")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return path, value


def load_config_module(config_file: str):
  spec = importlib.util.spec_from_file_location(
      "invjax_cell_config", os.path.join(ROOT, config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def cell_config(cell: str, variant: str, scale: Scale):
  """The cell's config file, as the variant, with the scale applied."""
  if cell not in CELLS:
    raise ValueError(f"unknown cell {cell!r}; valid cells are {sorted(CELLS)}.")
  config = load_config_module(CELLS[cell].config_file).get_config(variant)
  with config.unlocked():
    for path, _ in scale.overrides:
      target, last = config_lib.field_parent(config, path)
      if last not in target:
        raise ValueError(f"--set {path}=...: the config has no field {path!r}.")
    # another type on purpose, e.g. a list of layers for a layer-set name
    config_lib.override(config, dict(scale.overrides), replace_type=True)
    if scale.epochs:
      config.lr_boundaries = config_lib.scaled_boundaries(config, scale.epochs)
      config.alpha_boundaries = config_lib.scaled_boundaries(config, scale.epochs,
                                                             "alpha_boundaries")
      config.num_epochs = float(scale.epochs)
    if scale.train_examples:
      config.train_examples = scale.train_examples
    if scale.test_examples:
      config.test_examples = scale.test_examples
  return config


def run_cell(cell: str, scale: Scale, workdir: str,
             variants: Sequence[str] = VARIANTS) -> dict[str, dict]:
  """Trains (or resumes, or reuses) and analyzes each variant of a cell at a scale.

  Returns {variant: {"scores", "summary", "workdir", "config"}}.
  """
  base = os.path.join(workdir, cell, scale.tag())
  data = None
  out = {}
  for variant in variants:
    config = cell_config(cell, variant, scale)
    if data is None:  # the variants share the data: load it once
      data = input_pipeline.load(config)
    logging.info("=== %s, %s, %s ===", cell, scale.tag(), variant)
    run_dir = os.path.join(base, variant)
    scores, summary = experiment.run_variant(config, run_dir, data)
    out[variant] = {"scores": scores, "summary": summary, "workdir": run_dir,
                    "config": config}
  return out


# Results from records ----------------------------------------------------------------

def record_dir(records_root: str, cell: str, tag: str, variant: str) -> str:
  return os.path.join(records_root, cell, tag, variant)


def _rank(record: records_lib.Record, status: str):
  """Best first: a full finished run, then finished ones that are shortened or of
  another loss (records_lib.status), then unfinished; among equals the latest."""
  grade = 0 if status == "full" else 1 if record.finished else 2
  return (grade, -_timestamp(record.card))


def _timestamp(card) -> float:
  started = card["sessions"][-1]["started"]
  return datetime.datetime.fromisoformat(started).timestamp()


def record_runs(cell: str, records_root: str, variants: Sequence[str] = VARIANTS,
                tag: str | None = None) -> dict[str, dict]:
  """{variant: run} from the records of a cell (RECORDS/<cell>/<tag>/<variant>): with
  `tag`, that tag's; else, per variant, the best record (see `_rank`). A run is what
  `run_cell` returns plus "record" and "status" ("full", or why the result is
  provisional: "shortened: ...", "unfinished: ..."); its "summary" and "scores" are
  None for a record without an analysis (an unfinished run). Variants without a
  record are left out."""
  out = {}
  for variant in variants:
    reference = cell_config(cell, variant, Scale())
    candidates = []
    cell_root = os.path.join(records_root, cell)
    tags = [tag] if tag else (sorted(os.listdir(cell_root))
                              if os.path.isdir(cell_root) else [])
    for t in tags:
      path = record_dir(records_root, cell, t, variant)
      if os.path.exists(os.path.join(path, run_card.CARD_FILE)):
        record = records_lib.load(path)
        candidates.append((record, records_lib.status(record, reference), t))
    if not candidates:
      continue
    record, status, t = min(candidates, key=lambda c: _rank(c[0], c[1]))
    out[variant] = {"scores": record.scores, "summary": record.summary,
                    "workdir": record.path, "config": record.config,
                    "robustness": record.robustness,
                    "record": record, "status": status, "tag": t}
  return out


def lacking(cells: dict[str, dict], variants: Sequence[str], need_analysis: bool
            ) -> list[str]:
  """"<cell>/<variant>" of every run a result needs but has no usable record of."""
  out = []
  for cell, runs in cells.items():
    for v in variants:
      run = runs.get(v)
      if run is None or (need_analysis and run["summary"] is None):
        out.append(f"{cell}/{v}" + ("" if run is None else " (unfinished: no analysis)"))
  return out


def _mark(run) -> str:
  """" [shortened]" / " [unfinished]" after a value made from such a record."""
  status = run.get("status", "full")
  if status == "full":
    return ""
  return " [" + ", ".join(p.split(":")[0] for p in status.split("; ")) + "]"


def _record_lines(cells: dict[str, dict]) -> list[str]:
  lines = []
  for cell, runs in cells.items():
    for v, run in runs.items():
      if "record" not in run:
        continue
      card = run["record"].card
      hw = card["sessions"][-1]["hardware"]
      lines.append(f"- record {cell}/{run['tag']}/{v}: {run['status']}; "
                   f"{run_card.describe(card)}; trained "
                   f"{card['sessions'][0]['started'][:10]} on {hw['device_kind']}, "
                   f"half precision {bool(run['config'].get('half_precision'))}")
  return lines


# Writing results ---------------------------------------------------------------------

def _header(title: str, cells: dict[str, dict], scale: Scale, command: str,
            lacks: Sequence[str] = ()) -> list[str]:
  from_records = any("record" in r for runs in cells.values() for r in runs.values())
  lines = [f"# {title}", "",
           f"- command: `{command}`",
           f"- produced {datetime.date.today().isoformat()} on {common.hardware_text()}" +
           (" from run records (the runs' own hardware below)" if from_records else ""),
           f"- scale: `{scale.tag()}`" if not from_records else
           "- scale: per record below ('full' = the paper's schedule, run to the end)"]
  lines += _record_lines(cells)
  if lacks:
    lines.append(f"- lacks records of: {', '.join(lacks)}")
  for cell, runs in cells.items():
    if not runs:
      continue
    c = next(iter(runs.values()))["config"]
    paper = load_config_module(CELLS[cell].config_file).get_config("invariance")
    n_train = c.train_examples or "all"
    n_test = c.test_examples or "all"
    summary = next(iter(runs.values()))["summary"] or {"dataset": c.dataset}
    lines.append(
        f"- {CELLS[cell].label}: data `{summary['dataset']}` "
        f"({n_train} training, {n_test} test images), {c.num_epochs:g} epochs "
        f"(paper: {paper.num_epochs:g}), lr {c.learning_rate:g} x{c.lr_decay:g} at "
        f"epochs {tuple(round(b, 2) for b in c.lr_boundaries)}, batch {c.batch_size}, "
        f"model {dict(c.model)}" + _loss_text(runs, paper))
  lines.append("")
  return lines


def _loss_text(runs: dict[str, dict], reference) -> str:
  """"; invariance loss: alpha 0.5 x0.2 at epochs (10,), ..." for the runs trained with
  the loss (alpha > 0): alpha, its schedule, and each other loss field that departs
  from `reference` (the paper's config, records_lib.departures); "" if none."""
  c = next((r["config"] for r in runs.values() if r["config"].get("alpha")), None)
  if c is None:
    return ""
  text = f"alpha {c.alpha:g}"
  if c.get("alpha_boundaries"):
    text += (f" x{c.alpha_decay:g} at epochs "
             f"{tuple(round(b, 2) for b in c.alpha_boundaries)}")
  diff = records_lib.departures(c, reference)
  for field in records_lib.LOSS_FIELDS:
    if field in diff and field not in ("alpha_boundaries", "alpha_decay"):
      text += f", {field} {diff[field][0]}"
  return f"; invariance loss: {text}"


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.2f}"


def write_table1(cells: dict[str, dict], scale: Scale, out_dir: str, command: str,
                 lacks: Sequence[str] = ()) -> str:
  """Table 1: test accuracy of every variant of every cell, the paper's beside."""
  lines = _header("Table 1: test accuracy (%)", cells, scale, command, lacks)
  lines.append("Ours, with the paper's in brackets. Tiny ImageNet: top-1 / top-5. "
               "'transformed': accuracy on test images under the scoring "
               "transformations (mean of the passes), not in the paper.")
  lines.append("")
  names = list(cells)
  lines.append("| | " + " | ".join(CELLS[c].label for c in names) + " |")
  lines.append("| --- |" + " --- |" * len(names))
  record = {}
  for variant in VARIANTS:
    row, trow = [], []
    for cell in names:
      run = cells[cell].get(variant)
      if run is None or run["summary"] is None:
        missing = ("no record" if run is None and lacks else "not run"
                   if run is None else "unfinished, not analyzed")
        row.append(missing)
        trow.append(missing)
        continue
      test = run["summary"]["test"]
      ours = _pct(test["accuracy"]) + (f" / {_pct(test['top5'])}" if "top5" in test
                                        else "")
      paper = PAPER_ACCURACY[cell].get(variant)
      if paper:
        ours += f" ({paper[0]:.2f}" + (f" / {paper[1]:.2f}" if paper[1] else "") + ")"
      row.append(ours + _mark(run))
      tt = run["summary"].get("transformed_test")
      trow.append(_pct(tt["accuracy"]) + (f" / {_pct(tt['top5'])}" if tt and "top5" in tt
                                          else "") if tt else "-")
      record.setdefault(cell, {})[variant] = {"test": test, "transformed_test": tt,
                                              "paper": paper}
      if "status" in run:
        record[cell][variant]["status"] = run["status"]
    lines.append(f"| {variant} | " + " | ".join(row) + " |")
    lines.append(f"| {variant}, transformed | " + " | ".join(trow) + " |")
  return _write(out_dir, "table1", lines, record)


def write_scores_figure(cell: str, runs: dict[str, dict], scale: Scale, out_dir: str,
                        command: str, lacks: Sequence[str] = ()) -> str:
  """Figures 2-4: per-layer box plots, pixels first, and the median table."""
  fig = CELLS[cell].figure
  name = f"figure{fig}_{cell}"
  png = report.plot_scores({v: r["scores"] for v, r in runs.items()},
                           os.path.join(out_dir, name + ".png"),
                           title=f"invariance scores, {CELLS[cell].label} ({scale.tag()})")
  summaries = {v: r["summary"] for v, r in runs.items()}
  lines = _header(f"Figure {fig}: invariance score per layer, {CELLS[cell].label}",
                  {cell: runs}, scale, command, lacks)
  lines += [f"![Figure {fig}]({os.path.basename(png)})", "",
            "Per-layer median score (Eq. 2, 5 transformations per test image), and "
            "test accuracy:", "", "```", report.median_table(summaries), "```", ""]
  deepest = list(next(iter(summaries.values()))["layers"])[-1]
  lines.append(f"Deepest layer ({deepest}), median: ours against the paper's (read off "
               "its plot, approximate):")
  lines.append("")
  lines.append("| | ours | paper |")
  lines.append("| --- | --- | --- |")
  pixels = next(iter(summaries.values()))["layers"]["pixels"]["median"]
  lines.append(f"| pixels | {pixels:.3f} | {PAPER_PIXELS_MEDIAN:.2f} |")
  for v, s in summaries.items():
    paper = PAPER_DEEPEST_MEDIAN[cell].get(v)
    lines.append(f"| {v}{_mark(runs[v])} | {s['layers'][deepest]['median']:.3f} | "
                 f"{'-' if paper is None else f'{paper:.2f}'} |")
  record = {v: {"layers": s["layers"], "test": s["test"],
                "transformed_test": s.get("transformed_test"),
                **({"status": runs[v]["status"]} if "status" in runs[v] else {})}
            for v, s in summaries.items()}
  return _write(out_dir, name, lines, record)


def write_robustness(cell: str, runs: dict[str, dict], scale: Scale, out_dir: str,
                     command: str, lacks: Sequence[str] = ()) -> str:
  """Not in the paper: accuracy under the scoring transformations, FGSM, PGD and common
  corruptions, and each layer's median score under transformations and corruptions,
  of every variant that has a robustness report (`invjax.robustness`)."""
  from invjax import robustness  # pylint: disable=g-import-not-at-top
  reports = {v: r["robustness"] for v, r in runs.items() if r.get("robustness")}
  name = f"robustness_{cell}"
  lines = _header(f"Robustness (not in the paper), {CELLS[cell].label}", {cell: runs},
                  scale, command, lacks)
  first = next(iter(reports.values()))
  settings = first["settings"]
  corr = first.get("corruptions")
  lines += [
      f"Test accuracy of {', '.join(f'{v}{_mark(runs[v])}' for v in reports)} on "
      f"{first['attacked_images']} of {first['test_images']} test images: clean, under "
      f"the scoring transformations, FGSM and PGD (L-inf, [0, 1] pixels; PGD "
      f"{settings['pgd_steps']} steps of {settings['pgd_step_size']:g}/255 from a random "
      "start)" + (f", and the mean over {len(corr['accuracy'])} corruptions x severities "
                  f"{corr['severities']} ({corr['source']})" if corr else "") + ".", "",
      robustness.markdown(reports), "",
      "Median invariance score per layer (C: under the corruptions, mean over them):",
      "", "```", robustness.score_table(reports), "```", ""]
  png = report.plot_robustness(reports, os.path.join(out_dir, name + ".png"),
                               title=f"robustness, {CELLS[cell].label} ({scale.tag()})")
  lines += [f"![robustness]({os.path.basename(png)})", ""]
  return _write(out_dir, name, lines, reports)


def probe_prefix(runs: dict[str, dict]) -> str:
  """The probe's metric Figure 5 plots for these runs: L_inv with the denominator the
  loss was trained with (every run's probe logs both, steps.PROBE_METRICS), the class
  denominator's where an invariance-trained run used it."""
  by_class = any(r["config"].get("alpha", 0) > 0 and
                 r["config"].get("invariance_denominator", "batch") == "class"
                 for r in runs.values())
  return steps.probe_metric_prefix("class" if by_class else "batch")


def loss_dynamics_check(workdirs: dict[str, str], prefix: str = "probe/inv_loss/"
                        ) -> dict[str, dict[str, dict]]:
  """Per variant and layer: probe L_inv (metrics `prefix`<layer>) at the start, its
  peak and at the end; {} for a run that did not log them."""
  out = {}
  for variant, wd in workdirs.items():
    records = metrics_io.read(wd)
    layers = []
    for r in records:
      for k in r:
        if k.startswith(prefix) and k[len(prefix):] not in layers:
          layers.append(k[len(prefix):])
    out[variant] = {}
    for layer in layers:
      epochs, values = metrics_io.series(records, prefix + layer, "epoch")
      values = np.asarray(values, np.float64)
      i = int(np.argmax(values))
      out[variant][layer] = {"start": float(values[0]), "peak": float(values[i]),
                             "peak_epoch": float(epochs[i]), "end": float(values[-1])}
  return out


def write_figure5(cell: str, runs: dict[str, dict], scale: Scale, out_dir: str,
                  command: str, lacks: Sequence[str] = ()) -> str:
  """Figure 5: per-layer L_inv of the probe batch over training, every variant."""
  name = f"figure5_{cell}"
  prefix = probe_prefix(runs)
  check = loss_dynamics_check({v: r["workdir"] for v, r in runs.items()}, prefix)
  missing = [v for v, c in check.items() if not c]  # records older than the metric
  workdirs = {v: r["workdir"] for v, r in runs.items() if v not in missing}
  pairs = ("the pairs of the same class (the authors' training code)"
           if "same_class" in prefix else "every pair (the paper's text)")
  png = report.plot_loss_dynamics(
      workdirs, os.path.join(out_dir, name + ".png"), prefix=prefix,
      title=f"L_inv during training (probe batch), {CELLS[cell].label} ({scale.tag()})")
  lines = _header(f"Figure 5: L_inv per layer during training, {CELLS[cell].label}",
                  {cell: runs}, scale, command, lacks)
  lines += [f"![Figure 5]({os.path.basename(png)})", "",
            "The paper: the baseline's L_inv keeps rising over training; with the loss "
            "it rises over the first epochs, then falls, in every layer but the last. "
            f"Ours, per layer (probe batch: fixed seeds x copies, eval mode; `{prefix}*`, "
            f"Eq. 3's denominator over {pairs}):", ""]
  if missing:
    lines += [f"Not shown: {', '.join(missing)} (its run logged no `{prefix}*`; runs "
              "log both denominators' since invjax added the class one).", ""]
  variants = [v for v in check if v not in missing]
  lines.append("| layer | " + " | ".join(f"{v}{_mark(runs[v])}: start, peak (epoch), end"
                                         for v in variants)
               + " |")
  lines.append("| --- |" + " --- |" * len(variants))
  for layer in check[variants[0]]:
    cells = []
    for v in variants:
      c = check[v][layer]
      trend = "rises" if c["end"] > c["start"] else "falls"
      cells.append(f"{c['start']:.3f}, {c['peak']:.3f} ({c['peak_epoch']:.1f}), "
                   f"{c['end']:.3f}: {trend}")
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  return _write(out_dir, name, lines, check)


def _write(out_dir: str, name: str, lines: list[str], record) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name + ".md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, name + ".json"), "w") as f:
    json.dump(record, f, indent=2, default=float)
  return path
