"""experiments/paper.py and reproduce.py: the paper's results as commands, at toy scale."""

import json
import os
import subprocess
import sys

import pytest

from experiments import paper
from tests import helpers


def test_scale_scales_the_schedule_and_overrides_fields():
  scale = paper.Scale(epochs=35, train_examples=1000, test_examples=200,
                      overrides=(("model.width", 0.25), ("dataset", "/d/c10.npz")))
  c = paper.cell_config("allcnn_cifar10", "batchaug", scale)
  assert c.num_epochs == 35 and tuple(c.lr_boundaries) == (20, 25, 30)  # 200/350 ...
  assert (c.copies, c.alpha, c.model.width, c.dataset) == (8, 0.0, 0.25, "/d/c10.npz")
  assert (c.train_examples, c.test_examples) == (1000, 200)
  assert scale.tag() == "e35_train1000_test200_w0.25_c10"
  other = paper.Scale(epochs=35, overrides=(("model.width", 0.25), ("alpha", 0.2)))
  assert other.tag().startswith("e35_w0.25_o") and len(other.tag()) == 19
  assert paper.Scale(epochs=35, overrides=(("alpha", 0.3),)).tag() != other.tag()
  assert paper.Scale().tag() == "paper"
  assert paper.Scale(overrides=(("invariance_denominator", "class"),)).tag() == \
      "class_denominator"
  inv = paper.cell_config("allcnn_cifar10", "invariance",
                          paper.Scale(overrides=(("invariance_alpha", 0.5),)))
  assert inv.alpha == 0.5  # the override reaches the variant's alpha
  sched = paper.cell_config("allcnn_cifar10", "invariance", paper.Scale(
      epochs=35, overrides=(("alpha_boundaries", (175,)), ("alpha_decay", 0.2))))
  assert tuple(sched.alpha_boundaries) == (17.5,) and sched.alpha_decay == 0.2
  full = paper.cell_config("wrn_cifar10", "invariance", paper.Scale())
  assert full.num_epochs == 200 and tuple(full.lr_boundaries) == (60, 120, 160)


def test_result_headers_name_the_invariance_loss_where_it_departs_from_the_paper():
  config = lambda variant, *overrides: {"config": paper.cell_config(
      "allcnn_cifar10", variant, paper.Scale(epochs=35, overrides=overrides))}
  reference = paper.cell_config("allcnn_cifar10", "invariance", paper.Scale())
  assert paper._loss_text({"baseline": config("baseline")}, reference) == ""
  runs = {"baseline": config("baseline"), "invariance": config(
      "invariance", ("invariance_alpha", 0.5), ("alpha_boundaries", (175,)),
      ("alpha_decay", 0.2), ("invariance_denominator", "class"))}
  assert paper._loss_text(runs, reference) == (
      "; invariance loss: alpha 0.5 x0.2 at epochs (17.5,), invariance_denominator class")


def test_bad_overrides_and_cells_are_refused():
  with pytest.raises(ValueError, match="no field 'model.colour'"):
    paper.cell_config("allcnn_cifar10", "baseline",
                      paper.Scale(overrides=(("model.colour", 1),)))
  with pytest.raises(ValueError, match="valid cells are"):
    paper.cell_config("vgg_cifar10", "baseline", paper.Scale())
  with pytest.raises(ValueError, match="FIELD=VALUE"):
    paper.parse_override("model.width")
  assert paper.parse_override("lr_boundaries=(1, 2)") == ("lr_boundaries", (1, 2))
  assert paper.parse_override("dataset=a/b.npz") == ("dataset", "a/b.npz")


def test_paper_numbers_are_facts_md():
  assert paper.PAPER_ACCURACY["allcnn_cifar10"]["invariance"] == (92.47, None)
  assert paper.PAPER_ACCURACY["wrn_tinyimagenet"]["baseline"] == (61.49, 82.99)
  assert paper.PAPER_DEEPEST_MEDIAN["densenet_cifar10"] == {"baseline": 0.54,
                                                            "invariance": 0.97}
  assert set(paper.PAPER_ACCURACY) == set(paper.CELLS) == set(paper.PAPER_DEEPEST_MEDIAN)
  for cell in paper.CELLS.values():
    assert os.path.exists(os.path.join(paper.ROOT, cell.config_file))


