#!/usr/bin/env bash
# The benchmark in a short accelerator window: phases, each in its own process with its
# own time limit, each writing its results under $OUT as soon as it has them (a phase
# that runs out of time loses only itself; benchmark.py also rewrites its files after
# every model).
#
#   OUT=/path bash experiments/gpu_window.sh [PHASE ...]   # default: every phase
#
# Phases (seconds allowed, on one H100/H200):
#   paper     (PAPER_MINUTES x 60 + 60; not in the default list) the paper's All-CNN-C
#                   cell at full scale: unpacks and decodes the CIFAR-10 pack carried
#                   in PAPER_DATA to /tmp/cifar10.npz and runs experiments/window.py
#                   with --budget_minutes=PAPER_MINUTES (default 6, fractions allowed)
#                   for the cell's variants that have no finished committed record, in
#                   the order baseline, invariance, batchaug; packed records and
#                   window.json in $OUT/records. WINDOW_ARGS is added to its command
#                   (the CPU smoke test: "--epochs=1 --train_examples=512
#                   --test_examples=256"). A call carries at most 64 MiB: make the
#                   pack with `python -m experiments.carry_pack` (the 56 MB JPEG pack
#                   as 18 MB of xz, in workdirs/carry_data) and carry [".whl",
#                   "workdirs/carry_data"] with PAPER_DATA=workdirs/carry_data (never
#                   data/, where the CPU's decoded cifar10.npz, 184 MB, may lie). The
#                   tracked tree (44 MB, 34 of them the committed records' weights.npz
#                   and analysis/scores.npz) then fits beside it; delete those from
#                   the working tree for room (the run cards are enough to skip those
#                   variants: rm -f experiments/results/records*/*/*/*/weights.npz
#                   experiments/results/records*/*/*/*/analysis/scores.npz) and
#                   restore them after (git checkout -- experiments/results/records*);
#                   gpu_rehearsal.sh does the same. Keep a stopped record's
#                   checkpoints/ (All-CNN-C 10.2 MB, DenseNet-BC 6.1 MB): window.py
#                   resumes the run from it (WINDOW_ARGS="--cell=densenet_cifar10" for
#                   DenseNet-BC). PAPER_DATA (default data, gpu-prepare.sh's plain
#                   pack) is the folder of the pack (cifar10_jpeg.npz or .npz.xz) and
#                   its decode.py: a window that only attacks the committed records
#                   (each finished one with weights and no robustness report, on every
#                   test image) carries the records whole and the test set with 2,000
#                   training images (`python -m experiments.carry_pack --train=2000
#                   --out=workdirs/attack_data`, 3.6 MB).
#   env       (60)  the device, JAX and the packages
#   loss      (60)  experiments/loss_cost.py: L_inv alone, All-CNN-C width 1, bf16,
#                   16 x 8: XLA's bytes accessed over the activations' bytes, and time
#   allcnn    (240) every training variant (the moments method in the accelerators'
#                   one-read form and in the per-seed form; the same batch and moments
#                   with flax's batch norm beside the fused one), 3 runs in one
#                   program, the loss alone, augmentation, analysis
#   wrn       (300) baseline, same batch (also with flax's batch norm), moments in both
#                   forms, the loss alone, analysis
#   densenet  (420) same batch, moments, both again with the bottlenecks widened
#                   (model.widen_bottlenecks), the loss alone (the first compile took
#                   108 s on the H200 on 11-27, the second 22 s: autotuning shared)
#   augment   (60)  not in the default list: python -m experiments.augment_cost, the augmentation
#                   alone with invjax's 2-D warp and dm-pix's, side by side
#   compile   (330) not in the default list: DenseNet-BC-100's training program (bf16,
#                   10 steps), trace + lower and XLA compile, then 3 timed programs: first
#                   at the default level of XLA's GPU autotuning with a fresh persistent
#                   cache, compiled again from it (a rerun's or resume's compile: the
#                   targets' figures), then with autotuning off
#                   (--xla_gpu_autotune_level=0) and at level 1 (no checking of the
#                   candidates' outputs); each also a JSON line in $OUT/compile.jsonl
#                   (this and compile1: config.gpu_compile = xla, XLA_FLAGS deciding;
#                   compilexla's config setting compiles as invjax.main does)
#   xla       (All-CNN-C 75, WRN-28-10 100, DenseNet-BC 110 a model and setting) not in
#                   the default list: the same batch and moments steps (All-CNN-C also
#                   1 step a program) of each model of XLA_MODELS (default allcnn) under
#                   each XLA_FLAGS setting of XLA_SETTINGS (default "default nocmdbuf
#                   allcmdbuf"), each its own process and folder, each limited to
#                   the seconds above or XLA_LIMIT
#                   $OUT/xla_<setting>/benchmark_<model>: the defaults, CUDA-graph
#                   command buffers off, and command buffers for every command type
#                   (loops and conditionals included) from the first execution;
#                   also nofusiontune (not in the default list): XLA's autotuning
#                   between its native and Triton fusion emitters off, what its step
#                   costs (compile1 times its compile); and convgraph (not in the
#                   default list): allcmdbuf with the convolutions as cuDNN fusions,
#                   which command buffers can hold (XLA's convolution thunks end
#                   them), with the fusion autotuner off: the whole step one CUDA
#                   graph, the loop too where the driver has conditional nodes;
#                   convgraphtuned: the same with the fusion autotuner on (cuDNN's
#                   plans timed, not its first taken; a longer compile); config: no
#                   XLA_FLAGS, the options the model's config asks for
#                   (config.gpu_compile: graph, the same as convgraph, for All-CNN-C
#                   and DenseNet-BC), as invjax.main runs it. Every other setting
#                   runs with --gpu_compile=xla, its XLA_FLAGS alone deciding.
#                   Each model and setting also writes launches_<model>.md: the host's
#                   launches a step of each training program, from the thunk
#                   sequences XLA dumped (experiments/launches.py; XLA_LAUNCHES=0: not)
#                   All-CNN-C's step is bound by launching its kernels (1 step a
#                   program: 2.63 ms, 10 steps: 1.90 ms on the H200), DenseNet-BC's
#                   1,080 kernels take 11.5 us each: this says whether XLA's command
#                   buffers move that, i.e. whether a flag is worth setting by default.
#                   XLA_TAG=T names the folders xla_<setting>_T (the same setting
#                   again with other XLA_VARIANTS, e.g. same_batch,same_batch_flax_bn)
#   compilexla (150 a setting) not in the default list: DenseNet-BC's training program
#                   (bf16, 10 steps) under each setting of XLA_SETTINGS (default
#                   config: as invjax.main compiles it, config.gpu_compile included;
#                   the others as in xla): compiled in a fresh persistent cache, again
#                   from it (a rerun's compile), then 3 timed programs; in
#                   $OUT/compile.jsonl
#   compile1  (400) not in the default list: DenseNet-BC's training program (bf16, 10
#                   steps) compiled with a fresh persistent cache, then again from it
#                   (a rerun's compile), 3 timed programs after each: as configured and
#                   with model.widen_bottlenecks, each with XLA's defaults and with
#                   --xla_gpu_experimental_enable_fusion_autotuner=false (XLA 0.11's
#                   autotuner then assigns no per-fusion emitter configs: compiled
#                   for an H200 without one, its pass took 23 of DenseNet-BC's 47.5 s
#                   here and the program came out the same, 1,080 kernels); then the
#                   widened one with autotuning off (--xla_gpu_autotune_level=0), for
#                   a window too short for the compile phase (97.8 s + 5.4 s on the
#                   H200, 11-27); then seeds WINDOW_CACHE with its caches. Its log has
#                   XLA's "RunHloPasses" (autotuning included) and "RunBackend" times
#   profile   (200) not in the default list: python -m experiments.profile_step, a JAX
#                   profiler trace of All-CNN-C's and WRN-28-10's steps (baseline and
#                   moments in both forms, bf16, paper size): device time per part of
#                   the step
#                   (augmentation, seed gather, convolutions, batch norm, the loss, the
#                   optimizer) and the top kernels, in $OUT/profile.{md,json}
# Environment: ALLCNN_VARIANTS, WRN_VARIANTS, DENSENET_VARIANTS replace a model phase's
# --variants list (a short window times only what its targets need); PROFILE_MODELS the
# profile phase's --models (default allcnn,wrn; DenseNet-BC's 11.5 us a kernel wants
# densenet); WINDOW_CACHE (below) a persistent cache the benchmark, profile and xla
# phases share, seeded by a compile phase before them with its autotuning results.
# BENCH_ARGS is added to every benchmark.py and profile_step.py command (e.g. the CPU
# smoke test: "--size=small --repeats=1 --train_images=256 --analysis_images=32");
# COMPILE_ARGS is added to every compile_time.py command (the CPU smoke test: a small
# DenseNet-BC, 2 steps a program);
# TIME_SCALE multiplies every limit (default 1). PACK, if set, is a .tgz path (outside
# $OUT) rewritten after every phase with all of $OUT: a window returns at most 8 files,
# and a call killed at its limit returns only its files, so pack to one file there
# (e.g. OUT=/tmp/w PACK=$OUT/window.tgz bash experiments/gpu_window.sh ...).
# One window in several calls: WINDOW_END (seconds since the epoch, e.g.
# $(( $(date +%s) + 570 )) for a call of 590 s) cuts each phase's limit to what is left
# before it, less 10 s, and skips a phase with under MIN_PHASE_SECONDS (30) left; a
# phase that $OUT/phases.txt says finished (rc=0) is not run again (REDO=1: it is); and
# RESUME=FILE.tgz unpacks an earlier call's PACK into an $OUT without phases.txt (a
# machine given back between calls). So the next call repeats the same command with
# RESUME set to the last pack, put in the checkout, and goes on where that one stopped.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
export OUT
if [ -n "${RESUME:-}" ] && [ ! -e "$OUT/phases.txt" ]; then  # an earlier call's results
  if [ -f "$RESUME" ]; then
    tar xzf "$RESUME" -C "$OUT" && echo "resumed from $RESUME: $(wc -l < "$OUT/phases.txt") phases"
  else
    echo "RESUME=$RESUME: no such file; every phase runs"
  fi
