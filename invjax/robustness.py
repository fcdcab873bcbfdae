"""`--mode=robustness`: how a trained run's accuracy holds up, beside its invariance.

For the latest checkpoint of a run, the test accuracy on the clean images, on the
scoring transformations (from the analysis, which is run first if it is missing or
stale), and under white-box L-inf attacks in the [0, 1] pixel space (`invjax.attacks`):
FGSM and PGD (10 steps of 2/255 with a random start, by default) at each eps; and, when
asked, under common corruptions (`invjax.corruptions`: CIFAR-10-C or generated), with
each layer's invariance score (Eq. 2) against the corrupted image, so that "more
invariant" and "more robust" can be compared layer by layer. Written to
WORKDIR/analysis/robustness.json.

Each attack is one jitted program over a batch, with eps and the step size as traced
arguments: it is compiled once and reused for every eps and every batch. Batches are
split over every device like the analysis' (padding masked out), and the random start of
test image i comes from its own key, so the result does not depend on the device count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from invjax import analyze as analyze_lib
from invjax import analysis
from invjax import attacks
from invjax import corruptions as corruptions_lib
from invjax import distributed
from invjax import evaluation
from invjax import placement as placement_lib
from invjax import steps as steps_lib
from invjax import workdirs

REPORT_FILE = workdirs.ROBUSTNESS_FILE


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a report measures. eps and step sizes in units of 1/255 of the pixel range."""
  eps: Sequence[float] = (2.0, 8.0)
  pgd_steps: int = 10
  pgd_step_size: float = 2.0
  attacks: Sequence[str] = attacks.ATTACKS
  seed: int = 2  # PGD random starts, generated corruptions
  test_examples: int = 0  # attack and corrupt only the first N test images (0 = all)
  corruptions: Sequence[str] = ()  # names from corruptions.NAMES ("all" / "none" parsed)
  severities: Sequence[int] = corruptions_lib.SEVERITIES
  corruption_source: str = "auto"  # corruptions.SOURCES

  def __post_init__(self):
    # Plain tuples of numbers and names (flags give strings; "all" / "none" expand).
    names, severities = corruptions_lib.parse(list(self.corruptions),
                                              list(self.severities))
    object.__setattr__(self, "corruptions", names)
    object.__setattr__(self, "severities", severities)
    object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
    object.__setattr__(self, "attacks", tuple(self.attacks))

  def check(self) -> None:
    errors = []
    unknown = sorted(set(self.attacks) - set(attacks.ATTACKS))
    if unknown:
      errors.append(f"attacks {unknown} are unknown; valid attacks are "
                    f"{list(attacks.ATTACKS)}.")
    if any(not np.isfinite(e) or e < 0 or e > 255 for e in self.eps):
      errors.append(f"eps {list(self.eps)} must be in [0, 255] (units of 1/255).")
    if self.pgd_steps < 1:
      errors.append(f"pgd_steps={self.pgd_steps} must be >= 1.")
    if not np.isfinite(self.pgd_step_size) or self.pgd_step_size <= 0:
      errors.append(f"pgd_step_size={self.pgd_step_size} must be > 0 (units of 1/255).")
    if self.test_examples < 0:
      errors.append(f"test_examples={self.test_examples} must be >= 0 (0 = all).")
    if self.corruption_source not in corruptions_lib.SOURCES:
      errors.append(f"corruption source {self.corruption_source!r} is unknown; valid "
                    f"are {list(corruptions_lib.SOURCES)}.")
    if errors:
      raise ValueError("robustness settings: " + " ".join(errors))


def settings_dict(settings: Settings) -> dict[str, Any]:
  """The settings as they are written to (and read back from) the report's JSON."""
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in dataclasses.asdict(settings).items()}


def eps_label(eps: float) -> str:
  """8.0 -> "8/255"."""
  return f"{eps:g}/255"


def make_attack_program(attack: str, top5: bool, pgd_steps: int):
  """A jitted (state, images uint8, labels, valid, eps, step_size, key) ->
  classification sums of the adversarial images (eps, step_size in [0, 1] units)."""

  @jax.jit
  def program(state, images, labels, valid, eps, step_size, key):
    x = steps_lib.to_float(images)
    logits_fn = lambda z: steps_lib.eval_logits(state, z)
    if attack == "fgsm":
      adv = attacks.fgsm(logits_fn, x, labels, eps)
    else:
      # Image i starts from split(key, n)[i], which does not depend on n (padding).
      keys = jax.random.split(key, x.shape[0])
      adv = attacks.pgd(logits_fn, x, labels, eps, step_size, pgd_steps, keys)
    return steps_lib.classification_sums(logits_fn(adv), labels, top5, valid)

  return program


