#!/usr/bin/env bash
# The next accelerator window's GPU work for issue 14, in the order it matters, as one
# command that every call of the window repeats:
#
#   OUT=/tmp/w PACK=$DEVICE_OUT/w.tgz RESUME=w1.tgz bash experiments/window_queue.sh
#
# Each line is experiments/gpu_window.sh with its settings. A call ends each phase by
# 10 s before WINDOW_END (default 560 s after the queue starts: a call of 590 s with
# the install line before it) and starts none with under 40 s left; what it finished
# is in $OUT/phases.txt and PACK. The next call, on the same machine
# (which keeps $OUT) or on a fresh one (RESUME, the last pack put in the checkout),
# skips what is done and goes on. On a CPU, `bash experiments/gpu_rehearsal.sh queue`
# rehearses it at toy sizes.
#
# The question, from the census without a GPU (docs/performance.md, "What the host
# launches a step"): does a step go faster as one CUDA graph? XLA's defaults launch
# All-CNN-C's step as 84 host launches and DenseNet-BC's as 881; `convgraph` (every
# command type in command buffers, the convolutions as cuDNN fusions) makes the whole
# 10-step program one. In order:
#   1. All-CNN-C's steps under convgraph, then at XLA's defaults (the comparison).
#   2. DenseNet-BC's under convgraph (11-27b at the defaults: 12.46 / 12.40 ms).
#   3. DenseNet-BC's training program compiled under convgraph, and from the cache
#      (the <= 30 s and <= 5 s targets; no convolution autotuning there).
#   4. allcmdbuf (every command type, convolutions still XLA's thunks) for both.
#   5. DenseNet-BC at the defaults with flax's batch norm beside the fused one (flax's
#      has more kernels but fewer host launches: 579 against 881).
#   6. DenseNet-BC with XLA's fusion autotuner off (its compile's largest pass).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
WINDOW_END=${WINDOW_END:-$(( $(date +%s) + 560 ))}
export OUT WINDOW_END
g="bash experiments/gpu_window.sh"
two=same_batch,moments
XLA_VARIANTS=$two XLA_MODELS=allcnn XLA_LIMIT=100 XLA_SETTINGS="convgraph default" $g xla
XLA_VARIANTS=$two XLA_MODELS=densenet XLA_LIMIT=150 XLA_SETTINGS=convgraph $g xla
XLA_SETTINGS=convgraph $g compilexla
XLA_VARIANTS=$two XLA_MODELS=allcnn XLA_SETTINGS=allcmdbuf $g xla
XLA_VARIANTS=$two XLA_MODELS=densenet XLA_LIMIT=150 XLA_SETTINGS=allcmdbuf $g xla
XLA_VARIANTS=same_batch,same_batch_flax_bn XLA_TAG=bn XLA_MODELS=densenet XLA_LIMIT=150 \
  XLA_SETTINGS=default $g xla
XLA_VARIANTS=$two XLA_MODELS=densenet XLA_LIMIT=150 XLA_SETTINGS=nofusiontune $g xla
cat "$OUT/phases.txt"
