"""Run records: everything a paper result needs from one run, small enough to commit.

A record is a directory, RECORDS/<cell>/<tag>/<variant>/, holding

  config.json            the configuration the run was trained with
  metrics.jsonl          every logged metric (training, probe L_inv, test accuracy)
  run_card.json          command, dates, hardware, software, wall time per section,
                         final step, finished or where it stopped (`invjax.run_card`)
  analysis/summary.json  test accuracy, accuracy under the scoring transformations and
  analysis/scores.npz    per-layer score statistics; the per-image scores
                         (both absent in the record of an unfinished run)
  weights.npz            the final parameters and batch-norm statistics (no optimizer
                         state), for models whose weights take at most
                         MAX_WEIGHTS_BYTES; `--mode=analyze --workdir=RECORD` or
                         `score` scores them on any machine

and, in the record of an unfinished run written with `checkpoint=True`,

  checkpoints/<step>/    its newest checkpoint (train state and optimizer state), so
                         that another machine resumes the run from there (`resumable`,
                         `seed_workdir`): a run longer than one accelerator window
                         goes on in the next one

A finished run's record holds no checkpoint, so it is a few MB (All-CNN-C: about 5 MB
of weights; DenseNet-BC's checkpoint is about 6 MB). For transport (e.g. back from an
accelerator that returns single files) a record packs into one uncompressed .tar of
the same paths, `<cell>/<tag>/<variant>/...`, which `unpack` (or `tar -xf FILE -C
RECORDS`) puts in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
from typing import Any

import numpy as np

from invjax import checkpoints
from invjax import models
from invjax import run_card
from invjax import workdirs

MAX_WEIGHTS_BYTES = 12 * 2**20
MAX_PACK_BYTES = 16 * 2**20  # what one file back from an accelerator window may take
FILES = (workdirs.CONFIG_FILE, workdirs.METRICS_FILE, workdirs.CARD_FILE,
         workdirs.SUMMARY_FILE, workdirs.SCORES_FILE, workdirs.ROBUSTNESS_FILE,
         workdirs.WEIGHTS_FILE)
REQUIRED = (workdirs.CONFIG_FILE, workdirs.METRICS_FILE, workdirs.CARD_FILE)


def write(workdir: str, record_dir: str, weights: bool = True,
          checkpoint: bool = False) -> list[str]:
  """Copies a run's record files from `workdir` into `record_dir` (replacing an older
  record there); returns the files copied (a checkpoint as `checkpoints/<step>`). The
  weights are left out if `weights` is False or they exceed MAX_WEIGHTS_BYTES; with
  `checkpoint`, the newest checkpoint of an unfinished run goes in too (a finished
  run's never does: its record is complete without one)."""
  missing = [f for f in REQUIRED if not os.path.exists(os.path.join(workdir, f))]
  if missing:
    raise FileNotFoundError(f"{workdir} lacks {missing}: not a trained run.")
  if os.path.exists(record_dir):
    shutil.rmtree(record_dir)
  copied = []
  for name in FILES:
    src = os.path.join(workdir, name)
    if not os.path.exists(src):
      continue
    if name == workdirs.WEIGHTS_FILE and (
        not weights or os.path.getsize(src) > MAX_WEIGHTS_BYTES):
      continue
    os.makedirs(os.path.dirname(os.path.join(record_dir, name)), exist_ok=True)
    shutil.copyfile(src, os.path.join(record_dir, name))
    copied.append(name)
  step = resumable(workdir) if checkpoint else None
  if step is not None and not run_card.read(workdir).get("finished"):
    name = os.path.join(workdirs.CHECKPOINTS_DIR, str(step))
    shutil.copytree(os.path.join(workdir, name), os.path.join(record_dir, name))
    copied.append(name)
  return copied


def _members(record_dir: str, rel: str):
  """(path, name in the pack) of every file of the record at `record_dir`."""
  for name in FILES:
    path = os.path.join(record_dir, name)
    if os.path.exists(path):
      yield path, f"{rel}/{name}"
  top = os.path.join(record_dir, workdirs.CHECKPOINTS_DIR)
  for dirpath, _, files in sorted(os.walk(top)):
    for f in sorted(files):
      path = os.path.join(dirpath, f)
      yield path, f"{rel}/{os.path.relpath(path, record_dir)}"


def pack(record_dir: str, records_root: str, out_file: str) -> str:
  """Packs the record at `record_dir` (inside `records_root`) into one .tar whose
  member paths are relative to `records_root`."""
  rel = os.path.relpath(record_dir, records_root)
  with tarfile.open(out_file, "w") as tar:
    for path, name in _members(record_dir, rel):
      tar.add(path, arcname=name)
  return out_file


def _record_of(name: str) -> str | None:
  """The record directory that a member of a pack belongs to (the member being one of
  FILES, or a file under the record's checkpoints/<step>/), or None."""
  head, sep, tail = name.partition(f"/{workdirs.CHECKPOINTS_DIR}/")
  if sep:
    return head if tail.split("/")[0].isdigit() and "/" in tail else None
  for f in FILES:
    if name.endswith("/" + f):
      return name[:-len(f) - 1]
  return None


def unpack(tar_file: str, records_root: str) -> str:
  """Puts a packed record into `records_root` (replacing the record at its path);
  returns its directory."""
  with tarfile.open(tar_file) as tar:
    members = tar.getmembers()
    dirs = {_record_of(m.name) for m in members}
    if len(dirs) != 1 or None in dirs or any(
        m.name.startswith("/") or ".." in m.name.split("/") or not m.isfile()
        for m in members):
      raise ValueError(f"{tar_file} is not a packed run record.")
    record_dir = os.path.join(records_root, dirs.pop())
    if os.path.exists(record_dir):
      shutil.rmtree(record_dir)
    for m in members:
      dest = os.path.join(records_root, m.name)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      with tar.extractfile(m) as src, open(dest, "wb") as f:
        shutil.copyfileobj(src, f)
  return record_dir


@dataclasses.dataclass
class Record:
  path: str
  config: Any  # ml_collections.ConfigDict
  card: dict[str, Any]
  summary: dict[str, Any] | None
  scores: dict[str, np.ndarray] | None
  robustness: dict[str, Any] | None = None  # analysis/robustness.json, if made

  @property
  def finished(self) -> bool:
    return bool(self.card.get("finished"))

  @property
  def has_weights(self) -> bool:
    return os.path.exists(os.path.join(self.path, workdirs.WEIGHTS_FILE))


def resumable(record_dir: str) -> int | None:
  """The step of the newest checkpoint a record holds (an unfinished run's, written
  with `checkpoint=True`; of a workdir, the same), or None."""
  steps = checkpoints.complete_steps(os.path.join(record_dir, workdirs.CHECKPOINTS_DIR))
  return steps[-1] if steps else None


def seed_workdir(record_dir: str, workdir: str) -> int:
  """Makes `workdir` the run a resumable record was written from, as far as training
  needs: its config, metrics, run card, weights and checkpoint, so that training
  there resumes from the record's checkpoint (on any machine). Replaces what
  `workdir` held; returns the checkpoint's step."""
  step = resumable(record_dir)
  if step is None:
    raise FileNotFoundError(f"{record_dir} holds no checkpoint: its run cannot be "
                            "resumed from it (only a stopped run's record written "
                            "with checkpoint=True can).")
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  os.makedirs(workdir)
  for path, name in _members(record_dir, "."):
    dest = os.path.normpath(os.path.join(workdir, name))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(path, dest)
  return step


def attackable(record_dir: str) -> bool:
  """Whether a record has its weights and no robustness report yet: what an accelerator
  window attacks. Read from the files alone, so that a record whose large files
  (weights, scores) were left out of a copy sent to an accelerator, to fit what a call
  carries, reads False without being loaded."""
  return (os.path.exists(os.path.join(record_dir, workdirs.WEIGHTS_FILE))
          and not os.path.exists(os.path.join(record_dir, workdirs.ROBUSTNESS_FILE)))


def load(record_dir: str) -> Record:
  """Reads a record (the analysis is None in the record of an unfinished run). Its
  config's fields added to invjax after the run take their defaults."""
  missing = [f for f in REQUIRED if not os.path.exists(os.path.join(record_dir, f))]
  if missing:
    raise FileNotFoundError(f"{record_dir} lacks {missing}: not a run record.")
  config = workdirs.load_config(record_dir)
  card = run_card.read(record_dir)
  summary = scores = None
  if os.path.exists(os.path.join(record_dir, workdirs.SUMMARY_FILE)):
    with open(os.path.join(record_dir, workdirs.SUMMARY_FILE)) as f:
      summary = json.load(f)
    with np.load(os.path.join(record_dir, workdirs.SCORES_FILE)) as f:
      scores = {k: f[k] for k in f.files}
  robustness = None
  if os.path.exists(os.path.join(record_dir, workdirs.ROBUSTNESS_FILE)):
    with open(os.path.join(record_dir, workdirs.ROBUSTNESS_FILE)) as f:
      robustness = json.load(f)
  return Record(record_dir, config, card, summary, scores, robustness)


def find(records_root: str) -> list[str]:
  """Every record directory under `records_root` (<cell>/<tag>/<variant>)."""
  out = []
  for dirpath, _, files in os.walk(records_root):
    if workdirs.CARD_FILE in files and workdirs.CONFIG_FILE in files:
      out.append(dirpath)
  return sorted(out)


SCHEDULE_FIELDS = ("num_epochs", "lr_boundaries", "lr_decay", "learning_rate",
                   "batch_size", "copies", "alpha", "alpha_ratio", "train_examples",
                   "test_examples", "model", "momentum", "nesterov", "augment")
# Fields that make the loss other than the paper's (as its text writes it).
LOSS_FIELDS = ("layer_weight_law", "invariance_denominator", "class_alpha",
               "alpha_boundaries", "alpha_decay")


def _moot(field: str, config) -> bool:
  """Whether `field` changes nothing in the run of `config`: the denominator defines
  L_inv, which weighs nothing at alpha = 0; the law also shares out class_alpha; alpha's
  schedule scales alpha, and its decay needs boundaries."""
  if field in ("invariance_denominator", "alpha_boundaries"):
    return not config.get("alpha")
  if field == "alpha_decay":
    return not config.get("alpha") or not config.get("alpha_boundaries")
  if field == "layer_weight_law":
    return not config.get("alpha") and not config.get("class_alpha")
  return False


def departures(config, reference) -> dict[str, tuple[Any, Any]]:
  """{field: (the record's value, the paper's)} of the fields that make a run shorter
  or other than the paper's (schedule, data subset, model, loss weights, the loss)."""
  def plain(v):
    v = v.to_dict() if hasattr(v, "to_dict") else v
    return json.loads(json.dumps(v))  # tuples and lists alike
  def model(c):  # every field of its model, those left out at the model's default
    fields = plain(c.get("model")) or {}
    return plain(models.field_defaults(fields.get("name"))) | fields
  out = {}
  for k in SCHEDULE_FIELDS + LOSS_FIELDS:
    a, b = plain(config.get(k)), plain(reference.get(k))
    if k == "model":
      a, b = model(config), model(reference)
    if a != b and not _moot(k, config):
      out[k] = (a, b)
  return out


def _short(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, list):
    return "(" + ", ".join(str(_short(x)) for x in v) + ")"
  return v


def status(record: Record, reference) -> str:
  """"full", or what makes the record's result provisional or another method's:
  "unfinished (step s of n)", "shortened (num_epochs 6 of 350, ...)" and/or "other
  loss (invariance_denominator class (paper batch))"."""
  parts = []
  if not record.finished:
    parts.append(f"unfinished: step {record.card['final_step']} of "
                 f"{record.card['total_steps']}")
  diff = departures(record.config, reference)
  loss = {k: diff.pop(k) for k in LOSS_FIELDS if k in diff}
  if diff:
    shown = ", ".join(f"{k} {_short(a)} (paper {_short(b)})" for k, (a, b) in diff.items()
                      if k not in ("model", "augment"))
    if "model" in diff:
      shown += (", " if shown else "") + f"model {diff['model'][0]}"
    if "augment" in diff:
      shown += (", " if shown else "") + "other augmentation"
    parts.append(f"shortened: {shown}")
  if loss:
    parts.append("other loss: " + ", ".join(f"{k} {_short(a)} (paper {_short(b)})"
                                             for k, (a, b) in loss.items()))
  return "; ".join(parts) or "full"


def score(record_dir: str, dataset: str | None = None, **overrides):
  """(per-image scores, summary) of a record's weights, computed here (no checkpoint,
  any device): the same scoring as `--mode=analyze`. `dataset` replaces the config's
  data path (a record made on another machine names that machine's path)."""
  from invjax import analyze  # pylint: disable=g-import-not-at-top
  from invjax import build as build_lib  # pylint: disable=g-import-not-at-top
  from invjax import config_lib  # pylint: disable=g-import-not-at-top
  from invjax import placement as placement_lib  # pylint: disable=g-import-not-at-top
  record = load(record_dir)
  if not record.has_weights:
    raise FileNotFoundError(f"{record_dir} holds no weights.npz.")
  config = record.config
  with config.unlocked():
    if dataset:
      config.dataset = dataset
    for k, v in overrides.items():
      config_lib.set_field(config, k, v)
  run = build_lib.build(config)
  placement = placement_lib.Placement.create()
  state, step = analyze.state_from_weights(
      run, placement, os.path.join(record_dir, workdirs.WEIGHTS_FILE))
  return analyze.score_state(config, run, state, step, placement)


def size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path)
             for f in fs)


def _main(argv):
  """python -m invjax.records unpack FILE.tar... [--into=experiments/results/records]"""
  into = "experiments/results/records"
  args = []
  for a in argv[1:]:
    if a.startswith("--into="):
      into = a.split("=", 1)[1]
    else:
      args.append(a)
  if not args or args[0] != "unpack" or len(args) < 2:
    raise SystemExit(_main.__doc__)
  for f in args[1:]:
    d = unpack(f, into)
    card = run_card.read(d)
    print(f"{d}: {run_card.describe(card)}")


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  _main(sys.argv)