fi
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(env loss allcnn wrn densenet)
scale=${TIME_SCALE:-1}
extra=${BENCH_ARGS:-}
# The compile phases' DenseNet-BC program: bf16, 10 steps, 3 timed programs after it.
export DENSENET_COMPILE="--config=configs/densenet.py --config.half_precision=True \
--steps=10 --time_steps=3 --jsonl=$OUT/compile.jsonl ${COMPILE_ARGS:-}"
paper_minutes=${PAPER_MINUTES:-6}

run() {  # run NAME SECONDS COMMAND...: logs to $OUT/NAME.log, notes the outcome
  local name=$1 limit=$(( $2 * scale )) t0=$SECONDS rc left
  shift 2
  # A phase this $OUT already holds, finished (rc 0), is not run again (REDO=1: it is)
  if [ "${REDO:-0}" != 1 ] && grep -q "^$name: rc=0 " "$OUT/phases.txt" 2> /dev/null; then
    echo "$name: done before, in $OUT/phases.txt; not run again"
    return 0
  fi
  if [ -n "${WINDOW_END:-}" ]; then  # at most what is left before WINDOW_END, less 10 s
    left=$(( WINDOW_END - $(date +%s) - 10 ))
    if [ "$left" -lt "${MIN_PHASE_SECONDS:-30}" ]; then
      echo "$name: skipped, ${left} s left before WINDOW_END" | tee -a "$OUT/phases.txt"
      return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc after $(( SECONDS - t0 )) s" | tee -a "$OUT/phases.txt"
  tail -n 3 "$OUT/$name.log"
  pack
}

