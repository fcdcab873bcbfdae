"""Issue 14's speed targets against a window's measurements: one table, each target met
or its measured gap.

  python -m experiments.targets DIR [DIR ...] [--table=DIR/targets]

A DIR holds what experiments/gpu_window.sh writes there: benchmark_<model>.json
(experiments/benchmark.py) and compile.jsonl (experiments/compile_time.py --jsonl). A
target whose measurement is in no DIR is "not measured". The targets are set for an
H100 or H200 at the paper's sizes in bfloat16, but one: the bytes XLA's cost analysis
says L_inv touches are counted by XLA:CPU (the issue's measure without a GPU at hand;
`python -m experiments.benchmark --models=allcnn --size=paper --precision=bfloat16
--variants=loss_alone` on a CPU). A figure from another setting (a CPU, --size=small,
float32: the window's smoke test; a GPU's count for the CPU target) is shown with its
setting and judged "other setting", neither met nor missed. With several DIRs each
target is judged on the first figure in its setting, else shown from the last.

For the invariance step the moments method is measured in each form the benchmark ran
(`losses.MOMENT_FORMS`); the verdict is on the faster one, and the table says when that
is not the form `losses.moment_form` picks for the platform (the default to change).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable

from absl import app
from absl import flags

from experiments import common
from invjax import losses

FLAGS = flags.FLAGS
flags.DEFINE_string("table", None, "Also write TABLE.md and TABLE.json.")

TARGET_PRECISION = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  model: str  # the benchmark_<model>.json it reads ("" for compile.jsonl)
  op: str  # "<=" or ">="
  bound: float
  unit: str
  measure: Callable[[dict], tuple[float, str] | None]  # (value, how) or None
  # What else sets the measurement apart from the target's setting (None: nothing).
  differs: Callable[[dict], str | None] = lambda m: None
  platform: str = "accelerator"  # or "cpu": where the target is measured


def _row(m: dict, name: str) -> dict | None:
  return (m.get("train_rows") or {}).get(name)


def _moment_rows(m: dict) -> dict[str, dict]:
  """{form: its row} of the moments method's invariance step, in every form timed (the
  plain "invariance moments" row is the platform's default form; results from before
  the forms existed name none: "as then")."""
  out = {}
  for form in losses.MOMENT_FORMS:
    row = _row(m, f"invariance moments, {form.replace('_', ' ')}")
    if row:
      out[form] = row
  default = _row(m, "invariance moments")
  if default:
    out.setdefault(default.get("moments_form", "as then"), default)
  return out


def _best_form(m: dict, key: str, smaller: bool):
  rows = {f: r[key] for f, r in _moment_rows(m).items() if r.get(key) is not None}
  if not rows:
    return None
  best = (min if smaller else max)(rows, key=rows.get)
  others = ", ".join(f"{f.replace('_', ' ')} {v:,.3f}" if smaller else
                     f"{f.replace('_', ' ')} {v:,.0f}" for f, v in rows.items())
  how = f"moments, {best.replace('_', ' ')} (forms: {others})"
  if best in losses.MOMENT_FORMS and best != losses.moment_form(m["_platform"]):
    how += f"; not the {m['_platform']} default"
  return rows[best], how


def _overhead(m):
  return _best_form(m, "vs_same_batch", smaller=True)


def _inv_throughput(m):
  return _best_form(m, "images_per_s", smaller=False)


def _baseline_throughput(m):
  row = _row(m, "baseline")
  return (row["images_per_s"], "baseline") if row else None


def _scoring(m):
  a = m.get("analysis")
  if not a:
    return None
  return a["seconds"], (f"{a['images']:,} images x {a['copies']} copies, "
                        f"{a['layers']} layers, both passes")


def _not_the_test_set(m):
  a = m.get("analysis") or {}
  return (f"{a['images']:,} images, not 10,000" if a.get("images", 10000) != 10000
          else None)


def _loss_bytes(m):
  """The fewest bytes over the moments forms timed alone."""
  forms = m.get("loss_alone_forms") or (
      {m["loss_alone"].get("form", "?"): m["loss_alone"]} if m.get("loss_alone") else {})
  ratios = {f: a["bytes_accessed"] / a["activation_bytes"] for f, a in forms.items()
            if a.get("activation_bytes")}
  if not ratios:
    return None
  best = min(ratios, key=ratios.get)
  how = (f"XLA's bytes accessed of L_inv's value and gradient ({best} form) over the "
         "activations'")
  if len(ratios) > 1:
    how += " (forms: " + ", ".join(f"{f} {v:.2f}" for f, v in ratios.items()) + ")"
  if best in losses.MOMENT_FORMS and best != losses.moment_form(m["_platform"]):
    how += f"; not the {m['_platform']} default"
  return ratios[best], how


def _widened(r) -> bool:
  return bool((r.get("model_fields") or {}).get("widen_bottlenecks"))


def _gpu_compile_set(r) -> str | None:
  """Of a compile record: config.gpu_compile where --config.gpu_compile set it."""
  return r.get("gpu_compile") if "gpu_compile" in r.get("config_overrides", ()) else None


def _as_configured(r) -> bool:
  """A compile of the config as it is: XLA's default flags, no widened bottlenecks,
  the config file's own config.gpu_compile (records made before compile_time wrote its
  overrides were compiled as their config was then)."""
  return not r["xla_flags"] and not _widened(r) and _gpu_compile_set(r) is None


def _first_compile(c):
  """The config's default (XLA's default flags, the bottlenecks as configured); every
  other compile measured (widened bottlenecks, other XLA flags) is shown beside it, the
  last of each setting, with its step time where measured."""
  default = [r for r in c if _as_configured(r)]
  if not default:
    return None
  r = default[-1]
  how = f"trace + lower {r['trace_lower_s']:.1f} s, XLA {r['xla_compile_s']:.1f} s"
  if r.get("gpu_compile", "xla") != "xla":
    how += f" (gpu_compile {r['gpu_compile']})"
  if r.get("ms_per_step"):
    how += f", {r['ms_per_step']:.2f} ms a step"
  others = {}
  for o in c:
    if not _as_configured(o):
      set_ = _gpu_compile_set(o)
      label = ", ".join(["bottlenecks widened"] * _widened(o) + o["xla_flags"].split()
                        + [f"gpu_compile {set_}"] * (set_ is not None))
      others[label] = o
  for label, o in others.items():
    step = f", {o['ms_per_step']:.2f} ms a step" if o.get("ms_per_step") else ""
    if o.get("cached_compile_s") is not None:
      step += f", rerun {o['cached_compile_s']:.1f} s"
    how += f"; {label}: {o['trace_lower_s']:.1f} s + {o['xla_compile_s']:.1f} s{step}"
  return r["trace_lower_s"] + r["xla_compile_s"], how


def _cached_compile(c):
  rows = [r for r in c if r.get("cached_compile_s") is not None and _as_configured(r)]
  if not rows:
    return None
  return rows[-1]["cached_compile_s"], "from the persistent cache, trace included"


TARGETS = (
    Target("All-CNN-C: invariance step / same batch", "allcnn", "<=", 1.05, "x",
           _overhead),
    Target("WRN-28-10: invariance step / same batch", "wrn", "<=", 1.02, "x", _overhead),
    Target("DenseNet-BC: invariance step / same batch", "densenet", "<=", 1.03, "x",
           _overhead),
    Target("WRN-28-10 baseline", "wrn", ">=", 11000, "img/s", _baseline_throughput),
    Target("WRN-28-10 invariance", "wrn", ">=", 10800, "img/s", _inv_throughput),
    Target("All-CNN-C invariance", "allcnn", ">=", 100000, "img/s", _inv_throughput),
    Target("DenseNet-BC invariance", "densenet", ">=", 25000, "img/s", _inv_throughput),
    Target("DenseNet-BC training program compiled", "", "<=", 30, "s", _first_compile),
    Target("a rerun's compile (DenseNet-BC)", "", "<=", 5, "s", _cached_compile),
    Target("scoring CIFAR-10 x 5 copies, every WRN-28-10 layer", "wrn", "<=", 5, "s",
           _scoring, _not_the_test_set),
    Target("L_inv bytes over its activations' (All-CNN-C, XLA:CPU)", "allcnn", "<=", 4,
           "x", _loss_bytes, platform="cpu"),
)


def load(*folders: str) -> tuple[dict[str, list[dict]], list[dict]]:
  """({model: its benchmark results, each with "_platform" and "_device"}, compile
  records) from results folders, in their order."""
  models, compiles = {}, []
  for folder in folders:
    for path in sorted(glob.glob(os.path.join(folder, "benchmark_*.json"))):
      with open(path) as f:
        result = json.load(f)
      for m in result["models"]:
        m["_platform"] = result["hardware"]["platform"]
        m["_device"] = result["hardware"]["device"]
        models.setdefault(m["model"], []).append(m)
    path = os.path.join(folder, "compile.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        compiles += [dict(json.loads(line), _folder=folder) for line in f if line.strip()]
  return models, compiles


def _off_setting(platform: str, device: str, precision: str | None,
                 *other: str | None, where: str = "accelerator") -> str | None:
  """None for the targets' setting (an accelerator, or a CPU where `where` is "cpu";
  bfloat16; nothing in `other`), else what differs."""
  if where == "cpu":
    off = [] if platform == "cpu" else [f"{device} ({platform}): the target is XLA:CPU's"]
  else:
    off = [f"{device} ({platform})"] if platform == "cpu" else []
  if precision != TARGET_PRECISION:
    off.append(precision or "?")
  return ", ".join(off + [o for o in other if o]) or None


def _setting(m: dict, where: str = "accelerator") -> str | None:
  """Of a benchmark result: the paper's size too."""
  size = m.get("size")
  return _off_setting(m["_platform"], m["_device"], m.get("precision"),
                      f"size {size}" if size not in (None, "paper") else None,
                      where=where)


