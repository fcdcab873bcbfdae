"""Several runs of one config that differ in variant (baseline, invariance, ...):
train (or resume, or reuse), analyze, tabulate and draw them side by side."""

from __future__ import annotations

import copy
import os

from absl import logging

from invjax import analyze as analyze_lib
from invjax import build as build_lib
from invjax import config_lib
from invjax import distributed
from invjax import report
from invjax import steps
from invjax import train
from invjax import workdirs


def run_variant(config, workdir: str, data=None) -> dict:
  """Trains (resuming if interrupted) and analyzes one run, reusing finished work.

  A workdir that holds a run of another configuration is refused (it would otherwise
  be reused as if it were this one).
  """
  workdirs.check_config(config, workdir)
  run = build_lib.build(config, data)
  if not workdirs.is_trained(workdir, run.total_steps):
    result = train.train_and_evaluate(config, workdir, data=run.data)
    if not result["finished"]:  # config.time_limit_minutes
      raise TimeoutError(f"{workdir}: stopped by the time limit at step "
                         f"{result['step']} of {run.total_steps}, with a checkpoint; "
                         "rerun to resume (it is not analyzed before it finishes).")
  if analyze_lib.current_summary(workdir, run.total_steps) is None:
    analyze_lib.analyze(config, workdir, data=run.data)
  return analyze_lib.load(workdir)


def compare_variants(base_config, workdir: str, variants, data=None) -> dict:
  """Runs each variant in WORKDIR/<variant>; writes the comparison into WORKDIR."""
  scores, summaries = {}, {}
  for variant in variants:
    config = copy.deepcopy(base_config)
    with config.unlocked():
      config_lib.apply_variant(config, variant)
    logging.info("=== %s ===", variant)
    scores[variant], summaries[variant] = run_variant(
        config, os.path.join(workdir, variant), data)
  table = report.median_table(summaries, variants)
  if not distributed.is_primary():  # process 0 writes the comparison
    return {"table": table, "figures": [], "summaries": summaries}
  name = f"{base_config.model.name} on {summaries[variants[0]]['dataset']}"
  denominator = base_config.invariance_denominator  # the probe's that the loss uses
  figures = [
      report.plot_scores(scores, os.path.join(workdir, "invariance_scores.png"),
                         title=f"invariance scores, {name}"),
      report.plot_loss_dynamics({v: os.path.join(workdir, v) for v in variants},
                                os.path.join(workdir, "inv_loss_dynamics.png"),
                                prefix=steps.probe_metric_prefix(denominator),
                                title=f"L_inv during training (probe batch), {name}"),
  ]
  with open(os.path.join(workdir, "summary.txt"), "w") as f:
    f.write(table + "\n")
  return {"table": table, "figures": figures, "summaries": summaries}
