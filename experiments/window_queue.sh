#!/usr/bin/env bash
# The next accelerator window's GPU work for issue 14, in the order it matters, as one
# command that every call of the window repeats:
#
#   OUT=/tmp/w PACK=$DEVICE_OUT/w.tgz RESUME=w1.tgz bash experiments/window_queue.sh
#
# Each line is experiments/gpu_window.sh with its settings. A call ends each phase by
# 10 s before WINDOW_END (default 560 s after the queue starts: a call of 590 s with
# the install line before it) and starts none with under 30 s left; what it finished
# is in $OUT/phases.txt and PACK. The next call, on the same machine
# (which keeps $OUT) or on a fresh one (RESUME, the last pack put in the checkout),
# skips what is done and goes on. On a CPU, `bash experiments/gpu_rehearsal.sh queue`
# rehearses it at toy sizes.
#
# The question: does config.gpu_compile = graph (placement.GPU_COMPILE: the whole
# program one CUDA graph, convolutions as cuDNN fusions, no fusion autotuning), now
# what configs/allcnn.py and densenet.py ask for, give invjax.main's programs what the
# same XLA options gave the benchmark as XLA_FLAGS in the window of 11-28c (DenseNet-BC's
# step 9.37 ms, its first step program compiled in 23.6 s; All-CNN-C's step unchanged,
# compiled in 4.3 s)? In order:
#   1. DenseNet-BC's training program compiled as `python -m invjax.main
#      --config=configs/densenet.py` compiles it, then from the cache: the <= 30 s and
#      <= 5 s targets.
#   2. The profiler on All-CNN-C's and WRN-28-10's steps (experiments/profile_step.py):
#      the kernels the loss adds, the augmentation's and the seed gather's time inside
#      a step, what separates WRN-28-10's step from its FLOP floor (the issue asks for
#      it; no window has had the time). At XLA's defaults (--gpu_compile=xla): kernels
#      launched one by one, as the profiler has always seen them (All-CNN-C's step
#      takes the same time either way, 11-28c).
#   3. DenseNet-BC's same batch and invariance steps as configured and at XLA's
#      defaults, in one window: the step's ratio (11-27b and 11-28c were two windows);
#      as configured also 3 invariance runs in one program (stacked): DenseNet-BC's
#      step uses 1.4 % of the chip's peak, so whether training a cell's runs together
#      buys throughput (All-CNN-C's: 0.63 x on 11-27, its convolutions grouped).
#   4. All-CNN-C's steps as configured (11-28c timed the same options as XLA_FLAGS).
#   5. WRN-28-10's under convgraph and at XLA's defaults: whether its config should ask
#      for graph too (never timed).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
WINDOW_END=${WINDOW_END:-$(( $(date +%s) + 560 ))}
export OUT WINDOW_END
g="bash experiments/gpu_window.sh"
two=same_batch,moments
XLA_SETTINGS=config $g compilexla
PROFILE_MODELS=allcnn,wrn BENCH_ARGS=--gpu_compile=xla $g profile
XLA_VARIANTS=$two,stacked XLA_MODELS=densenet XLA_LIMIT=200 XLA_SETTINGS=config $g xla
XLA_VARIANTS=$two XLA_MODELS=densenet XLA_LIMIT=150 XLA_SETTINGS=default $g xla
XLA_VARIANTS=$two XLA_MODELS=allcnn XLA_LIMIT=100 XLA_SETTINGS=config $g xla
XLA_VARIANTS=$two XLA_MODELS=wrn XLA_LIMIT=120 XLA_SETTINGS="convgraph default" $g xla
cat "$OUT/phases.txt"
