"""Stopping a run that went wrong: a non-finite or diverged loss, or a dead network
(one whose class scores are the same for every input), named with the step it began."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from invjax import errors
from invjax import steps as steps_lib


# A network whose class scores differ by at most this much (relative to their size)
# between the probe images gives one answer for every input: it has died.
DEAD_SPREAD = 1e-6


def class_score_spread(state, images) -> jax.Array:
  """How much the eval-mode class scores differ between `images` (uint8), relative to
  their size: max |logits_i - logits_0| / (1 + max |logits|). 0 for a dead network; 1
  (never dead) if the images themselves are all the same."""
  logits = steps_lib.eval_logits(state, steps_lib.to_float(images)).astype(jnp.float32)
  spread = jnp.max(jnp.abs(logits - logits[:1])) / (1.0 + jnp.max(jnp.abs(logits)))
  same_images = jnp.all(images == images[:1])
  return jnp.where(same_images, 1.0, spread)


def divergence_limit(config, num_classes: int) -> float:
  """The cross-entropy above which a step counts as diverged: config.divergence_factor
  times ln(num_classes), the cross-entropy of a uniform guess (ln 2 at least); inf when
  the factor is 0. A healthy run starts near ln(num_classes) and goes down."""
  factor = config.divergence_factor
  return factor * max(np.log(num_classes), np.log(2)) if factor else np.inf


def summarize(pending: list[tuple[int, dict]], ce_limit: float = np.inf,
               last_saved: int | None = None) -> dict[str, float]:
  """Means of the metrics of the steps run since the last summary.

  `pending` holds (first step, {name: [S] values}) per program run. Raises
  DivergenceError naming the first step whose terms were not finite or whose
  cross-entropy exceeded `ce_limit` (`divergence_limit`).
  """
  fetched = jax.device_get(pending)
  kept = ("there is none before it either" if last_saved is None else
          f"the last good one (step {last_saved}) is kept")
  for step0, metrics in fetched:
    bad = {k: np.flatnonzero(~np.isfinite(np.asarray(v))) for k, v in metrics.items()}
    first = min((int(i[0]) for i in bad.values() if len(i)), default=None)
    ce = np.asarray(metrics["cross_entropy"]).reshape(-1)
    over = np.flatnonzero(np.isfinite(ce) & (ce > ce_limit))
    if len(over) and (first is None or over[0] < first):
      raise errors.DivergenceError(
          f"training diverged at step {step0 + int(over[0]) + 1}: cross_entropy "
          f"{ce[over[0]]:.4g} > {ce_limit:.3g} (config.divergence_factor x ln of the "
          f"number of classes, the loss of a uniform guess). No checkpoint was written "
          f"after it; {kept}. Lower config.learning_rate (or set "
          "config.divergence_factor=0 to go on).")
    if first is not None:
      terms = [k for k, i in bad.items() if first in i]
      raise errors.DivergenceError(
          f"non-finite training loss at step {step0 + first + 1}: {', '.join(terms)} "
          f"(terms: cross_entropy, inv_loss/<layer>). No checkpoint was written after "
          f"it; {kept}. Lower config.learning_rate or check the data.")
  names = fetched[0][1]
  return {k: float(np.mean(np.concatenate([np.atleast_1d(m[k]) for _, m in fetched])))
          for k in names}


def check_alive(step: int, spread: float, last_saved: int | None) -> None:
  """Stops a run whose network has died (`spread`, of `class_score_spread`, at most
  DEAD_SPREAD), before it is checkpointed."""
  if not spread <= DEAD_SPREAD:  # NaN too: the non-finite checks name it
    return
  kept = ("it was not checkpointed, nor was anything before it" if last_saved is None
          else f"it was not checkpointed; the last good checkpoint (step "
          f"{last_saved}) is kept")
  raise errors.DivergenceError(
      f"training diverged at step {step}: the network is dead, its class scores "
      f"are the same for every probe image (spread {spread:.2g}), so it gives one "
      f"answer whatever the input; {kept}. Lower config.learning_rate (or set "
      "config.stop_dead_network=False to go on).")


def state_is_finite(state) -> jax.Array:
  """Whether every floating-point array of the state (parameters, batch-norm
  statistics, optimizer state) is finite."""
  return jnp.all(jnp.stack([
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((state.params,
                                                         state.batch_stats,
                                                         state.opt_state))
      if jnp.issubdtype(x.dtype, jnp.floating)]))