pack() {  # $OUT as it stands into $PACK, if set
  if [ -n "${PACK:-}" ]; then tar czf "$PACK.part" -C "$OUT" . && mv "$PACK.part" "$PACK"; fi
}

# WINDOW_CACHE=DIR: the benchmark and profile phases share JAX's persistent cache in DIR
# (and with it XLA's per-fusion autotuning results: a later process compiling the same
# convolutions and fusions skips autotuning them; DenseNet-BC's first step program took
# 108 s on the H200, its second, in the same process, 22 s). Their reports name it. The
# compile phases time a first compile in fresh directories of their own, then merge
# those into DIR (seed_window_cache): the densenet phase after compile1 then skips the
# autotuning compile1 did.
cached=()
[ -n "${WINDOW_CACHE:-}" ] && cached=(env "JAX_COMPILATION_CACHE_DIR=$WINDOW_CACHE")

seed_window_cache() {  # seed_window_cache DIR...: a compile phase's fresh caches, merged
  # into WINDOW_CACHE after it (its timings are taken), so that the benchmark phases
  # after it find XLA's autotuning results of the same convolutions and fusions.
  [ -n "${WINDOW_CACHE:-}" ] || return 0
  mkdir -p "$WINDOW_CACHE"
  local dir
  for dir in "$@"; do [ -d "$dir" ] && cp -a "$dir/." "$WINDOW_CACHE/"; done
  echo "WINDOW_CACHE $WINDOW_CACHE seeded from $*: $(du -sh "$WINDOW_CACHE" | cut -f1)" \
    | tee -a "$OUT/window_cache.txt"
}

