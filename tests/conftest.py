"""Shared test set-up: small data made here, nothing downloaded."""

import atexit
import os
import shutil
import tempfile

# Keep TensorFlow (used only by tfds tests) quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# The tests' programs are tiny and compiled once each, so compiling dominates their
# time: XLA:CPU's backend optimisation off makes the suite about 40 % faster (measured
# on the one-step config tests). Subprocesses inherit it; numerics are unchanged in
# kind (float tolerances of the tests hold either way).
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

# Many tests (and the subprocesses they start, which inherit the environment) compile
# the same small programs; JAX's persistent compilation cache compiles each once per
# test session. Set before anything imports jax.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="invjax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# Fixtures shared by the test modules (each module gets its own instance).
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  """A small labelled image set as an .npz (tests/helpers.write_npz)."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  return helpers.write_npz(tmp_path_factory.mktemp("data") / "toy.npz")


@pytest.fixture(scope="module")
def trained(npz, tmp_path_factory):
  """(config, workdir, result) of the tiny config trained on `npz`."""
  from invjax import train  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("run"))
  config = helpers.tiny_config(npz)
  result = train.train_and_evaluate(config, workdir)
  return config, workdir, result
