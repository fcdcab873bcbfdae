"""Small helpers shared by the scripts in experiments/."""

from absl import app
from absl import flags

# The runs a comparison script reads (experiments/compare.py, loss_dynamics.py,
# robustness.py).
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