def attack_accuracy(state, run, placement, settings: Settings,
                    batch_size: int) -> dict[str, dict[str, float]]:
  """{attack: {"2/255": accuracy, ...}} over the (first N) test images."""
  n = settings.test_examples or len(run.data.x_test)
  # Every batch padded to one shape (padding masked): one compiled program per attack.
  # The batches stay on the devices for every attack and eps.
  batches = placement_lib.TestBatches(run.data.x_test[:n], run.data.y_test[:n],
                              min(batch_size, n), placement, on_device=True)
  out: dict[str, dict[str, float]] = {}
  for attack in settings.attacks:
    program = make_attack_program(attack, run.step_config.top5, settings.pgd_steps)
    out[attack] = {}
    for eps in settings.eps:
      t0 = time.time()
      out[attack][eps_label(eps)] = evaluation.rates_of([
          program(state, images, labels, valid, eps / 255.0,
                  settings.pgd_step_size / 255.0,
                  jax.random.fold_in(jax.random.key(settings.seed), i))
          for i, (images, labels, valid) in enumerate(batches)])["accuracy"]
      logging.info("%s eps %s: accuracy %.4f (%.1f s)", attack, eps_label(eps),
                   out[attack][eps_label(eps)], time.time() - t0)
  return out


def corruption_results(state, run, placement, settings: Settings, config
                       ) -> dict[str, Any]:
  """Accuracy and per-layer median invariance scores (Eq. 2, the corrupted image as
  the transformed one) under each corruption and severity, and their means."""
  names, severities = settings.corruptions, settings.severities
  source = corruptions_lib.resolve_source(settings.corruption_source, run.data.name)
  n = settings.test_examples or len(run.data.x_test)
  x_test, y_test = run.data.x_test[:n], run.data.y_test[:n]
  batch_size = config.analysis.batch_size
  # The weights are an argument of the programs (not constants compiled into them),
  # and one program scores every corruption and severity.
  feature_fn = steps_lib.features_and_logits  # (state, images)
  top5 = run.step_config.top5
  metrics_fn = lambda logits, labels, mask: steps_lib.classification_sums(
      logits, labels, top5, mask)
  order: list[str] = []
  stats, _ = analysis.accumulate_stats(
      feature_fn, analyze_lib.batches(x_test, y_test, batch_size, placement)(),
      order, steps_lib.to_float, metrics_fn, weights=state)
  stats = {k: stats[k] for k in order}
  score_pairs = analysis.PairScorer(feature_fn, steps_lib.to_float, metrics_fn,
                                    weights=state)
  accuracy: dict[str, dict[str, float]] = {}
  medians: dict[str, dict[str, dict[str, float]]] = {}
  for name in names:
    accuracy[name], medians[name] = {}, {}
    for severity in severities:
      t0 = time.time()
      moved = corruptions_lib.corrupted_test_set(
          source, name, severity, x_test, y_test, config.data_dir or None, settings.seed)
      pairs = zip(analyze_lib.batches(x_test, y_test, batch_size, placement)(),
                  analyze_lib.batches(moved, y_test, batch_size, placement)())
      scores, sums = score_pairs(stats, pairs)
      accuracy[name][str(severity)] = evaluation.rates(sums)["accuracy"]
      medians[name][str(severity)] = {
          k: float(np.median(v[np.isfinite(v)])) for k, v in scores.items()}
      logging.info("%s severity %d: accuracy %.4f (%.1f s)", name, severity,
                   accuracy[name][str(severity)], time.time() - t0)
  every = [(a, medians[c][s]) for c, by in accuracy.items() for s, a in by.items()]
  return {
      "source": (f"generated ({corruptions_lib.library_version()})"
                 if source == "generated" else "official (tfds cifar10_corrupted)"),
      "severities": list(severities),
      "accuracy": accuracy,
      "median_scores": medians,
      "mean": {"accuracy": float(np.mean([a for a, _ in every])),
               "median_scores": {k: float(np.mean([m[k] for _, m in every]))
                                 for k in order}},
  }


