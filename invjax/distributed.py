"""Runs that span several processes (hosts): JAX's multi-controller runtime.

Every host runs the same command; `initialize` joins the processes into one JAX system
(`jax.distributed.initialize`) before anything else touches a device. Then
`jax.devices()` lists the devices of all hosts, the data-parallel mesh spans them, and
each process feeds only its own devices (`placement.Placement`).

When to join, `--distributed`:
  auto (default): when a coordinator, a process count or a process id is given (flags
    below, or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID), or on a Cloud TPU VM, or under SLURM or Open MPI with several tasks.
    Elsewhere the run is one process, as on a laptop.
  on: always; arguments not given are found by JAX's cluster detection (Cloud TPU
    VMs and pod slices, SLURM, Open MPI, Kubernetes).
  off: never.

On Cloud TPU nothing needs to be given: JAX reads the pod slice's workers from the TPU
metadata. Elsewhere (several GPU hosts, or two processes on one machine) give all three:

  python -m invjax.main ... --coordinator_address=HOST0:12355 --num_processes=2 \\
      --process_id=0   # 1 on the second host
"""

from __future__ import annotations

import glob
import importlib.util
import os

from absl import flags
from absl import logging
import jax
import numpy as np

_FLAGS: dict = {}


def define_flags() -> None:
  """Defines --distributed, --coordinator_address, --num_processes and --process_id
  (for a program's command line; `initialize_from_flags` reads them)."""
  if _FLAGS:
    return
  _FLAGS["mode"] = flags.DEFINE_enum(
      "distributed", "auto", ["auto", "on", "off"],
      "Join several processes into one run (jax.distributed.initialize): auto (when "
      "coordinator/process flags or JAX_* variables are set, on Cloud TPU VMs, under "
      "SLURM or Open MPI with several tasks), on, or off.")
  _FLAGS["coordinator_address"] = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, reachable from every "
      "process (default: $JAX_COORDINATOR_ADDRESS; not needed on Cloud TPU).")
  _FLAGS["num_processes"] = flags.DEFINE_integer(
      "num_processes", None, "How many processes the run spans (default: "
      "$JAX_NUM_PROCESSES; not needed on Cloud TPU).", lower_bound=1)
  _FLAGS["process_id"] = flags.DEFINE_integer(
      "process_id", None, "This process's index, 0 .. num_processes - 1 (default: "
      "$JAX_PROCESS_ID; not needed on Cloud TPU).", lower_bound=0)


ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
       "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def _from_env(name: str, value):
  if value is not None:
    return value
  raw = os.environ.get(ENV[name])
  if raw in (None, ""):
    return None
  if name == "coordinator_address":
    return raw
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"${ENV[name]}={raw!r} is not an integer; unset it or give "
                     f"--{name}.") from None


def _on_cluster() -> str | None:
  """The cluster kind whose environment JAX can read its processes from, if any."""
  tpu_chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  if tpu_chips and importlib.util.find_spec("libtpu") is not None:
    return "Cloud TPU VM"
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Joins this process to the run's others if the run spans several (see the module
  docstring); returns whether it called `jax.distributed.initialize`.

  Must run before anything uses a device. Bad or partial arguments are refused, naming
  the flag, before JAX waits for processes that will never come.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r}: use auto, on or off.")
  if mode == "off":
    return False
  address = _from_env("coordinator_address", coordinator_address)
  count = _from_env("num_processes", num_processes)
  index = _from_env("process_id", process_id)
  given = {k: v for k, v in (("coordinator_address", address), ("num_processes", count),
                             ("process_id", index)) if v is not None}
  cluster = _on_cluster()
  if mode == "auto" and not given and cluster is None:
    return False
  if given and cluster is None:
    missing = [f"--{k} (or ${ENV[k]})" for k in ENV if k not in given]
    if missing:
      raise ValueError(
          f"a multi-process run needs --coordinator_address, --num_processes and "
          f"--process_id outside Cloud TPU, SLURM and Open MPI; missing: "
          f"{', '.join(missing)}. Give all three (the same address and count on every "
          "process, ids 0 .. count - 1), or --distributed=off for one process.")
  if count is not None and index is not None and not 0 <= index < count:
    raise ValueError(f"--process_id={index} is not in 0 .. --num_processes - 1 = "
                     f"{count - 1}; number the processes 0 .. {count - 1}.")
  if address is not None and ":" not in address:
    raise ValueError(f"--coordinator_address={address!r} needs a port: host:port, "
                     "e.g. 10.0.0.2:12355 (process 0's host, a free port).")
  jax.distributed.initialize(coordinator_address=address, num_processes=count,
                             process_id=index)
  logging.info("process %d of %d (%s): %d local of %d devices", jax.process_index(),
               jax.process_count(), cluster or address, jax.local_device_count(),
               jax.device_count())
  return True


def initialize_from_flags() -> bool:
  """`initialize` with the command line's (`define_flags`) --distributed, --coordinator_address,
  --num_processes and --process_id; then quiets every process but 0 (warnings and
  errors only), so that one log tells the run's story."""
  joined = initialize(*(_FLAGS[k].value for k in (
      "mode", "coordinator_address", "num_processes", "process_id")))
  if not is_primary():
    logging.set_verbosity(logging.WARNING)
  return joined


def is_primary() -> bool:
  """Whether this is process 0, the one that writes metrics, figures and logs."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """Whether `flag` is True in any process (a collective: every process must call it
  at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def check_shared_directory(path: str, what: str = "--workdir") -> None:
  """Refuses a directory that the processes do not share: process 0 writes a file in
  it and every other process must see it (checkpoints and metrics need one directory
  that every host reads and writes). Nothing to check with one process."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  token = int(multihost_utils.broadcast_one_to_all(
      np.array(np.random.default_rng().integers(1 << 30), np.int32)))
  marker = os.path.join(path, f".invjax-shared-{token}")
  if is_primary():
    with open(marker, "w") as f:
      f.write("written by process 0 to check that every process sees this directory\n")
  barrier("invjax: shared directory marker written")
  missing = not os.path.exists(marker)
  blind = multihost_utils.process_allgather(np.array([missing]))
  barrier("invjax: shared directory marker seen")
  if is_primary():
    os.remove(marker)
  if np.any(blind):
    raise RuntimeError(
        f"{what}={path} is not one directory shared by all processes: process(es) "
        f"{np.flatnonzero(np.ravel(blind)).tolist()} do not see what process 0 writes "
        "there. Give every host the same path on shared storage (NFS or Filestore, or "
        "a bucket mounted with gcsfuse).")
