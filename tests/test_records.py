"""Run cards, the time limit, run records and the accelerator-window command."""

import json
import os
import re
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from invjax import analyze
from invjax import build as build_lib
from invjax import checkpoints
from invjax import config_lib
from invjax import deadline as deadline_lib
from invjax import metrics_io
from invjax import records
from invjax import run_card
from invjax import train
from experiments import paper
from tests import helpers


@pytest.fixture(scope="module")
def stopped_run(npz, tmp_path_factory):
  """The tiny run with a 6 ms time limit: past at once, so it stops after its first
  program (its programs are test_train.py's, from the compilation cache)."""
  workdir = str(tmp_path_factory.mktemp("stopped"))
  limited = helpers.tiny_config(npz, time_limit_minutes=1e-4)
  return workdir, train.train_and_evaluate(limited, workdir, tensorboard=False)


@pytest.fixture(scope="module")
def full_run(npz, tmp_path_factory):
  """An uninterrupted tiny run (8 steps), analyzed."""
  workdir = str(tmp_path_factory.mktemp("full"))
  config = helpers.tiny_config(npz)
  result = train.train_and_evaluate(config, workdir, tensorboard=False)
  summary = analyze.analyze(config, workdir)
  return config, workdir, result, summary


# The time limit -----------------------------------------------------------------------

def test_deadline_predicts_the_end_from_the_measured_step_time():
  d = deadline_lib.Deadline(1.0, t0=0.0)  # 60 s from t = 0
  assert d.active and d.reserve() == pytest.approx(3.0)  # 5 % of the limit, no save yet
  d.start(0, 10.0)
  assert d.needs_sync(10.0)  # nothing measured yet
  assert not d.should_stop(5, 10, 10.0)  # no rate yet, far from the end
  d.observe(100, 30.0)  # 0.2 s per step, the loop's overheads included
  assert d.seconds_per_step() == pytest.approx(0.2)
  assert not d.needs_sync(31.0) and d.needs_sync(31.3)  # every 1.2 s (2 %, >= 1 s)
  # 100 steps more queued: done at 50 s; 10 more take 2 s, + 3 s reserve = 55 s < 60.
  assert not d.should_stop(200, 10, 31.0)
  # 30 more would end at 56 s, + 3 s = 59: still in; 40 more: 58 + 3 > 60.
  assert not d.should_stop(200, 30, 31.0) and d.should_stop(200, 40, 31.0)
  d.observe_save(4.0)  # a slow save widens the reserve to 6 s
  assert d.should_stop(200, 30, 31.0)
  # Running late: now (52 s) is past when the queue was predicted to end (50 s).
  assert d.should_stop(200, 10, 52.5) and not d.should_stop(200, 1, 52.5)
  assert not deadline_lib.Deadline(0.0, 0.0).should_stop(10**9, 10**9, 10**9)  # no limit


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "10", True])
def test_time_limit_is_validated(value):
  c = helpers.tiny_config("digits")
  with c.unlocked():
    del c["time_limit_minutes"]
    c.time_limit_minutes = value
  with pytest.raises(ValueError, match="config.time_limit_minutes=.*>= 0"):
    config_lib.validate(c)


def test_time_limit_stops_with_a_checkpoint_weights_and_a_run_card(stopped_run):
  workdir, result = stopped_run
  # The first program always runs; then the limit stops the run, with a checkpoint.
  assert result["step"] == 1 and not result["finished"]
  assert result["stopped"] == "time_limit"
  ckpts = checkpoints.Checkpoints(workdir)
  assert ckpts.latest_step() == 1
  ckpts.close()
  card = run_card.read(workdir)
  assert card["final_step"] == 1 and card["total_steps"] == 8
  assert not card["finished"] and card["stopped"] == "time_limit"
  (session,) = card["sessions"]
  assert session["time_limit_minutes"] == 1e-4 and session["stopped"] == "time_limit"
  assert session["hardware"]["platform"] == "cpu"
  assert session["software"]["jax"] == jax.__version__
  assert session["source"] == run_card.source()
  # How its programs were compiled: on a CPU no XLA options, none fell back.
  assert session["compile"] == {"gpu_compile": "xla", "xla_options": {},
                                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                                "fell_back": []}
  assert set(card["seconds"]) == set(run_card.SECTIONS) | {"analysis"}
  assert card["seconds"]["compile"] > 0 and card["seconds"]["startup"] > 0
  parts = sum(session["seconds"].values())  # the sections do not overlap
  assert 0 < parts <= session["wall_seconds"] * 1.01 + 0.01
  assert checkpoints.load_weights(os.path.join(workdir, "weights.npz"))[2] == 1
  _, loss = metrics_io.series(metrics_io.read(workdir), "train/loss")
  assert len(loss) == 1  # the stop's log point


