"""`--mode=analyze`: invariance scores (Eq. 2) of a trained run, every sown layer.

Reads the latest checkpoint in WORKDIR and writes WORKDIR/analysis/scores.npz
(per-image scores, [N, num_transforms] per layer, "pixels" first), analysis/summary.json
(test accuracy, per-layer medians and quartiles, and the accuracy on the transformed
test images that were scored: "transformed_test", the mean and each of the
num_transforms copies) and figures/invariance_scores.png. The accuracies come from the
scoring's own forward passes: no extra pass over the test set.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from invjax import analysis
from invjax import augment
from invjax import build as build_lib
from invjax import checkpoints
from invjax import distributed
from invjax import errors
from invjax import evaluation
from invjax import placement as placement_lib
from invjax import run_card
from invjax import steps as steps_lib
from invjax import workdirs

# Changes when the same checkpoint would get other scores (e.g. other transformation
# draws); summaries of another version are redone by experiment.run_variant.
# 2: each image's scoring transformations from its own key (augment_each).
# 3: a flipped copy is the mirror image of the unflipped one (augment.forward_matrix),
#    where with a rotation it was also squeezed and sheared.
SCORING_VERSION = 3
SCORES_FILE = workdirs.SCORES_FILE
SUMMARY_FILE = workdirs.SUMMARY_FILE
FIGURE_FILE = workdirs.SCORES_FIGURE


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
             placement: placement_lib.Placement):
  """Batches of `batch_size` uint8 test images (made float on device) and labels,
  split over the devices of every process. A batch that does not split evenly is
  padded to the next multiple of the device count and its padding marked; with the
  per-image transformations of `augment_each`, the scores do not depend on the number
  of devices or processes."""
  n_dev, n, passes = jax.device_count(), len(images), [0]

  def gen():  # one pass over the images; the log says when each quarter was sent
    passes[0] += 1
    t0, quarters = time.perf_counter(), [n * q // 4 for q in (1, 2, 3, 4)]
    for start in range(0, n, batch_size):
      x, y = images[start:start + batch_size], labels[start:start + batch_size]
      x, y, valid = placement_lib.pad_batch(
          x, y, placement_lib.padded_to_devices(len(x), n_dev))
      yield analysis.Batch(placement.shard(x), placement.shard(y), placement.shard(valid))
      done = start + len(x)
      if any(start < q <= done for q in quarters):
        logging.info("scoring, pass %d: %d of %d images in %.0f s", passes[0], done, n,
                     time.perf_counter() - t0)
  return gen


def summarize(scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  out = {}
  for layer, s in scores.items():
    s = s[np.isfinite(s)]
    q1, med, q3 = np.percentile(s, [25, 50, 75])
    out[layer] = {"median": float(med), "q1": float(q1), "q3": float(q3),
                  "mean": float(np.mean(s))}
  return out


def check_outputs_writable(workdir: str) -> None:
  """Refuses, before any scoring, a workdir where the outputs cannot be written."""
  if not distributed.is_primary():
    return
  for sub in (os.path.dirname(SCORES_FILE), os.path.dirname(FIGURE_FILE)):
    path = os.path.join(workdir, sub)
    try:
      os.makedirs(path, exist_ok=True)
      probe = os.path.join(path, f".write-test-{os.getpid()}")
      with open(probe, "w") as f:
        f.write("invjax checks that it can write here\n")
      os.remove(probe)
    except OSError as e:
      raise errors.WorkdirError(
          f"{path} cannot be written ({e.strerror or e}): the analysis writes its scores "
          f"and figure there. Make it writable (or copy the run to a --workdir that "
          "is) and analyze again; nothing was scored.") from e


def state_from_weights(run, placement, path: str):
  """(a train state holding the weights of `path`, their step): the parameters and
  batch-norm statistics that `checkpoints.save_weights` wrote (a run's weights.npz, or
  a record's), in the model of `run`. No optimizer state: for analysis only."""
  return with_weights(build_lib.initial_state(run, placement), placement, path,
                      run.config.model)


def with_weights(state, placement, path: str, model_config):
  """(`state` with the parameters and batch-norm statistics of `path` in place of its
  own, replicated; their step). CheckpointError where they do not fit its model
  (`model_config`, named in the message)."""
  params, batch_stats, step = checkpoints.load_weights(path)
  want = jax.tree.map(lambda a: (a.shape, str(a.dtype)),
                      (state.params, state.batch_stats))
  got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), (params, batch_stats))
  if want != got:
    raise errors.CheckpointError(
        f"the weights in {path} do not fit the model of this config "
        f"({model_config}); use the config they were trained with.")
  return state.replace(params=placement.replicate(params),
                       batch_stats=placement.replicate(batch_stats)), step


def scorer(config, run, weights=None) -> analysis.Scorer:
  """The programs of `--mode=analyze` (`analysis.Scorer`): Eq. 2 for every sown layer
  under the config's scoring transformations, with the classification sums of the
  same forward passes, for the devices `run` was built for."""
  ranges = augment.AugmentRanges.from_config(config.augment)
  # Image i of a batch gets split(batch key, n)[i]: the same with or without padding.
  transform = lambda key, x: augment.augment_each(key, x, ranges, scoring=True)
  top5 = run.step_config.top5
  return analysis.Scorer(
      steps_lib.features_and_logits, config.analysis.num_transforms, transform,
      preprocess=steps_lib.to_float,
      metrics_fn=lambda logits, labels, mask: steps_lib.classification_sums(
          logits, labels, top5, mask), weights=weights,
      platform=run.platform)


