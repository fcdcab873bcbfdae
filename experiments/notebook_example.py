# %% [markdown]
# # Probing the quickstart's two runs from Python
#
# A percent-format script: run it as a script, or open it as a notebook (Jupyter with
# jupytext, VS Code, PyCharm run its `# %%` cells).
#
#   python -m experiments.quickstart --workdir=/tmp/invjax_quickstart
#   python -m experiments.notebook_example --workdir=/tmp/invjax_quickstart --out=docs
#
# It loads the baseline and the invariance model of the quickstart, shows test images
# with their transformed copies, scores every layer's invariance, measures L_inv on a
# batch of augmented copies, compares the two models' layers by linear CKA and RSA,
# and exports two layers' activations for tools outside invjax.

# %%
import argparse
import os
import time

import numpy as np

from invjax import api
from invjax import report

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--workdir", default="/tmp/invjax_quickstart",
                    help="The quickstart's workdir (with baseline/ and invariance/).")
parser.add_argument("--out", default="",
                    help="Where the figures go (default: WORKDIR/notebook).")
parser.add_argument("--export", default="",
                    help="Where the activations go (.npz, or .h5 with h5py; default: "
                    "WORKDIR/notebook/invariance_activations.npz).")
parser.add_argument("--images", type=int, default=0,
                    help="Use the first N test images (0: all).")
# parse_known_args: a notebook kernel passes arguments of its own.
args, _ = parser.parse_known_args()
out = args.out or os.path.join(args.workdir, "notebook")
t0 = time.time()


def show(path):
  """Displays a figure inside a notebook; prints its path in a script."""
  print("figure:", path)
  try:
    import IPython  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if IPython.get_ipython() is not None:
    IPython.display.display(IPython.display.Image(path))


# %% [markdown]
# ## Load both runs
# `api.load_run` reads each workdir's config.json, builds its model and restores the
# latest checkpoint onto the devices there are (`step=` picks another).

# %%
runs = {v: api.load_run(os.path.join(args.workdir, v))
        for v in ("baseline", "invariance")}
for run in runs.values():
  print(run)
baseline, invariance = runs["baseline"], runs["invariance"]
data = invariance.data
x, y = data.x_test[:args.images or None], data.y_test[:args.images or None]
for name, run in runs.items():
  print(f"{name}: test accuracy {np.mean(run.predict(x) == y):.4f} on {len(x)} images")

# %% [markdown]
# ## Images and their transformed copies
# The scoring transformations (the halved ranges' extremes, Eq. 2) of the first test
# images: exactly the copies that `invariance_scores` scores below.

# %%
copies = invariance.transformed(x)
show(report.plot_copies(x[:4], copies[:4], os.path.join(out, "notebook_copies.png"),
                        title="test images and their scoring transformations"))

# %% [markdown]
# ## Per-layer invariance scores
# Eq. 2 for every test image and every copy; the images given are the reference set of
# the denominator, so all test images give the run's `--mode=analyze` scores.

# %%
scores = {name: run.invariance_scores(x) for name, run in runs.items()}
print(f"{'median score':14s}" + "".join(f"{n:>12s}" for n in runs))
for layer in invariance.layers:
  print(f"{layer:14s}" + "".join(f"{np.median(scores[n][layer]):12.3f}" for n in runs))
show(report.plot_scores(scores, os.path.join(out, "notebook_scores.png"),
                        title=f"invariance scores of {len(x)} test images"))

# %% [markdown]
# ## L_inv of a batch of augmented copies
# 16 test images, 8 training-style augmentations of each (eval mode, as the training
# probe measures it; Eq. 3: within-image over all-pairs distances, lower is more
# invariant).

# %%
batch = invariance.augmented_copies(x[:16], copies=8, seed=0)
inv = {name: run.invariance_loss(batch) for name, run in runs.items()}
print(f"{'L_inv':14s}" + "".join(f"{n:>12s}" for n in runs))
for layer in invariance.layer_shapes:
  print(f"{layer:14s}" + "".join(f"{inv[n][layer]:12.3f}" for n in runs))

# %% [markdown]
# ## Representation similarity, baseline vs invariance
# Linear CKA (and RSA with correlation distance) of every baseline layer with every
# invariance layer on the same test images, streamed in blocks of images.

# %%
for measure, label in (("cka", "linear CKA"), ("rsa", "RSA")):
  matrix, rows, cols = api.compare(baseline, invariance, x, measure=measure)
  print(f"{label}, same layer:", " ".join(f"{r} {v:.2f}" for r, v in
                                         zip(rows, np.diag(matrix))))
  show(report.plot_similarity(
      matrix, rows, cols, os.path.join(out, f"notebook_{measure}.png"),
      row_label="baseline", col_label="invariance", measure=label,
      title=f"{label}, {len(x)} test images"))

# %% [markdown]
# ## Export for other tools
# One array per layer in an .npz (an .h5 name writes HDF5 where h5py is installed).

# %%
exported = [invariance.layers[len(invariance.layers) // 2], invariance.layers[-1]]
path = invariance.export_activations(
    args.export or os.path.join(args.workdir, "notebook", "invariance_activations.npz"),
    x, exported)
print("exported", exported, "of", len(x), "images to", path)
print(f"wall time {time.time() - t0:.0f} s")
