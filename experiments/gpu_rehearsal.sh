#!/usr/bin/env bash
# Rehearse an accelerator window on this CPU before spending device time on it: the
# window's commands, run as they will run there, at toy sizes, in the GPU image's
# package versions.
#
#   bash experiments/gpu_rehearsal.sh [PHASE ...]   # default: paper env loss allcnn wrn profile augment
#   bash experiments/gpu_rehearsal.sh queue         # experiments/window_queue.sh, whole
#
# It makes (once, in $REHEARSAL_VENV, default /tmp/invjax_gpu_image) a virtual
# environment of what the team's GPU image has, as ../shared/tools/gpu-prepare.sh
# records it (Python 3.12, jax 0.11.2, flax 0.12.10, optax 0.2.8, orbax-checkpoint
# 0.12.4, chex, numpy, scikit-learn, matplotlib, pillow, tensorboard; no TensorFlow,
# tensorflow-datasets, dm-pix, ml-collections or clu), clones this repository's HEAD
# into a scratch folder, puts the wheels the image lacks into it and, for the paper
# phase, the CIFAR-10 pack as a window carries it (gpu-prepare.sh's, then
# experiments/carry_pack.py's xz form in workdirs/carry_data, the phase's PAPER_DATA
# unless that is set; the plain pack removed), leaves the committed records' weights
# and scores out of the clone as the plan for a window that trains does, then runs
# experiments/gpu_window.sh there behind the same install line a window starts with.
# WINDOW_ARGS is added to the paper phase's toy-size window.py arguments (e.g. the
# window's own "--records=/tmp/none --variants=baseline,invariance --norobustness").
# Results: $REHEARSAL_OUT (default /tmp/invjax_rehearsal/out), one .tgz as a window
# returns it, and the phases' outcomes printed at the end. Needs the package index
# (pip) and, for the paper phase, ../shared.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
venv=${REHEARSAL_VENV:-/tmp/invjax_gpu_image}
scratch=${REHEARSAL_DIR:-/tmp/invjax_rehearsal}
out=${REHEARSAL_OUT:-$scratch/out}
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(paper env loss allcnn wrn profile augment)
python312=${PYTHON312:-}
if [ -z "$python312" ]; then  # the first that runs (a pyenv shim may exist and fail)
  for p in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$p" --version > /dev/null 2>&1; then python312=$p; break; fi
  done
fi
if [ ! -x "$venv/bin/python3" ]; then
  [ -n "$python312" ] || { echo "no working python3.12 found: set PYTHON312" >&2; exit 2; }
  "$python312" -m venv "$venv"
  "$venv/bin/pip" install -q jax==0.11.2 jaxlib==0.11.2 flax==0.12.10 optax==0.2.8 \
    orbax-checkpoint==0.12.4 chex numpy scikit-learn matplotlib pillow tensorboard \
    2> >(grep -v '^WARNING: Location' >&2)
fi
rm -rf "$scratch/p" "$out" "$scratch/site"
mkdir -p "$scratch"
git clone -q "$repo" "$scratch/p"
cd "$scratch/p"
prepare=$repo/../shared/tools/gpu-prepare.sh
if [[ " ${phases[*]} " == *" paper "* ]]; then
  bash "$prepare" > /dev/null
  rm -f experiments/results/records*/*/*/*/weights.npz \
    experiments/results/records*/*/*/*/analysis/scores.npz
  if [ -z "${PAPER_DATA:-}" ]; then
    "$venv/bin/python3" -m experiments.carry_pack --out=workdirs/carry_data
    rm data/cifar10_jpeg.npz
    export PAPER_DATA=workdirs/carry_data
  fi
else
  bash "$prepare" --no-data > /dev/null
fi
echo "carried: $(du -sb --exclude=.git . | cut -f1) bytes (a window carries at most 67108864)"
export PATH=$venv/bin:$PATH
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$scratch/site" .whl/*.whl
export PYTHONPATH=$scratch/site:$PWD PYTHONUNBUFFERED=1
script=experiments/gpu_window.sh
if [ "${phases[*]}" = queue ]; then  # the next window's queue, whole
  script=experiments/window_queue.sh phases=()
  export WINDOW_END=${WINDOW_END:-$(( $(date +%s) + 3600 ))}
fi
OUT=$out PACK=$scratch/window.tgz TIME_SCALE=${TIME_SCALE:-5} PAPER_MINUTES=4 \
  BENCH_ARGS="--size=small --repeats=1 --train_images=256 --analysis_images=32" \
  COMPILE_ARGS="--config.model.depth=16 --config.batch_size=16 --steps=2 --time_steps=1" \
  WINDOW_ARGS="--epochs=1 --train_examples=512 --test_examples=256 \
--set=model.width=0.125 --nohalf_precision ${WINDOW_ARGS:-}" \
  bash "$script" ${phases[@]+"${phases[@]}"} > "$scratch/rehearsal.log" 2>&1 || true
cat "$out/phases.txt"
echo "pack: $(tar tzf "$scratch/window.tgz" | wc -l) entries in $scratch/window.tgz; log: $scratch/rehearsal.log"
! grep -qv "rc=0 " "$out/phases.txt"
