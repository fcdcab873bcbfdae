"""Where arrays live: the data-parallel mesh over every device of every process, the
host-to-device placement of batches, and the padded test batches.

Shared by training, scoring, robustness and the API; nothing here compiles a step.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

# XLA options for the training programs of a run on one GPU. The latency-hiding
# scheduler overlaps collectives with compute: a program on one device has none, and
# compiled for an H200 (without one, experiments/kernel_census.py) it spent 8-13 % of
# XLA's compile without it (DenseNet-BC-100's step program 65 -> 57 s, WRN-28-10's
# 15 -> 14 s on a 2-core CPU) for the same kernels and the same memory.
ONE_GPU_COMPILER_OPTIONS = {"xla_gpu_enable_latency_hiding_scheduler": False}

# config.gpu_compile: how XLA builds a run's programs on one GPU. "xla": its defaults.
# "graph": the whole program one CUDA graph, launched once: every command type in
# command buffers from the first execution (XLA's defaults leave out loops and runs of
# under 5 kernels), the convolutions as cuDNN fusions (XLA's convolution calls end a
# command buffer; fusions do not) and XLA's fusion autotuner off (it would time its
# own emitters against cuDNN's for every fusion; cuDNN's first plan is taken). On the
# H200 (2026-11-28, docs/performance.md): DenseNet-BC-100's step 9.37 ms (12.46 ms at
# the defaults, in the window before) and its first step program compiled in 23.6 s
# (108.4 s); All-CNN-C's step the same, compiled in 4.3 s (16.7 s), side by side.
GPU_COMPILE = {
    "xla": {},
    "graph": {
        "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
                                         "DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL",
        "xla_gpu_graph_min_graph_size": 1,
        "xla_gpu_experimental_enable_conv_fusion": True,
        "xla_gpu_experimental_enable_fusion_autotuner": False,
    },
}


def is_gpu(platform: str) -> bool:
  """Whether `platform` (a device's, or a backend's name) is a GPU's."""
  return platform in ("gpu", "cuda", "rocm")


def compiler_options(platform: str, devices: int, xla_flags: str = "",
                     gpu_compile: str = "xla") -> dict:
  """XLA options for programs over `devices` devices of `platform`: on one GPU
  ONE_GPU_COMPILER_OPTIONS and GPU_COMPILE[gpu_compile], less any option XLA_FLAGS
  (`xla_flags`) sets itself (on several GPUs, and elsewhere, none: not measured)."""
  if gpu_compile not in GPU_COMPILE:
    raise ValueError(f"gpu_compile={gpu_compile!r}: one of {sorted(GPU_COMPILE)}.")
  if not is_gpu(platform) or devices != 1:
    return {}
  options = {**ONE_GPU_COMPILER_OPTIONS, **GPU_COMPILE[gpu_compile]}
  return {k: v for k, v in options.items() if f"--{k}" not in xla_flags}