def _compile_setting(r: dict) -> str | None:
  """Of a compile record: DenseNet-BC-100, the target's model, too."""
  depth = r.get("model_fields", {}).get("depth")
  return _off_setting(r["platform"], r["device"], r["precision"],
                      f"depth {depth}" if depth != 100 else None)


def _measured(t: Target, models: dict[str, list[dict]], compiles: list[dict]):
  """(value, how, what sets it apart from the target's setting or None), or None: the
  first figure in the target's setting, else the last one measured."""
  found = []
  if t.model:
    for source in models.get(t.model, []):
      got = t.measure(source)
      if got is not None:
        found.append((*got, ", ".join(filter(None, (
            _setting(source, t.platform), t.differs(source)))) or None))
  else:  # each folder's compiles together (one window's, judged as a whole)
    dense = [r for r in compiles if r["model"] == "densenet"]
    for folder in dict.fromkeys(r.get("_folder") for r in dense):
      mine = [r for r in dense if r.get("_folder") == folder]
      got = t.measure(mine)
      if got is not None:
        found.append((*got, _compile_setting(mine[-1])))
  in_setting = [f for f in found if f[2] is None]
  return (in_setting or found or [None])[0 if in_setting else -1]


def evaluate(models: dict[str, list[dict]], compiles: list[dict]) -> list[dict]:
  rows = []
  for t in TARGETS:
    row = {"target": t.name, "required": f"{t.op} {t.bound:,g} {t.unit}",
           "measured": None, "how": "", "verdict": "not measured", "setting": None}
    got = _measured(t, models, compiles)
    if got is not None:
      value, how, setting = got
      row.update(measured=value, how=how, setting=setting)
      ok = value <= t.bound if t.op == "<=" else value >= t.bound
      if setting:
        row["verdict"] = "other setting"
      elif ok:
        row["verdict"] = "met"
      else:
        gap = value - t.bound if t.op == "<=" else t.bound - value
        row["verdict"] = (f"gap {_fmt(gap, t.unit)} {t.unit} "
                          f"({abs(value / t.bound - 1):.1%} {'over' if t.op == '<=' else 'under'})")
    rows.append(row)
  return rows


