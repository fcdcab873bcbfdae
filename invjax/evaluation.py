"""Test metrics from summed per-batch counts (`steps.classification_sums`)."""

from __future__ import annotations

import jax

from invjax import placement as placement_lib


def rates(sums: dict[str, float]) -> dict[str, float]:
  """Accuracy, cross-entropy (and top-5) from `steps.classification_sums` totals."""
  out = {"accuracy": sums["correct"] / sums["count"],
         "cross_entropy": sums["cross_entropy"] / sums["count"]}
  if "correct5" in sums:
    out["top5"] = sums["correct5"] / sums["count"]
  return out



def rates_of(batch_sums: list) -> dict[str, float]:
  """`rates` of the totals of per-batch `steps.classification_sums` (on the device:
  fetched at once, one wait for the device)."""
  totals: dict[str, float] = {}
  for out in jax.device_get(batch_sums):
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return rates(totals)


def evaluate_batches(eval_step, state, batches: placement_lib.TestBatches) -> dict[str, float]:
  """Accuracy (top-1, and top-5 if the step computes it) and loss over `batches`: every
  batch is dispatched, then all sums are fetched at once."""
  return rates_of([eval_step(state, x, y, mask) for x, y, mask in batches])