def score_state(config, run, state, step: int, placement):
  """(per-image scores, summary) of the model in `state`: Eq. 2 for every sown layer
  over the test set, and the accuracy on the clean and the scored transformed
  images. Writes nothing."""
  ac = config.analysis
  logging.info("scoring %d test images x %d transformations, %d layers",
               len(run.data.x_test), ac.num_transforms, len(run.layer_shapes) + 1)
  # One clean and num_transforms transformed forward passes per image give the scores
  # and the accuracy on the clean and on exactly the scored transformed images.
  # The state goes in as an argument (weights), not as constants of the programs.
  scores, sums = scorer(config, run, weights=state)(
      batches(run.data.x_test, run.data.y_test, ac.batch_size, placement),
      jax.random.key(ac.seed))
  test = evaluation.rates(sums["clean"])
  passes = [evaluation.rates(s) for s in sums["transformed"]]
  robustness = {k: float(np.mean([p[k] for p in passes])) for k in passes[0]}
  robustness["accuracy_per_pass"] = [p["accuracy"] for p in passes]
  summary = {"step": int(step), "scoring_version": SCORING_VERSION,
             "dataset": run.data.name, "model": config.model.name,
             "variant": config.variant, "copies": config.copies, "alpha": config.alpha,
             "test": test, "transformed_test": robustness, "layers": summarize(scores)}
  return scores, summary


def _weights_if_no_checkpoint(workdir: str) -> str | None:
  """None where the workdir holds a checkpoint; else the path of its weights.npz (a run
  record's); RunNotFound where it holds neither."""
  if workdirs.has_checkpoint(workdir):
    return None
  directory = os.path.join(workdir, workdirs.CHECKPOINTS_DIR)
  weights = os.path.join(workdir, workdirs.WEIGHTS_FILE)
  if os.path.exists(weights):
    return weights
  raise errors.RunNotFound(
      f"no checkpoint in {os.path.abspath(directory)}: train first "
      f"(python -m invjax.main --config=... --workdir={workdir}).")


def restore(config, workdir: str, data=None, run=None):
  """(run, placement, state, step): the newest checkpoint of the run in `workdir` that
  restores (setting damaged ones aside, as training does), or, where it holds no
  checkpoint, its weights.npz (e.g. a run record); the state replicated over every
  device."""
  run = run if run is not None else build_lib.build(config, data)
  weights = _weights_if_no_checkpoint(workdir)
  placement = placement_lib.Placement.create()
  if weights is not None:
    state, step = state_from_weights(run, placement, weights)
    return run, placement, state, step
  ckpts = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
  try:
    state, step = workdirs.restore_latest(ckpts, build_lib.restore_target(
        run, placement, bool(ckpts.manager.all_steps())), config, workdir)
  finally:
    ckpts.close()
  return run, placement, state, step


def analyze(config, workdir: str, data=None) -> dict[str, Any]:
  """Scores the run in `workdir` (see `restore`: its newest good checkpoint, or its
  weights); returns the summary. The seconds it took go into the run card."""
  t0 = time.perf_counter()
  run = build_lib.build(config, data)
  _weights_if_no_checkpoint(workdir)  # nothing to score: say so first
  check_outputs_writable(workdir)
  lock = workdirs.lock(workdir, "analyze")
  try:
    _, placement, state, step = restore(config, workdir, run=run)
    scores, summary = score_state(config, run, state, step, placement)
    if distributed.is_primary():
      os.makedirs(os.path.join(workdir, workdirs.ANALYSIS_DIR), exist_ok=True)
      np.savez_compressed(os.path.join(workdir, SCORES_FILE), **scores)
      with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
      from invjax import report  # pylint: disable=g-import-not-at-top
      report.plot_scores({config.variant: scores}, os.path.join(workdir, FIGURE_FILE),
                         title=f"{config.model.name} on {run.data.name}, step {step}")
      run_card.add_analysis(workdir, step, time.perf_counter() - t0)
    distributed.barrier("invjax: analysis written")  # others may read it next
    return summary
  finally:
    if lock is not None:
      lock.release()


def current_summary(workdir: str, step: int) -> dict[str, Any] | None:
  """The analysis summary in `workdir` if it scored `step` with today's scoring
  (SCORING_VERSION), else None (none yet, of another step, or stale)."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  if (summary.get("step") != step or
      summary.get("scoring_version") != SCORING_VERSION):
    return None
  return summary


def load(workdir: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(per-image scores, summary) written by `analyze` in `workdir`."""
  path = os.path.join(workdir, SCORES_FILE)
  if not os.path.exists(path):
    raise errors.RunNotFound(f"{path} does not exist: run --mode=analyze on "
                            f"{workdir} first.")
  with np.load(path) as f:
    scores = {k: f[k] for k in f.files}
  with open(os.path.join(workdir, SUMMARY_FILE)) as f:
    return scores, json.load(f)