# XLA 0.11.2's default command-buffer list, plus WHILE (the step loop), from one command
allcmdbuf="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,\
DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
nofusiontune=--xla_gpu_experimental_enable_fusion_autotuner=false
convfusion=--xla_gpu_experimental_enable_conv_fusion=true

xla_flags() {  # xla_flags SETTING: the XLA_FLAGS of one setting of the xla phases
  # (each but config also compiles with config.gpu_compile = xla: see own_options)
  case $1 in
    default) echo "" ;;
    nocmdbuf) echo "--xla_gpu_enable_command_buffer=" ;;
    allcmdbuf) echo "$allcmdbuf" ;;
    nofusiontune) echo "$nofusiontune" ;;
    # allcmdbuf, and the convolutions as cuDNN fusions (cuDNN's graph API), which are
    # commands, where XLA's convolution thunks are not: compiled for an H200 without
    # one, the step's command buffers end at each convolution under allcmdbuf
    # (DenseNet-BC: 496 launches a step); with these the whole program, loop included,
    # is one command buffer (one launch a program, given a driver with conditional
    # nodes). The fusion autotuner off, so that XLA assigns the fusions to cuDNN rather
    # than timing its own emitters against it
    convgraph) echo "$allcmdbuf $convfusion $nofusiontune" ;;
    # convgraph with the fusion autotuner on: cuDNN's plans for each fused convolution
    # timed (convgraph takes cuDNN's first), at the price of timing XLA's own emitters
    # too, for every fusion: a longer compile
    convgraphtuned) echo "$allcmdbuf $convfusion" ;;
    # none: the options of the model's config.gpu_compile (placement.GPU_COMPILE)
    config) echo "" ;;
    *) echo "unknown XLA setting $1 (default nocmdbuf allcmdbuf nofusiontune convgraph \
convgraphtuned config)" >&2
       return 2 ;;
  esac
}

own_options() {  # own_options SETTING TOOL: the argument that leaves a setting's XLA
  # options to its XLA_FLAGS alone (none for config), for the benchmark or compile_time
  [ "$1" = config ] && return 0
  if [ "$2" = benchmark ]; then echo "--gpu_compile=xla"; else echo "--config.gpu_compile=xla"; fi
}

bench() {  # bench NAME SECONDS BENCHMARK_ARGS...
  local name=$1 limit=$2
  shift 2
  # shellcheck disable=SC2086
  run "$name" "$limit" ${cached[@]+"${cached[@]}"} python3 -m experiments.benchmark "$@" $extra \
    --out="$OUT/benchmark_$name"
}

for phase in "${phases[@]}"; do
  case $phase in
    # shellcheck disable=SC2016
    paper) run paper "$(awk "BEGIN { print int($paper_minutes * 60 + 60) }")" bash -c 'python3 -m experiments.carry_pack \
      --unpack="$4" && python3 "$4/decode.py" /tmp/cifar10.npz && python3 -m experiments.window \
      --data=/tmp/cifar10.npz --out="$1" --budget_minutes="$2" $3' paper "$OUT/records" "$paper_minutes" \
      "${WINDOW_ARGS:-}" "${PAPER_DATA:-data}" ;;
    env) run env 60 bash -c 'nvidia-smi -L 2>/dev/null; python3 -c "