@pytest.mark.slow  # ~45 s: three variants trained and analyzed in a subprocess, twice
def test_reproduce_all_writes_results_and_reuses_runs(tmp_path):
  """The real command at toy size: three variants trained, analyzed and written up;
  a second call trains nothing."""
  npz = helpers.write_npz(tmp_path / "toy.npz")
  args = [sys.executable, "-m", "experiments.reproduce", "--source=train", "--result=all",
          "--cells=allcnn_cifar10", f"--workdir={tmp_path / 'runs'}",
          f"--results_dir={tmp_path / 'results'}", "--epochs=2",
          "--set", f"dataset={npz}", "--set", "image_shape=()", "--set", "num_classes=0",
          "--set", f"model.layers={helpers.TINY_LAYERS}", "--set", "batch_size=16",
          "--set", "eval_batch_size=24", "--set", "analysis.batch_size=24",
          "--set", "analysis.num_transforms=2", "--set", "probe_seeds=2",
          "--set", "probe_copies=2", "--set", "log_every_steps=2"]
  out = subprocess.run(args, cwd=helpers.ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = tmp_path / "results"
  (folder,) = os.listdir(results)
  assert folder.startswith("e2_toy_o")
  tag = folder
  files = sorted(os.listdir(results / folder))
  assert files == sorted(
      [f"{n}.{e}" for n in ("table1", "figure2_allcnn_cifar10", "figure5_allcnn_cifar10")
       for e in ("md", "json")] +
      ["figure2_allcnn_cifar10.png", "figure5_allcnn_cifar10.png"])
  table = (results / folder / "table1.md").read_text()
  assert "(91.48)" in table and "(92.47)" in table  # the paper's beside ours
  assert "| batchaug |" in table and "transformed" in table
  assert "python -m experiments.reproduce --source=train --result=all" in table
  assert "CPU only" in table and "2 epochs (paper: 350)" in table
  assert "; invariance loss: alpha 0.1\n" in table
  record = json.loads((results / folder / "table1.json").read_text())
  for variant in paper.VARIANTS:
    summary = json.loads((tmp_path / "runs" / "allcnn_cifar10" / tag / variant /
                          "analysis" / "summary.json").read_text())
    assert record["allcnn_cifar10"][variant]["test"] == summary["test"]
  fig2 = (results / folder / "figure2_allcnn_cifar10.md").read_text()
  assert "| pixels |" in fig2 and "0.98" in fig2 and "conv3" in fig2
  fig5 = json.loads((results / folder / "figure5_allcnn_cifar10.json").read_text())
  assert set(fig5) == set(paper.VARIANTS) and list(fig5["baseline"]) == helpers.TINY_SOWN
  # Reuse: a second call retrains nothing and rewrites the same numbers.
  metrics = tmp_path / "runs" / "allcnn_cifar10" / tag / "invariance" / "metrics.jsonl"
  before = metrics.stat().st_mtime
  out = subprocess.run(args, cwd=helpers.ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert metrics.stat().st_mtime == before
  assert json.loads((results / folder / "table1.json").read_text()) == record
  # A finished run of another configuration is refused, not reused.
  from invjax import experiment  # pylint: disable=g-import-not-at-top
  changed = paper.cell_config("allcnn_cifar10", "invariance", paper.Scale(
      epochs=2, overrides=tuple(paper.parse_override(a) for a in args[10::2])))
  with changed.unlocked():
    changed.alpha_ratio = 3.0
  with pytest.raises(ValueError, match="alpha_ratio: saved 10.0, given 3.0"):
    experiment.run_variant(changed, str(metrics.parent))


def test_loss_dynamics_check_reads_start_peak_end(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  rows = [(0, 0.3), (1, 0.5), (2, 0.4), (4, 0.2)]
  with open(wd / "metrics.jsonl", "w") as f:
    for epoch, v in rows:
      f.write(json.dumps({"step": epoch * 10, "epoch": epoch,
                          "probe/inv_loss/conv1": v}) + "\n")
  check = paper.loss_dynamics_check({"invariance": str(wd)})
  assert check == {"invariance": {"conv1": {"start": 0.3, "peak": 0.5, "peak_epoch": 1.0,
                                            "end": 0.2}}}


def test_figure5_plots_the_denominator_the_loss_trained_with(tmp_path):
  """Every run's probe logs both denominators' L_inv; Figure 5 plots the class one
  where the invariance run trained with it, and names a run that did not log it."""
  def run(name, alpha, denominator, metrics):
    wd = tmp_path / name
    wd.mkdir()
    with open(wd / "metrics.jsonl", "w") as f:
      for epoch in range(3):
        f.write(json.dumps({"step": epoch * 10, "epoch": epoch, **{
            f"probe/{m}/conv1": v * (1 + epoch) for m, v in metrics.items()}}) + "\n")
    config = paper.cell_config("allcnn_cifar10", "baseline", paper.Scale())
    with config.unlocked():
      config.alpha, config.invariance_denominator = alpha, denominator
    return {"workdir": str(wd), "config": config, "status": "full", "summary": None}

  both = {"inv_loss": 0.1, "inv_loss_same_class": 0.3}
  runs = {"baseline": run("b", 0.0, "batch", both),
          "invariance": run("i", 0.1, "class", both),
          "batchaug": run("a", 0.0, "batch", {"inv_loss": 0.2})}  # an older record
  assert paper.probe_prefix(runs) == "probe/inv_loss_same_class/"
  assert paper.probe_prefix({"baseline": runs["baseline"]}) == "probe/inv_loss/"
  md = paper.write_figure5("allcnn_cifar10", runs, paper.Scale(), str(tmp_path / "out"),
                           "cmd")
  text = open(md).read()
  assert "`probe/inv_loss_same_class/*`, Eq. 3's denominator over the pairs of the same " \
         "class" in text
  assert "Not shown: batchaug" in text
  assert "| conv1 | 0.300, 0.900 (2.0), 0.900: rises | 0.300, 0.900 (2.0), 0.900" in text