@pytest.mark.slow  # ~30 s: an uninterrupted run and its analysis, and a resume
def test_a_rerun_after_a_time_limit_resumes_to_the_uninterrupted_run(
    npz, full_run, tmp_path, monkeypatch):
  config, full_dir, _, _ = full_run
  workdir = str(tmp_path / "run")
  limited = helpers.tiny_config(npz, time_limit_minutes=1e-4)
  assert train.train_and_evaluate(limited, workdir, tensorboard=False)["step"] == 1
  # A rerun without the limit (a performance field: allowed) resumes and finishes
  # with the uninterrupted run's weights. It restores into the state's shapes: it
  # computes no initial state.
  def no_initial_state(*args):
    raise AssertionError("the resume computed an initial state")

  monkeypatch.setattr(build_lib, "initial_state", no_initial_state)
  result = train.train_and_evaluate(config, workdir, tensorboard=False)
  assert result["finished"] and result["step"] == 8
  card = run_card.read(workdir)
  assert card["finished"] and [s["start_step"] for s in card["sessions"]] == [0, 1]
  assert card["sessions"][1]["stopped"] == "finished"
  a = checkpoints.load_weights(os.path.join(workdir, "weights.npz"))
  b = checkpoints.load_weights(os.path.join(full_dir, "weights.npz"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               a[:2], b[:2])
  # The logs of the interrupted run are those of the uninterrupted one, plus the
  # stop's at step 1 (so its training means at step 2 cover step 2 alone).
  for name in ("train/loss", "probe/inv_loss/conv3", "test/accuracy"):
    s1, v1 = metrics_io.series(metrics_io.read(workdir), name)
    s2, v2 = metrics_io.series(metrics_io.read(full_dir), name)
    if name != "test/accuracy":
      assert 1 in s1
    if name == "train/loss":
      v2, s2 = v2[s2 > 2], s2[s2 > 2]
    keep = np.isin(s1, s2)
    np.testing.assert_array_equal(s1[keep], s2)
    np.testing.assert_allclose(v1[keep], v2, rtol=1e-4)


@pytest.mark.slow  # ~7 s: a subprocess start
def test_cli_says_where_a_time_limited_run_stopped(npz, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "invjax.main", f"--config=tests/tiny_config.py:{npz}",
       f"--workdir={tmp_path}", "--notensorboard", "--mode=train_and_analyze",
       "--config.time_limit_minutes=0.0001"],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stopped by the time limit" in out.stdout and "at step 1" in out.stdout
  assert "time limit: stopped at step 1 of 8" in out.stderr
  assert not os.path.exists(tmp_path / "analysis")  # an unfinished run is not analyzed


# Run cards and records -------------------------------------------------------------

@pytest.mark.slow  # uses full_run
def test_run_card_adds_the_analysis(full_run):
  _, workdir, result, _ = full_run
  card = run_card.read(workdir)
  assert card["finished"] and card["final_step"] == result["step"] == 8
  (session,) = card["sessions"]
  assert session["stopped"] == "finished"
  assert card["seconds"]["analysis"] > 0 and len(card["analyses"]) == 1
  assert card["wall_seconds"] == pytest.approx(
      session["wall_seconds"] + card["seconds"]["analysis"], abs=0.01)


def test_a_run_cards_line_says_where_its_last_analysis_ran():
  hw = lambda kind: {"device_count": 1, "device_kind": kind}
  card = {"final_step": 8, "total_steps": 8, "finished": True, "wall_seconds": 40.0,
          "seconds": {"train": 10.0, "analysis": 30.0},
          "sessions": [{"hardware": hw("NVIDIA H200")}],
          "analyses": [{"date": "2026-11-26T22:48:11+00:00", "seconds": 5.0,
                        "hardware": hw("NVIDIA H200")},
                       {"date": "2026-11-27T22:15:18+00:00", "seconds": 25.0,
                        "hardware": hw("cpu")}]}
  line = run_card.describe(card)
  assert line.startswith("8/8 steps, finished; 1 session(s) on 1 x NVIDIA H200; wall 40 s")
  assert line.endswith("; 2 analyses, the last 2026-11-27 on 1 x cpu (25 s)")
  del card["analyses"]
  assert run_card.describe(card).endswith("(train 10 s, analysis 30 s)")


@pytest.mark.slow  # uses full_run; the window test checks records.score by default
def test_record_weights_give_the_runs_analysis_without_a_checkpoint(full_run, tmp_path):
  config, workdir, _, summary = full_run
  record = str(tmp_path / "records" / "cell" / "tag" / "invariance")
  copied = records.write(workdir, record)
  # Every record file the run has: it was analyzed, not attacked.
  assert set(copied) == set(records.FILES) - {"analysis/robustness.json"}
  assert not os.path.exists(os.path.join(record, "checkpoints"))
  scores, again = records.score(record)
  assert again["test"] == pytest.approx(summary["test"])
  for layer, stats in summary["layers"].items():
    assert again["layers"][layer]["median"] == pytest.approx(stats["median"], abs=1e-5)
  # --mode=analyze on a record (no checkpoints) scores its weights.
  os.remove(os.path.join(record, "analysis", "summary.json"))
  assert analyze.analyze(config, record)["test"] == pytest.approx(summary["test"])
  loaded = records.load(record)
  assert loaded.finished and loaded.has_weights
  assert set(loaded.scores) == {"pixels", *helpers.TINY_SOWN}
  np.testing.assert_allclose(loaded.scores["conv3"], scores["conv3"], atol=1e-6)


def _fake_workdir(path):
  """A workdir's record files, with made-up contents (no training)."""
  for name in records.FILES:
    os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
    with open(os.path.join(path, name), "wb") as f:
      f.write(name.encode() * 3)
  return str(path)


def test_pack_and_unpack_round_trip_and_refuse_other_archives(tmp_path):
  workdir = _fake_workdir(tmp_path / "run")
  root = tmp_path / "staging"
  record = root / "allcnn_cifar10" / "paper" / "baseline"
  assert set(records.write(workdir, str(record))) == set(records.FILES)
  assert set(records.write(workdir, str(record), weights=False)) == (
      set(records.FILES) - {"weights.npz"})
  records.write(workdir, str(record))
  packed = records.pack(str(record), str(root), str(tmp_path / "r.tar"))
  dest = tmp_path / "committed"
  os.makedirs(dest / "allcnn_cifar10" / "paper" / "baseline" / "analysis")
  (dest / "allcnn_cifar10" / "paper" / "baseline" / "stale.txt").write_text("old")
  out = records.unpack(packed, str(dest))
  assert out == str(dest / "allcnn_cifar10" / "paper" / "baseline")
  for name in records.FILES:
    assert (record / name).read_bytes() == (dest / out / name).read_bytes()
  assert not os.path.exists(os.path.join(out, "stale.txt"))  # replaced, not merged
  bad = tmp_path / "bad.tar"
  with tarfile.open(bad, "w") as tar:
    tar.add(record / "config.json", arcname="../escape/config.json")
  with pytest.raises(ValueError, match="not a packed run record"):
    records.unpack(str(bad), str(dest))
  with pytest.raises(FileNotFoundError, match="not a trained run"):
    records.write(str(tmp_path / "staging"), str(tmp_path / "x"))


def _files(top):
  return {os.path.relpath(os.path.join(d, f), top): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(top) for f in fs}


def test_a_stopped_runs_record_carries_its_checkpoint_and_resumes_elsewhere(
    npz, stopped_run, tmp_path):
  """A stopped run's record, written with its checkpoint, packed and unpacked into
  another records tree, seeds a new workdir (another machine's) that resumes the run
  from the checkpoint's step; a finished run's record never holds one."""
  workdir, _ = stopped_run
  root = tmp_path / "staging"
  record = str(root / "allcnn_cifar10" / "paper" / "invariance")
  assert "checkpoints/1" not in records.write(workdir, record)  # not unless asked
  assert records.resumable(record) is None
  assert "checkpoints/1" in records.write(workdir, record, checkpoint=True)
  packed = records.pack(record, str(root), str(tmp_path / "r.tar"))
  with tarfile.open(packed) as tar:
    assert any(m.name.startswith("allcnn_cifar10/paper/invariance/checkpoints/1/")
               for m in tar.getmembers())
  unpacked = records.unpack(packed, str(tmp_path / "committed"))
  assert records.resumable(unpacked) == 1
  elsewhere = str(tmp_path / "elsewhere" / "run")
  assert records.seed_workdir(unpacked, elsewhere) == 1
  # The checkpoint arrives byte for byte.
  assert os.listdir(os.path.join(elsewhere, "checkpoints")) == ["1"]
  assert _files(os.path.join(elsewhere, "checkpoints", "1")) == _files(
      os.path.join(workdir, "checkpoints", "1"))
  # Training there resumes at step 1 (no initial state) and finishes.
  result = train.train_and_evaluate(helpers.tiny_config(npz), elsewhere,
                                    tensorboard=False)
  assert result["finished"] and result["step"] == 8
  card = run_card.read(elsewhere)
  assert [s["start_step"] for s in card["sessions"]] == [0, 1]
  # The finished run's record holds no checkpoint, even when asked for one.
  again = str(tmp_path / "again" / "allcnn_cifar10" / "paper" / "invariance")
  assert not any(c.startswith("checkpoints") for c in
                 records.write(elsewhere, again, checkpoint=True))
  assert records.resumable(again) is None
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    records.seed_workdir(again, str(tmp_path / "x"))
  # A pack whose files are neither record files nor under checkpoints/<step>/ is
  # refused.
  for stray in ("allcnn_cifar10/paper/invariance/notes.txt",
                "allcnn_cifar10/paper/invariance/checkpoints/latest/x"):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
      tar.add(os.path.join(record, "config.json"),
              arcname="allcnn_cifar10/paper/invariance/config.json")
      tar.add(os.path.join(record, "config.json"), arcname=stray)
    with pytest.raises(ValueError, match="not a packed run record"):
      records.unpack(str(bad), str(tmp_path / "committed"))


def test_attackable_records_have_weights_and_no_report(tmp_path):
  """What a window attacks, read from the files: a record copied to an accelerator
  without its weights and scores (to fit a call's carry) is skipped, not loaded."""
  record = str(tmp_path / "allcnn_cifar10" / "paper" / "baseline")
  records.write(_fake_workdir(tmp_path / "run"), record)
  assert not records.attackable(record)  # it has a robustness report
  os.remove(os.path.join(record, "analysis", "robustness.json"))
  assert records.attackable(record)
  os.remove(os.path.join(record, "weights.npz"))
  os.remove(os.path.join(record, "analysis", "scores.npz"))
  assert not records.attackable(record)


def test_status_marks_shortened_and_unfinished_records():
  ref = paper.cell_config("allcnn_cifar10", "invariance", paper.Scale())
  card = {"finished": True, "final_step": 136500, "total_steps": 136500}
  record = records.Record("r", paper.cell_config("allcnn_cifar10", "invariance",
                                                 paper.Scale()), card, None, None)
  assert records.status(record, ref) == "full"
  record.config = paper.cell_config("allcnn_cifar10", "invariance",
                                    paper.Scale(epochs=6))
  assert records.status(record, ref).startswith("shortened: num_epochs 6 (paper 350)")
  record.card = dict(card, finished=False, final_step=3, total_steps=2340)
  assert records.status(record, ref).startswith("unfinished: step 3 of 2340; shortened")
  record.card = card
  with record.config.unlocked():
    record.config.invariance_denominator = "class"
  got = records.status(record, ref)
  assert got.startswith("shortened: num_epochs 6 (paper 350)")
  assert got.endswith("; other loss: invariance_denominator class (paper batch)")
  # A baseline (alpha 0) trains the same with either denominator or weight law; its
  # probe logs both denominators' L_inv whichever it was given.
  base = paper.cell_config("allcnn_cifar10", "baseline", paper.Scale())
  base_ref = paper.cell_config("allcnn_cifar10", "baseline", paper.Scale())
  with base.unlocked():
    base.invariance_denominator, base.layer_weight_law = "class", "uniform"
    base.alpha_boundaries, base.alpha_decay = (100,), 0.2  # alpha 0 stays 0
  assert records.departures(base, base_ref) == {}
  sched = paper.cell_config("allcnn_cifar10", "invariance", paper.Scale())
  with sched.unlocked():
    sched.alpha_decay = 0.2  # no boundaries: alpha stays constant
  assert records.status(records.Record("r", sched, card, None, None), ref) == "full"
  with sched.unlocked():
    sched.alpha_boundaries = (100,)
  assert records.status(records.Record("r", sched, card, None, None), ref) == (
      "other loss: alpha_boundaries (100) (paper ()), alpha_decay 0.2 (paper 0.1)")
  with base.unlocked():
    base.class_alpha = 0.2  # which the law shares out over the layers
  assert list(records.departures(base, base_ref)) == ["layer_weight_law", "class_alpha"]
  # A model field a record's config left out (made before it existed) is its model's
  # default; another value is another model.
  old = paper.cell_config("allcnn_cifar10", "baseline", paper.Scale())
  with old.unlocked():
    del old.model["kernel_init"]
  assert records.departures(old, base_ref) == {}
  with old.unlocked():
    old.model.kernel_init = "glorot_uniform"
  assert list(records.departures(old, base_ref)) == ["model"]
  with ref.unlocked():  # precision and data path are not departures
    ref.half_precision = True
    ref.dataset = "/tmp/cifar10.npz"
  assert records.departures(paper.cell_config("allcnn_cifar10", "invariance",
                                              paper.Scale()), ref) == {}


# The window command ------------------------------------------------------------------

TINY_SET = ["--set", "image_shape=()", "--set", "num_classes=0",
            "--set", f"model.layers={helpers.TINY_LAYERS}", "--set", "batch_size=16",
            "--set", "eval_batch_size=24", "--set", "analysis.batch_size=24",
            "--set", "analysis.num_transforms=2", "--set", "probe_seeds=2",
            "--set", "probe_copies=2", "--epochs=2"]


def _window(npz, tmp_path, *extra, runs="runs"):
  args = [sys.executable, "-m", "experiments.window", f"--data={npz}",
          f"--out={tmp_path / 'out'}", f"--workdir={tmp_path / runs}",
          f"--records={tmp_path / 'records'}", "--half_precision=false",
          "--eval_every_epochs=1", "--checkpoint_every_epochs=1", *TINY_SET, *extra]
  out = subprocess.run(args, cwd=helpers.ROOT, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _reproduce(tmp_path, result):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", f"--result={result}",
       "--cells=allcnn_cifar10", f"--records={tmp_path / 'records'}",
       f"--results_dir={tmp_path / 'results'}"],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_window_baseline_record_to_table1_from_records(npz, tmp_path):
  """The window command end to end at toy scale, one variant: its packed record,
  unpacked, makes Table 1 with no training, naming the records it lacks."""
  _window(npz, tmp_path, "--variants=baseline")
  (tar,) = [f for f in os.listdir(tmp_path / "out") if f.endswith(".tar")]
  assert tar.startswith("allcnn_cifar10.e2_o") and tar.endswith(".baseline.tar")
  assert os.path.getsize(tmp_path / "out" / tar) < records.MAX_PACK_BYTES
  report = json.loads((tmp_path / "out" / "window.json").read_text())
  assert report["runs"][0]["finished"] and report["runs"][0]["step"] == 8
  record = records.unpack(str(tmp_path / "out" / tar), str(tmp_path / "records"))
  loaded = records.load(record)
  summary = loaded.summary
  assert loaded.finished and loaded.has_weights and loaded.config.variant == "baseline"
  # The window attacked the finished run on every test image; the report is recorded.
  assert set(loaded.robustness["attacks"]["pgd"]) == {"2/255", "8/255"}
  assert loaded.robustness["clean"] == summary["test"]["accuracy"]
  assert loaded.robustness["attacked_images"] == loaded.robustness["test_images"]
  assert loaded.card["sessions"][0]["time_limit_minutes"] > 0
  assert not os.path.exists(os.path.join(record, "checkpoints"))
  # The record's weights, scored here, give the analysis made on the "accelerator".
  _, again = records.score(record, dataset=npz)
  assert again["test"] == pytest.approx(summary["test"])
  for layer, stats in summary["layers"].items():
    assert again["layers"][layer]["median"] == pytest.approx(stats["median"], abs=1e-5)
  out = _reproduce(tmp_path, "table1")
  assert ("lacking records" in out.stdout and "allcnn_cifar10/batchaug" in out.stdout
          and "allcnn_cifar10/invariance" in out.stdout)
  (folder,) = os.listdir(tmp_path / "results")
  assert folder == tar.split(".")[1]  # the records' tag
  table = (tmp_path / "results" / folder / "table1.md").read_text()
  acc = f"{100 * summary['test']['accuracy']:.2f}"
  assert f"| baseline | {acc} (91.48) [shortened] |" in table
  assert "| invariance | no record |" in table
  assert "lacks records of: allcnn_cifar10/batchaug, allcnn_cifar10/invariance" in table
  assert "shortened: num_epochs 2 (paper 350)" in table
  # A robustness report made here from the record's weights (no checkpoint) goes into
  # the record, and reproduce.py's robustness result is built from it.
  from invjax import robustness  # pylint: disable=g-import-not-at-top
  config = loaded.config
  with config.unlocked():
    config.dataset = npz
  rob = robustness.robustness(config, record, robustness.Settings(eps=(0.0, 8.0),
                                                                  pgd_steps=2))
  assert rob["attacks"]["pgd"]["0/255"] == pytest.approx(summary["test"]["accuracy"])
  assert records.load(record).robustness == rob
  _reproduce(tmp_path, "robustness")
  text = (tmp_path / "results" / folder / "robustness_allcnn_cifar10.md").read_text()
  assert f"| pgd 8/255 | {rob['attacks']['pgd']['8/255']:.4f} |" in text
  assert "baseline [shortened]" in text and "(no robustness report)" in text


def test_a_windows_run_gets_a_positive_time_limit_whatever_is_left():
  """What is left less the analysis, rounded up; at least min_minutes, and never 0
  (which would mean no limit: a run that data loading left 0.0001 minutes once trained
  to its end)."""
  cases = [(600.0, 0.8, 1.0), (601.0, 0.8, 1.0), (90.0, 0.8, 1.0), (1.81, 0.03, 0.001),
           (0.0, 0.03, 0.0001)]
  # In a process of its own: window.py defines its flags (--out, ...) on import, as
  # other scripts that tests import do.
  out = subprocess.run(
      [sys.executable, "-c", "import json; from experiments import window; "
       f"print(json.dumps([window.training_minutes(*c) for c in {cases}]))"],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  # 9.2, 9.217 (rounded up), 1.0 (loading took the rest: min_minutes), and the
  # smallest limit, never 0
  assert got == pytest.approx([9.2, 9.217, 1.0, 0.001, 0.001])


def test_window_runs_with_overrides_of_their_own(npz, tmp_path):
  """--run VARIANT:FIELD=VALUE;...: the run's own overrides join --set's (and win over
  them) and name its record's tag; bad runs are refused before anything trains."""
  _window(npz, tmp_path, "--run=invariance:invariance_denominator=class;probe_seeds=3",
          "--norobustness")
  (tar,) = [f for f in os.listdir(tmp_path / "out") if f.endswith(".tar")]
  assert tar.startswith("allcnn_cifar10.e2_class_denominator_o")
  assert tar.endswith(".invariance.tar")
  (run,) = json.loads((tmp_path / "out" / "window.json").read_text())["runs"]
  assert run["finished"] and run["tag"] == tar.split(".")[1] and run["file"] == tar
  config = records.load(records.unpack(str(tmp_path / "out" / tar),
                                       str(tmp_path / "records"))).config
  assert (config.variant, config.invariance_denominator) == ("invariance", "class")
  assert config.probe_seeds == 3 and config.probe_copies == 2  # own, and --set's
  cases = [
      (["--run=invariance", "--variants=baseline"], "give --variants or --run"),
      (["--run=invariance:alpha=0.2", "--run=invariance:alpha=0.2"], "trained twice"),
      (["--run=vgg"], r"--run: unknown variant\(s\) \['vgg'\]"),
      (["--run=invariance:model.colour=1"], "no field 'model.colour'")]
  # Each command line parsed and checked by window.main as `python -m
  # experiments.window` would, in one process (a start each took seconds).
  common = [f"--data={npz}", f"--out={tmp_path / 'bad'}",
            f"--workdir={tmp_path / 'bad'}"]
  code = ("import json, sys; from absl import app, flags; from experiments import "
          "window\nerrors = []\nfor argv in json.loads(sys.argv[1]):\n"
          "  flags.FLAGS.unparse_flags(); argv = flags.FLAGS(['window'] + argv)\n"
          "  try: window.main(argv); errors.append(None)\n"
          "  except app.UsageError as e: errors.append(str(e))\n"
          "print(json.dumps(errors))")
  out = subprocess.run(
      [sys.executable, "-c", code, json.dumps([common + c for c, _ in cases])],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  errors = json.loads(out.stdout.strip().splitlines()[-1])
  for (extra, message), error in zip(cases, errors):
    assert error is not None and re.search(message, error), (extra, error)
  assert not os.path.exists(tmp_path / "bad")


@pytest.mark.slow  # ~1-2 min: four toy trainings, two window commands, three results
def test_window_runs_the_next_unfinished_variants_and_stops_in_its_budget(npz, tmp_path):
  """Two variants in one command; then a budget too short to finish the third: it
  stops with a checkpoint and a partial record that holds it, and a rerun on another
  machine (a fresh workdir) resumes from the record and finishes it. Figures 2 and 5
  come from the records alone."""
  _window(npz, tmp_path, "--variants=baseline,invariance")
  for tar in os.listdir(tmp_path / "out"):
    if tar.endswith(".tar"):
      records.unpack(str(tmp_path / "out" / tar), str(tmp_path / "records"))
  # A committed record without a robustness report (one made before windows attacked)
  # is attacked from its weights and packed again; the rest of it is unchanged.
  (baseline,) = [d for d in records.find(str(tmp_path / "records"))
                 if d.endswith("baseline")]
  before = records.load(baseline)
  os.remove(os.path.join(baseline, "analysis", "robustness.json"))
  _window(npz, tmp_path, "--variants=baseline")
  (attacked,) = json.loads((tmp_path / "out" / "window.json").read_text())["runs"]
  assert attacked["variant"] == "baseline" and attacked["attacked"]
  again = records.load(records.unpack(str(tmp_path / "out" / attacked["file"]),
                                      str(tmp_path / "records")))
  assert again.robustness["attacks"] == before.robustness["attacks"]
  assert again.summary == before.summary and again.card == before.card
  # The next command skips the finished records and runs batchaug; its tiny budget
  # (0.02 min of training) stops it after its first program.
  _window(npz, tmp_path, "--budget_minutes=0.05", "--analysis_minutes=0.03",
          "--min_minutes=0.001")
  report = json.loads((tmp_path / "out" / "window.json").read_text())
  (run,) = report["runs"]
  assert run["variant"] == "batchaug" and not run["finished"] and run["step"] < 8
  assert report["next"] == "batchaug" and report["next_minutes"] > 0
  assert run["checkpoint"] == run["step"] and "weights" not in run
  partial = records.unpack(str(tmp_path / "out" / run["file"]), str(tmp_path / "records"))
  assert records.load(partial).summary is None
  assert records.resumable(partial) == run["step"]
  out = _reproduce(tmp_path, "all")
  table = (tmp_path / "results" / os.listdir(tmp_path / "results")[0] / "table1.md")
  assert "| batchaug | unfinished, not analyzed |" in table.read_text()
  assert "unfinished: step" in table.read_text()
  # Rerun on another machine (no workdir of the first): it resumes batchaug from the
  # committed partial record's checkpoint and finishes it.
  stopped_at = run["step"]
  _window(npz, tmp_path, runs="other_machine")
  report = json.loads((tmp_path / "out" / "window.json").read_text())
  (run,) = report["runs"]
  assert run["variant"] == "batchaug" and run["finished"]
  assert run["resumed_from_record"] == stopped_at and "checkpoint" not in run
  finished = records.unpack(str(tmp_path / "out" / run["file"]), str(tmp_path / "records"))
  card = records.load(finished).card
  assert [s["stopped"] for s in card["sessions"]] == ["time_limit", "finished"]
  assert [s["start_step"] for s in card["sessions"]] == [0, stopped_at]
  assert records.resumable(finished) is None  # the finished record drops it
  out = _reproduce(tmp_path, "all")
  assert "lacking records" not in out.stdout  # the window attacked each finished run
  folder = tmp_path / "results" / os.listdir(tmp_path / "results")[0]
  assert sorted(os.listdir(folder)) == sorted(
      [f"{n}.{e}" for n in ("table1", "figure2_allcnn_cifar10", "figure5_allcnn_cifar10",
                            "robustness_allcnn_cifar10") for e in ("md", "json", "png")
       if (n, e) != ("table1", "png")])
  fig5 = json.loads((folder / "figure5_allcnn_cifar10.json").read_text())
  assert set(fig5) == set(paper.VARIANTS)


@pytest.mark.skipif(not os.path.isdir(os.path.join(paper.RECORDS, "allcnn_cifar10", "paper")),
                    reason="no committed full-scale All-CNN-C records")
@pytest.mark.parametrize("result,stem", [("table1", "table1"),
                                         ("figure2", "figure2_allcnn_cifar10"),
                                         ("figure5", "figure5_allcnn_cifar10")])
def test_committed_records_rebuild_the_committed_results(tmp_path, result, stem):
  """The full-scale results in experiments/results/paper come from the committed records
  alone (no checkpoint, no accelerator), and the files rebuilt here equal them."""
  out = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", f"--result={result}",
       "--cells=allcnn_cifar10", f"--results_dir={tmp_path}"],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  committed = os.path.join(os.path.dirname(paper.RECORDS), "paper", f"{stem}.json")
  rebuilt = tmp_path / "paper" / f"{stem}.json"
  assert json.loads(rebuilt.read_text()) == json.loads(open(committed).read())
  assert "[shortened]" not in (tmp_path / "paper" / f"{stem}.md").read_text()


def test_run_card_source_is_the_git_commit_or_the_environment(monkeypatch):
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=helpers.ROOT,
                        capture_output=True, text=True)
  if head.returncode == 0:  # a git checkout: its commit, marked if the tree differs
    assert run_card.source().split("+")[0] == head.stdout.strip()
  # Installed inside another git checkout: that checkout's commit is not invjax's.
  def other_repo(*args, **kwargs):
    return subprocess.CompletedProcess(args, 0, stdout="/elsewhere\n" + "f" * 40 + "\n")
  monkeypatch.setattr(subprocess, "run", other_repo)
  monkeypatch.setenv(run_card.SOURCE_ENV, "abc123")
  assert run_card.source() == "abc123"
  # Without git (a copy of the tree on an accelerator), $INVJAX_SOURCE says.
  def no_git(*args, **kwargs):
    raise FileNotFoundError("git")
  monkeypatch.setattr(subprocess, "run", no_git)
  monkeypatch.setenv(run_card.SOURCE_ENV, "abc123")
  assert run_card.source() == "abc123"
  monkeypatch.delenv(run_card.SOURCE_ENV)
  assert run_card.source() is None
