"""Figures and tables: invariance score box plots (Figures 2-4), L_inv over training
(Figure 5), and the per-layer median table. matplotlib only, no display needed."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from invjax import metrics_io

COLOURS = {"baseline": "#d62728", "invariance": "#1f77b4", "batchaug": "#2ca02c"}


def _colour(name: str, i: int) -> str:
  return COLOURS.get(name, f"C{i}")


def plot_scores(models: Mapping[str, Mapping[str, np.ndarray]], path: str,
                title: str = "") -> str:
  """Box plots of per-image invariance scores, layer by layer, models side by side.

  Args:
    models: {model label: {layer: scores [N, copies]}}, layers in depth order with
      "pixels" first; every model must have the same layers.
  """
  labels = list(models)
  layers = list(next(iter(models.values())))
  n = len(labels)
  width = 0.8 / n
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(layers) * max(n, 1.5)), 4))
  for i, label in enumerate(labels):
    data = [np.ravel(models[label][l]) for l in layers]
    data = [d[np.isfinite(d)] for d in data]
    pos = np.arange(len(layers)) + (i - (n - 1) / 2) * width
    bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                    showfliers=False, medianprops={"color": "black"})
    for box in bp["boxes"]:
      box.set_facecolor(_colour(label, i))
      box.set_alpha(0.75)
    ax.plot([], [], "s", color=_colour(label, i), label=label)
  ax.set_xticks(np.arange(len(layers)))
  ax.set_xticklabels(layers, rotation=30)
  ax.set_ylabel("invariance score")
  ax.axhline(1.0, color="grey", lw=0.5, ls=":")
  ax.set_title(title)
  ax.legend(loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_loss_dynamics(workdirs: Mapping[str, str], path: str,
                       prefix: str = "probe/inv_loss/", title: str = "") -> str:
  """Figure 5: per-layer L_inv over training for each run, epochs on a quadratic axis."""
  records = {label: metrics_io.read(d) for label, d in workdirs.items()}
  layers: list[str] = []
  for recs in records.values():
    for r in recs:
      for k in r:
        if k.startswith(prefix) and k[len(prefix):] not in layers:
          layers.append(k[len(prefix):])
  if not layers:
    raise ValueError(f"no {prefix}* metrics in {list(workdirs.values())}")
  cols = min(len(layers), 3)
  rows = -(-len(layers) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
  for j, layer in enumerate(layers):
    ax = axes[j // cols][j % cols]
    for i, (label, recs) in enumerate(records.items()):
      x, vals = metrics_io.series(recs, prefix + layer, against="epoch")
      ax.plot(x, vals, color=_colour(label, i), label=label)
    ax.set_xscale("function", functions=(lambda e: np.sqrt(np.maximum(e, 0)),
                                         lambda e: np.square(e)))
    ax.set_xlim(left=0)  # autoscaling margins would hide the initialisation (epoch 0)
    ax.set_title(layer)
    ax.set_xlabel("epoch (quadratic scale)")
    ax.set_ylabel("L_inv")
  for j in range(len(layers), rows * cols):
    axes[j // cols][j % cols].axis("off")
  axes[0][0].legend()
  fig.suptitle(title or "invariance loss during training (lower is more invariant)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def median_table(summaries: Mapping[str, dict], columns: Sequence[str] | None = None
                 ) -> str:
  """A text table: test accuracy and per-layer median score of each model."""
  columns = list(columns or summaries)
  layers = list(next(iter(summaries.values()))["layers"])
  w = max(12, *(len(c) + 2 for c in columns))
  lines = ["".ljust(14) + "".join(c.rjust(w) for c in columns)]
  row = lambda name, vals: name.ljust(14) + "".join(v.rjust(w) for v in vals)
  lines.append(row("test accuracy",
                   [f"{summaries[c]['test']['accuracy']:.4f}" for c in columns]))
  if all("top5" in summaries[c]["test"] for c in columns):
    lines.append(row("test top-5", [f"{summaries[c]['test']['top5']:.4f}"
                                    for c in columns]))
  if all("transformed_test" in summaries[c] for c in columns):
    lines.append(row("transformed", [f"{summaries[c]['transformed_test']['accuracy']:.4f}"
                                     for c in columns]))
  lines.append("median invariance score")
  for l in layers:
    lines.append(row("  " + l, [f"{summaries[c]['layers'][l]['median']:.3f}"
                                for c in columns]))
  return "\n".join(lines)


def plot_similarity(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str],
                    path: str, row_label: str = "", col_label: str = "",
                    title: str = "", measure: str = "linear CKA") -> str:
  """Heatmap of a [len(rows), len(cols)] layer-by-layer similarity matrix (e.g.
  `api.compare`), values printed in the cells, first layers top left."""
  m = np.asarray(matrix)
  fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(cols), 0.8 + 0.5 * len(rows)))
  im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
  for (i, j), v in np.ndenumerate(m):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
            color="black" if v > 0.6 else "white")
  ax.set_xticks(np.arange(len(cols)))
  ax.set_xticklabels(cols, rotation=45, ha="right")
  ax.set_yticks(np.arange(len(rows)))
  ax.set_yticklabels(rows)
  ax.set_xlabel(col_label)
  ax.set_ylabel(row_label)
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label=measure, fraction=0.046, pad=0.04)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_copies(images: np.ndarray, copies: np.ndarray, path: str,
                title: str = "") -> str:
  """Each image (first column) and its transformed copies, one row per image.

  Args:
    images: [N, H, W, C], uint8 or float in [0, 1].
    copies: [N, T, H, W, C] float in [0, 1] (e.g. `LoadedRun.transformed`).
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images / 255.0
  n, t = copies.shape[:2]
  fig, axes = plt.subplots(n, t + 1, figsize=(1.1 * (t + 1), 1.1 * n + 0.4),
                           squeeze=False)
  for i in range(n):
    for j, img in enumerate([images[i], *copies[i]]):
      ax = axes[i, j]
      ax.imshow(np.clip(img, 0, 1).squeeze(), cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title("image" if j == 0 else f"copy {j}", fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_robustness(reports: Mapping[str, dict], path: str, title: str = "") -> str:
  """Robustness reports (invjax.robustness) of several runs: accuracy per condition
  (clean, transformed, each attack and eps, corruptions), and each layer's median
  invariance score under the scoring transformations (dashed) and, where measured,
  under the corruptions (solid, mean over corruptions and severities)."""
  labels = list(reports)
  first = reports[labels[0]]
  conditions = ["clean", "transformed"] + [
      f"{a} {e}" for a, by in first["attacks"].items() for e in by]
  if "corruptions" in first:
    conditions.append("corrupted")

  def accuracy(r, cond):
    if cond in ("clean", "transformed"):
      return r[cond]
    if cond == "corrupted":
      return r.get("corruptions", {}).get("mean", {}).get("accuracy", np.nan)
    attack, eps = cond.split(" ")
    return r["attacks"].get(attack, {}).get(eps, np.nan)

  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.2),
                                 gridspec_kw={"width_ratios": [1.1, 1]})
  width = 0.8 / len(labels)
  lowest = 1.0
  for i, label in enumerate(labels):
    pos = np.arange(len(conditions)) + (i - (len(labels) - 1) / 2) * width
    values = [accuracy(reports[label], c) for c in conditions]
    lowest = min(lowest, np.nanmin(values))
    ax0.bar(pos, values, width * 0.95, color=_colour(label, i), label=label)
    layers = list(reports[label]["transformed_median_scores"])
    ax1.plot(layers, [reports[label]["transformed_median_scores"][l] for l in layers],
             ls="--", color=_colour(label, i), alpha=0.8)
    if "corruptions" in reports[label]:
      med = reports[label]["corruptions"]["mean"]["median_scores"]
      ax1.plot(layers, [med[l] for l in layers], "o-", color=_colour(label, i),
               label=label)
  ax0.set_xticks(np.arange(len(conditions)))
  ax0.set_xticklabels(conditions, rotation=30, ha="right")
  ax0.set_ylabel("test accuracy")
  ax0.set_ylim(max(0.0, np.floor(lowest * 10) / 10 - 0.1), 1.0)
  ax0.legend(loc="lower left", fontsize=8)
  ax1.set_ylabel("median invariance score")
  ax1.set_title("solid: under corruptions; dashed: scoring transformations",
                fontsize=9)
  ax1.tick_params(axis="x", rotation=30)
  if any("corruptions" in r for r in reports.values()):
    ax1.legend(loc="lower right", fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