import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__)
print(jax.devices())"' ;;
    loss) run loss 60 python3 -m experiments.loss_cost --width=1 --dtype=bfloat16 \
      --repeats=20 ;;
    allcnn) bench allcnn 240 --models=allcnn --repeats=15 --variants="${ALLCNN_VARIANTS:-\
baseline,same_batch,pairwise,moments,moments_per_seed,same_batch_flax_bn,moments_flax_bn,\
dispatch1,loss_alone,augmentation,analysis,stacked}" ;;
    wrn) bench wrn 300 --models=wrn --repeats=15 --variants="${WRN_VARIANTS:-baseline,\
same_batch,moments,moments_per_seed,same_batch_flax_bn,loss_alone,analysis}" ;;
    densenet) bench densenet 420 --models=densenet --repeats=10 --variants="${DENSENET_VARIANTS:-\
same_batch,moments,same_batch_widened,moments_widened,loss_alone}" ;;
    augment) run augment 60 python3 -m experiments.augment_cost ;;
    xla)
      for name in ${XLA_SETTINGS:-default nocmdbuf allcmdbuf}; do
        flags=$(xla_flags "$name") || exit 2
        dir=xla_$name${XLA_TAG:+_$XLA_TAG}
        mkdir -p "$OUT/$dir"
        for model in $(echo "${XLA_MODELS:-allcnn}" | tr , ' '); do
          case $model in
            densenet) limit=110 variants=same_batch,moments ;;
            wrn) limit=100 variants=same_batch,moments ;;
            *) limit=75 variants=same_batch,moments,dispatch1 ;;
          esac
          limit=${XLA_LIMIT:-$limit}  # seconds a model and setting, if set
          # XLA dumps the training programs' thunk sequences (not with XLA_LAUNCHES=0),
          # read afterwards into launches_<model>.md: what the host launched a step, as
          # XLA decided with the device's driver at hand (the loop in a CUDA graph or not)
          dump=/tmp/invjax_xla_dump_${name}_$model dumping=
          rm -rf "$dump"
          [ "${XLA_LAUNCHES:-1}" = 1 ] && dumping="--xla_dump_to=$dump \
--xla_dump_hlo_module_re=jit_chunk"
          # shellcheck disable=SC2086
          run "${dir}_$model" $limit ${cached[@]+"${cached[@]}"} \
            env XLA_FLAGS="$flags $dumping" \
            python3 -m experiments.benchmark --models="$model" --repeats=10 \
            --variants="${XLA_VARIANTS:-$variants}" $extra \
            $(own_options "$name" benchmark) --out="$OUT/$dir/benchmark_$model"
          if [ -d "$dump" ]; then  # not where the run was done before or skipped
            python3 -m experiments.launches "$dump" "$OUT/$dir/launches_$model.md" \
              >> "$OUT/${dir}_$model.log" 2>&1
            rm -rf "$dump"
            pack
          fi
        done
      done ;;
    compilexla)
      # DenseNet-BC's training program under each XLA setting: a first compile in a
      # fresh persistent cache, then from it (a rerun's), then 3 timed programs
      for name in ${XLA_SETTINGS:-config}; do
        flags=$(xla_flags "$name") || exit 2
        rm -rf "/tmp/invjax_compile_$name"
        # shellcheck disable=SC2086
        run "compilexla_$name" 150 env XLA_FLAGS="$flags" python3 -m \
          experiments.compile_time $DENSENET_COMPILE $(own_options "$name" compile_time) \
          --cache_dir="/tmp/invjax_compile_$name"
      done ;;
    compile) run compile 330 bash -c 'args="$DENSENET_COMPILE --config.gpu_compile=xla"
      rm -rf /tmp/invjax_compile_cache
      python3 -m experiments.compile_time $args --cache_dir=/tmp/invjax_compile_cache
      XLA_FLAGS=--xla_gpu_autotune_level=0 python3 -m experiments.compile_time $args
      XLA_FLAGS=--xla_gpu_autotune_level=1 python3 -m experiments.compile_time $args'
      seed_window_cache /tmp/invjax_compile_cache ;;
    compile1) run compile1 400 bash -c 'args="$DENSENET_COMPILE --config.gpu_compile=xla"
      nofa=--xla_gpu_experimental_enable_fusion_autotuner=false
      # XLA logs the time of its HLO passes (autotuning included) and of its backend.
      export TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_compiler=1
      i=0
      for run in "False|" "False|$nofa" "True|" "True|$nofa"; do
        i=$((i + 1)); rm -rf /tmp/invjax_compile_$i
        XLA_FLAGS=${run#*|} python3 -m experiments.compile_time $args \
          --config.model.widen_bottlenecks=${run%%|*} --cache_dir=/tmp/invjax_compile_$i
      done
      XLA_FLAGS=--xla_gpu_autotune_level=0 python3 -m experiments.compile_time $args \
        --config.model.widen_bottlenecks=True'
      seed_window_cache /tmp/invjax_compile_[1-4] ;;
    # shellcheck disable=SC2086
    profile) run profile 200 ${cached[@]+"${cached[@]}"} python3 -m experiments.profile_step \
      --models="${PROFILE_MODELS:-allcnn,wrn}" \
      --variants=baseline,moments,moments_per_seed $extra --out="$OUT" ;;
    *) echo "unknown phase $phase (paper env loss allcnn wrn densenet augment compile compile1 profile xla compilexla)"
       exit 2 ;;
  esac
done
ls -l "$OUT"