def _fmt(value: float | None, unit: str) -> str:
  if value is None:
    return ""
  return f"{value:,.0f}" if unit == "img/s" else f"{value:,.3g}"


def format_markdown(rows: list[dict], folder: str) -> str:
  lines = [f"# Issue 14's targets, from {folder}", "",
           "| target | required | measured | verdict | how | setting |",
           "| --- | --- | ---: | --- | --- | --- |"]
  for r, t in zip(rows, TARGETS):
    lines.append(f"| {r['target']} | {r['required']} | {_fmt(r['measured'], t.unit)} | "
                 f"{r['verdict']} | {r['how']} | {r['setting'] or 'the targets'} |")
  return "\n".join(lines) + "\n"


def main(argv):
  folders = argv[1:]
  if not folders:
    raise app.UsageError("usage: python -m experiments.targets RESULTS_DIR [RESULTS_DIR "
                         "...] [--table=PATH]")
  for folder in folders:
    if not os.path.isdir(folder):
      raise app.UsageError(f"{folder} is not a folder of window results.")
  models, compiles = load(*folders)
  if not models and not compiles:
    raise app.UsageError(f"{', '.join(folders)} hold(s) no benchmark_*.json and no "
                         "compile.jsonl.")
  rows = evaluate(models, compiles)
  text = format_markdown(rows, " and ".join(folders))
  print(text, end="")
  if FLAGS.table:
    common.write_md_and_json(FLAGS.table, text, rows)


if __name__ == "__main__":
  app.run(main)
