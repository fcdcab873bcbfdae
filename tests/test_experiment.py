"""invjax/experiment.py: several variants of one config trained, analyzed and compared."""

import json
import os


from invjax import analyze
from invjax import experiment
from tests import helpers


def test_compare_variants_table_and_figures(npz, tmp_path):
  base = helpers.tiny_config(npz, num_epochs=1.0, lr_boundaries=())
  result = experiment.compare_variants(base, str(tmp_path), ["baseline", "invariance"])
  table = result["table"]
  assert "baseline" in table and "invariance" in table and "conv3" in table
  assert table.index("pixels") < table.index("conv1") < table.index("conv3")
  for path in result["figures"]:
    assert os.path.getsize(path) > 10_000
  # a second call reuses both runs: nothing is trained again
  mtimes = {v: os.path.getmtime(os.path.join(tmp_path, v, "metrics.jsonl"))
            for v in ("baseline", "invariance")}
  summary = os.path.join(tmp_path, "baseline", analyze.SUMMARY_FILE)
  scored = os.path.getmtime(summary)
  experiment.compare_variants(base, str(tmp_path), ["baseline", "invariance"])
  for v, t in mtimes.items():
    assert os.path.getmtime(os.path.join(tmp_path, v, "metrics.jsonl")) == t
  assert os.path.getmtime(summary) == scored  # nor scored again
  # ...unless the scores were made by another version of the scoring
  with open(summary) as f:
    old = json.load(f)
  old["scoring_version"] = analyze.SCORING_VERSION - 1
  with open(summary, "w") as f:
    json.dump(old, f)
  experiment.compare_variants(base, str(tmp_path), ["baseline"])
  with open(summary) as f:
    assert json.load(f)["scoring_version"] == analyze.SCORING_VERSION