def robustness(config, workdir: str, settings: Settings = Settings(),
               data=None) -> dict[str, Any]:
  """The robustness report of the latest checkpoint in `workdir` (see the module)."""
  settings.check()
  run, placement, state, step = analyze_lib.restore(config, workdir, data)
  summary = analyze_lib.current_summary(workdir, step)
  if summary is None:
    summary = analyze_lib.analyze(config, workdir, data=run.data)
  report = {
      "step": int(step), "dataset": run.data.name, "model": config.model.name,
      "variant": config.variant, "copies": config.copies, "alpha": config.alpha,
      "clean": summary["test"]["accuracy"],
      "transformed": summary["transformed_test"]["accuracy"],
      "test_images": len(run.data.x_test),
      "attacked_images": settings.test_examples or len(run.data.x_test),
      "settings": settings_dict(settings),
      "attacks": attack_accuracy(state, run, placement, settings,
                                 config.analysis.batch_size),
      "transformed_median_scores": {k: v["median"]
                                    for k, v in summary["layers"].items()},
  }
  if settings.corruptions:
    report["corruptions"] = corruption_results(state, run, placement, settings, config)
  if distributed.is_primary():
    os.makedirs(os.path.join(workdir, workdirs.ANALYSIS_DIR), exist_ok=True)
    with open(os.path.join(workdir, REPORT_FILE), "w") as f:
      json.dump(report, f, indent=2)
  distributed.barrier("invjax: robustness written")
  return report


def load(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, REPORT_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run --mode=robustness on "
                            f"{workdir} first.")
  with open(path) as f:
    return json.load(f)


def _rows(reports: dict[str, dict[str, Any]]) -> list[tuple[str, list[float]]]:
  rows = [("clean", [r["clean"] for r in reports.values()]),
          ("transformed", [r["transformed"] for r in reports.values()])]
  first = next(iter(reports.values()))
  for attack, by_eps in first["attacks"].items():
    for eps in by_eps:
      rows.append((f"{attack} {eps}",
                   [r["attacks"].get(attack, {}).get(eps, float("nan"))
                    for r in reports.values()]))
  if "corruptions" in first:
    nan = float("nan")
    rows.append(("corrupted, mean", [r.get("corruptions", {}).get("mean", {}).get(
        "accuracy", nan) for r in reports.values()]))
    for name in first["corruptions"]["accuracy"]:
      rows.append((f"  {name}", [float(np.mean(list(
          r["corruptions"]["accuracy"][name].values())))
                                 if name in r.get("corruptions", {}).get("accuracy", {})
                                 else nan for r in reports.values()]))
  return rows


def score_table(reports: dict[str, dict[str, Any]]) -> str:
  """Median invariance score per layer under the scoring transformations and, mean over
  the corruptions and severities, under the corruptions, of several runs."""
  names = list(reports)
  first = reports[names[0]]
  with_c = [n for n in names if "corruptions" in reports[n]]
  head = "".join(f"{n[:10]:>11}" for n in names) + "".join(
      f"{(n[:8] + ' C'):>11}" for n in with_c)
  lines = ["median invariance score (transformations; C: corruptions)",
           " " * 14 + head]
  for layer in first["transformed_median_scores"]:
    row = "".join(f"{reports[n]['transformed_median_scores'].get(layer, float('nan')):11.3f}"
                  for n in names)
    row += "".join(
        f"{reports[n]['corruptions']['mean']['median_scores'].get(layer, float('nan')):11.3f}"
        for n in with_c)
    lines.append(f"  {layer:<12}" + row)
  return "\n".join(lines)


def table(reports: dict[str, dict[str, Any]]) -> str:
  """Accuracy of several runs side by side: clean, transformed, each attack and eps."""
  width = max(12, *(len(n) + 2 for n in reports))
  lines = ["test accuracy".ljust(22) + "".join(n.rjust(width) for n in reports)]
  for label, values in _rows(reports):
    lines.append(f"  {label}".ljust(22) + "".join(f"{v:{width}.4f}" for v in values))
  return "\n".join(lines)


def markdown(reports: dict[str, dict[str, Any]]) -> str:
  """The same as `table`, as a Markdown table."""
  lines = ["| test accuracy | " + " | ".join(reports) + " |",
           "| --- |" + " ---: |" * len(reports)]
  for label, values in _rows(reports):
    lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
  return "\n".join(lines)
