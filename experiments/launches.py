"""What the host launched for each program XLA:GPU compiled, from the thunk sequences
it dumped.

  XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_module_re=jit_chunk" \
      python -m experiments.benchmark --models=allcnn ...
  python -m experiments.launches DIR [FILE.md]

XLA decides at compile time which kernels go into command buffers (CUDA graphs,
launched whole) and whether a loop does too (CUDA's conditional nodes, by the driver's
and the runtime's versions). A compile without the GPU (experiments/kernel_census.py)
assumes the versions its target description declares; on the GPU XLA asks the
device, and this says what it decided there. With `--xla_dump_to`, XLA writes
each program's thunk sequence after its thunk passes; this reads every one in DIR
(`hlo.launches`) and prints, per program, the host's launches a step of its outermost
loop (a command buffer counts one), how many of them are command buffers, the work
thunks they hold, whether the loop itself is inside a command buffer (then the host
launches it once a program) and what is launched outside the loop.
`gpu_window.sh`'s `xla` phase runs it after each benchmark it runs.
"""

from __future__ import annotations

import glob
import os
import re

from absl import app

from experiments import hlo

SUFFIX = ".thunk_sequence_after_thunk_passes.txt"


def read_dump(folder: str) -> list[dict]:
  """Every program in `folder` with a thunk sequence: {"program": XLA's dump name
  (module_<n>.<name>), **hlo.launches(...)}, in the order XLA numbered them."""
  paths = glob.glob(os.path.join(folder, "**", "*" + SUFFIX), recursive=True)

  def number(path):
    found = re.match(r"module_(\d+)", os.path.basename(path))
    return (int(found.group(1)) if found else -1, path)

  rows = []
  for path in sorted(paths, key=number):
    with open(path) as f:
      rows.append({"program": os.path.basename(path)[:-len(SUFFIX)],
                   **hlo.launches(f.read())})
  return rows


def format_markdown(rows: list[dict], folder: str) -> str:
  lines = [f"Host launches of the programs XLA dumped in `{folder}` "
           "(`python -m experiments.launches`):", "",
           "| program | host launches a step | of them command buffers | work thunks a "
           "step | in command buffers | loop in a command buffer | launches outside "
           "the loop |", "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
  for r in rows:
    lines.append(f"| {r['program']} | {r['launches']} | {r['graphs']} | {r['thunks']} "
                 f"| {r['in_graphs']} | {'yes' if r['loop_in_graph'] else 'no'} "
                 f"| {r['once']} |")
  return "\n".join(lines) + "\n"


def main(argv):
  # No flags of its own: a process that imports it with experiments.benchmark's
  # (--out) would define one twice.
  if len(argv) not in (2, 3):
    raise app.UsageError("usage: python -m experiments.launches DIR [FILE.md] (DIR: a "
                         "folder XLA dumped into, XLA_FLAGS=--xla_dump_to=DIR; FILE.md: "
                         "where to write the table too)")
  folder = argv[1]
  rows = read_dump(folder)
  if not rows:  # a message alone, not the flags' help (the window logs it)
    raise SystemExit(
        f"{folder}: no *{SUFFIX}: XLA dumps thunk sequences for GPU programs only, "
        "with XLA_FLAGS=--xla_dump_to=DIR (and --xla_dump_hlo_module_re=jit_chunk "
        "for the training programs alone), and not for a program it loaded from the "
        "persistent compilation cache")
  text = format_markdown(rows, folder)
  print(text)
  if len(argv) == 3:
    with open(argv[2], "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
