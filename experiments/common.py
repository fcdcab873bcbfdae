"""Small helpers shared by the scripts in experiments/ (run them as modules from the
repository root, e.g. python -m experiments.quickstart)."""

import json
import os
import platform
import re
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import jax

# The repository root: configs/, experiments/results/ and workdirs/ are found from it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_run_flag():
  """--run LABEL=WORKDIR, the runs a comparison script reads (compare, loss_dynamics,
  robustness)."""
  flags.DEFINE_multi_string("run", None, "LABEL=WORKDIR, once per run (in plot and "
                            "column order).")


def parse_runs(specs):
  """{label: workdir} of --run LABEL=WORKDIR values."""
  runs = {}
  for spec in specs:
    label, sep, workdir = spec.partition("=")
    if not sep or not label or not workdir:
      raise app.UsageError(f"--run={spec!r}: expected LABEL=WORKDIR, e.g. "
                           "--run baseline=/tmp/allcnn_baseline")
    runs[label] = workdir
  return runs


def write_md_and_json(out: str, text: str, record) -> None:
  """OUT.md (the text) and OUT.json (the record), making OUT's folder."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".md", "w") as f:
    f.write(text)
  with open(out + ".json", "w") as f:
    json.dump(record, f, indent=2)


def define_dataset_and_out_flags():
  """--dataset and --out of a script that measures trained runs (`over_runs`). Call it
  only when the script runs as a program: tests import these scripts side by side."""
  flags.DEFINE_string("dataset", None, "Replaces the runs' data path (a record made on "
                      "another machine names that machine's).")
  flags.DEFINE_string("out", None, "Output path without extension (OUT.md, OUT.json); "
                      "default: only print.")


def over_runs(argv, measure: Callable[[str], dict],
              markdown: Callable[[list, str], str],
              describe: Callable[[dict], str] | None = None) -> list[dict]:
  """The main of a script that measures each run directory (workdir or record) of
  argv[1:]: `measure(directory)` gives a run's result (a line of `describe(result)`
  is printed as it comes), `markdown(results, command)` the report, printed and, with
  --out, written as OUT.md beside the results as OUT.json."""
  if len(argv) < 2:
    raise app.UsageError("give one or more run directories (workdirs or records).")
  t0 = time.perf_counter()
  results = []
  for directory in argv[1:]:
    results.append(measure(directory))
    line = describe(results[-1]) if describe else (
        f"done after {time.perf_counter() - t0:.0f} s")
    print(f"{directory}: {line}", flush=True)
  script = os.path.splitext(os.path.basename(sys.argv[0]))[0]
  command = f"python -m experiments.{script} " + " ".join(sys.argv[1:])
  text = markdown(results, command)
  print(text)
  if flags.FLAGS.out:
    write_md_and_json(flags.FLAGS.out, text, results)
  print(f"wall time {time.perf_counter() - t0:.0f} s")
  return results


def hardware() -> dict:
  """This machine: its first device's kind and platform, the device and host-core
  counts, and the versions that matter for a timing."""
  dev = jax.devices()[0]
  return {"device": dev.device_kind, "platform": dev.platform,
          "devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "python": platform.python_version(),
          "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "compilation_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR", "")}


def hardware_text() -> str:
  """`hardware()` in one line, e.g. "1 x NVIDIA H200 (gpu), 16 host cores (x86_64),
  jax 0.10.2"."""
  hw = hardware()
  host = f"{hw['cpu_count']} host cores ({hw['machine']})"
  if hw["platform"] == "cpu":
    return f"CPU only: {host}, jax {hw['jax']}"
  return f"{hw['devices']} x {hw['device']} ({hw['platform']}), {host}, jax {hw['jax']}"


def report_header(title: str, result: dict) -> list[str]:
  """The first Markdown lines of a timing report: its title, the command, the date
  and the hardware (`result` holds "command", "date" and "hardware")."""
  hw = result["hardware"]
  return [f"# {title}", "",
          f"Command: `{result['command']}`  ",
          f"Date: {result['date']}  ",
          f"Hardware: {hw['device']} x{hw['devices']} ({hw['platform']}), "
          f"{hw['cpu_count']} CPU cores, {hw['machine']}; JAX {hw['jax']}, "
          f"Python {hw['python']}  "] + (
              [f"XLA_FLAGS: `{hw['xla_flags']}`  "] if hw.get("xla_flags") else []) + (
              [f"Persistent compilation cache: `{hw['compilation_cache']}` (a compile "
               "time may include its hits, and XLA's autotuning results kept there by "
               "an earlier process)  "] if hw.get("compilation_cache") else [])


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of a compiled program as one dict ({} where there is none;
  some backends return a list of one)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost or {}


def convolutions(stablehlo: str) -> tuple[int, int]:
  """(convolutions, distinct ones) in a lowered program's text: XLA autotunes each
  distinct convolution (operands, attributes and types) once on a GPU."""
  convs = [line.split("=", 1)[1] for line in stablehlo.splitlines()
           if "stablehlo.convolution" in line]
  return len(convs), len({re.sub(r"%[\w#.]+", "", c).strip() for c in convs})