@dataclasses.dataclass
class Placement:
  """The data-parallel mesh over every device of every process: batches split over
  axis "data", the state replicated.

  Each process holds the same host data (the whole data set) but sends only its share
  of a batch, the rows its own devices hold (`local_rows`), and the global array is
  built from the processes' shares with `jax.make_array_from_process_local_data`. With
  one process the share is the whole batch.
  """
  mesh: jax.sharding.Mesh
  gpu_compile: str = "xla"  # config.gpu_compile: XLA's options on one GPU (GPU_COMPILE)

  def __post_init__(self):
    self._rows: dict[int, np.ndarray] = {}

  @classmethod
  def create(cls, gpu_compile: str = "xla", devices=None) -> "Placement":
    """The mesh over `devices` (default: every device of every process; others, e.g. a
    TPU topology's, for compiling without them)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes: XLA propagates the batch sharding through the step (GSPMD).
    return cls(jax.make_mesh((len(devices),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,), devices=devices),
               gpu_compile)

  @property
  def batch(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

  @property
  def replicated(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @property
  def stacked_batch(self):
    """Several steps' batches [S, K, ...]: split over devices along K."""
    return jax.sharding.NamedSharding(self.mesh,
                                      jax.sharding.PartitionSpec(None, "data"))

  def _options(self, gpu_compile: str) -> dict:
    device = next(iter(self.mesh.devices.flat))
    return compiler_options(device.platform, self.mesh.devices.size,
                            os.environ.get("XLA_FLAGS", ""), gpu_compile)

  @property
  def compiler_options(self) -> dict:
    """`compiler_options` of this mesh's devices, for `Lowered.compile`."""
    return self._options(self.gpu_compile)

  @property
  def fallback_compiler_options(self) -> dict | None:
    """The options to compile with where `compiler_options` fail: those without
    config.gpu_compile's (None where it adds none)."""
    return None if self.gpu_compile == "xla" else self._options("xla")

  def local_rows(self, n: int) -> np.ndarray:
    """The rows of a global batch of `n` that this process's devices hold, in the
    order `make_array_from_process_local_data` expects (ascending; all of them with
    one process)."""
    if n not in self._rows:
      if n % self.mesh.size:
        raise ValueError(f"a batch of {n} does not split over {self.mesh.size} "
                         "devices; pad it to a multiple.")
      spans = sorted({(ix[0].start or 0, n if ix[0].stop is None else ix[0].stop)
                      for ix in self.batch.addressable_devices_indices_map(
                          (n,)).values()})
      self._rows[n] = np.concatenate([np.arange(a, b) for a, b in spans])
    return self._rows[n]

  def shard(self, x: np.ndarray) -> jax.Array:
    """A global host batch (the same in every process) -> a global array split over
    the devices along axis 0; this process sends only its own rows."""
    return jax.make_array_from_process_local_data(
        self.batch, x[self.local_rows(len(x))], x.shape)

  def replicate(self, tree):
    """Host values (or arrays fetched to the host) -> copies on every device."""
    return jax.device_put(jax.device_get(tree), self.replicated)



def pad_batch(x: np.ndarray, y: np.ndarray, size: int):
  """(x, y, mask) padded with zeros to `size` rows; mask is 1.0 for the real rows."""
  pad = size - len(x)
  mask = (np.arange(size) < len(x)).astype(np.float32)
  if pad:
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
  return x, y, mask



def device_multiple(batch_size: int, devices: int) -> int:
  """`batch_size` rounded down to a multiple of `devices`, and at least `devices`: a
  batch that splits evenly over the devices (test and scoring batches)."""
  return max(devices, batch_size - batch_size % devices)


def padded_to_devices(size: int, devices: int) -> int:
  """`size` rounded up to a multiple of `devices`: what a batch of `size` is padded to
  (`pad_batch`) to split evenly over the devices."""
  return -(-size // devices) * devices


class TestBatches:
  """The test images as padded batches of one shape (eval_batch_size rounded down to a
  multiple of the device count), split over the devices. With `on_device`, they are
  sent once and kept there: an evaluation then moves nothing but its sums."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
               placement: Placement, on_device: bool = False):
    self.batch_size = device_multiple(batch_size, placement.mesh.size)
    self.placement = placement
    self.host = [pad_batch(images[start:start + self.batch_size],
                           labels[start:start + self.batch_size], self.batch_size)
                 for start in range(0, len(images), self.batch_size)]
    self.device = ([self._put(b) for b in self.host] if on_device else None)

  def _put(self, batch):
    return tuple(self.placement.shard(a) for a in batch)

  def __iter__(self):
    return iter(self.device) if self.device is not None else map(self._put, self.host)



def data_fits_on_device(data, fraction: float = 0.5) -> bool:
  """Whether the training set takes at most `fraction` of one device's memory (True
  where the device does not say, e.g. on CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return not limit or data.x_train.nbytes + data.y_train.nbytes <= fraction * limit
