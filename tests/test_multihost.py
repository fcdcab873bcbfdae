"""One code path at any scale: a run on 1 device, on 8 devices in one process and on 2
processes of 4 devices each (JAX's multi-controller runtime on localhost, CPU
collectives) gives the same losses, metrics, parameters and invariance scores.

The two-process run reads its batches from the host (each process gathers only its own
devices' seeds); the others keep the training set on the device. With -m slow, the
two-process run is also split in two: steps 1-2 from the host, then both processes
restore the Orbax checkpoint they wrote together and train steps 3-4 from the data on
the device.
"""

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from invjax import analyze as analyze_lib
from invjax import build as build_lib
from invjax import checkpoints
from invjax import distributed
from invjax import placement as placement_lib
from invjax import train
from tests import helpers

# 8 seeds x 4 copies: a seed per device at 8 devices. 64 training images: 2 steps an
# epoch, 4 in all. 20 test images in batches of 16: the last is padded at every scale.
OVERRIDES = ["--config.batch_size=32", "--config.lr_boundaries=()",
             "--config.num_epochs=2", "--config.probe_seeds=8",
             "--notensorboard"]  # TensorFlow's import is seconds per process


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _main(npz, workdir, devices, *args, **env):
  """Starts `python -m invjax.main` on `devices` host devices."""
  flags = " ".join([os.environ.get("XLA_FLAGS", ""),
                    f"--xla_force_host_platform_device_count={devices}",
                    *env.pop("xla_flags", [])])
  cmd = [sys.executable, "-m", "invjax.main", f"--config=tests/tiny_config.py:{npz}",
         f"--workdir={workdir}", *OVERRIDES, *args]
  return subprocess.Popen(cmd, cwd=helpers.ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE,
                          env=dict(os.environ, XLA_FLAGS=flags, **env))


def _two_processes(npz, workdir, *args, env_for_second=False):
  """Process 0 is told where and who it is by flags; process 1 by flags or, with
  `env_for_second`, by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID."""
  address = f"localhost:{_free_port()}"
  first = _main(npz, workdir, 4, f"--coordinator_address={address}",
                "--num_processes=2", "--process_id=0", *args)
  if env_for_second:
    second = _main(npz, workdir, 4, *args, JAX_COORDINATOR_ADDRESS=address,
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  else:
    second = _main(npz, workdir, 4, f"--coordinator_address={address}",
                   "--num_processes=2", "--process_id=1", *args)
  return [first, second]


def _finish(procs):
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{"1 device", "8 devices", "2 processes x 4"}: (workdir, [(stdout, stderr)])."""
  tmp = tmp_path_factory.mktemp("scale")
  npz = helpers.write_npz(tmp / "toy.npz", n_train=64, n_test=20)
  wd = {name: str(tmp / name) for name in ("one", "eight", "two")}
  eight = [_main(npz, wd["eight"], 8, "--mode=train", xla_flags=[
      f"--xla_dump_to={tmp / 'hlo'}", "--xla_dump_hlo_module_re=jit_chunk"])]
  two = _two_processes(npz, wd["two"], "--mode=train_and_analyze",
                       "--config.data_on_device=False", env_for_second=True)
  # Meanwhile, the reference on this process's one device.
  config = helpers.tiny_config(npz)
  with config.unlocked():
    config.batch_size, config.lr_boundaries, config.num_epochs = 32, (), 2.0
    config.probe_seeds = 8
  assert jax.device_count() == 1
  train.train_and_evaluate(config, wd["one"], tensorboard=False)
  analyze_lib.analyze(config, wd["one"])
  outs = {"8 devices": _finish(eight), "2 processes x 4": _finish(two)}
  return {"config": config, "workdirs": wd, "outs": outs, "hlo": tmp / "hlo",
          "npz": npz, "tmp": tmp}


def _records(workdir):
  """{(step, name): value} of metrics.jsonl, refusing a (step, name) written twice."""
  out = {}
  for r in (json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))):
    for k, v in r.items():
      if k.startswith(("train/", "test/", "probe/")):
        assert (r["step"], k) not in out, f"{k} at step {r['step']} written twice"
        out[(r["step"], k)] = v
  return out


def _params(config, workdir):
  ck = checkpoints.Checkpoints(workdir)
  try:
    assert ck.latest_step() == 4
    state = ck.restore(build_lib.initial_state(build_lib.build(config),
                                           placement_lib.Placement.create()))
  finally:
    ck.close()
  return jax.device_get(state.params)


@pytest.fixture(scope="module")
def resumed(runs):
  """The two-process run in two starts: steps 1-2 with host batches, then a resume
  (both processes restore the checkpoint) for steps 3-4 with the data on the device."""
  workdir = str(runs["tmp"] / "resumed")
  _finish(_two_processes(runs["npz"], workdir, "--mode=train", "--config.num_epochs=1",
                         "--config.data_on_device=False"))
  outs = _finish(_two_processes(runs["npz"], workdir, "--mode=train_and_analyze",
                                "--allow_config_change"))
  assert "resumed from step 2" in outs[0][1]
  runs["workdirs"]["resumed"] = workdir
  return runs


@pytest.mark.parametrize("scale", [
    "eight", "two", pytest.param("resumed", marks=pytest.mark.slow)])
def test_any_scale_gives_the_same_run(runs, scale, request):
  if scale == "resumed":
    request.getfixturevalue("resumed")
  wd = runs["workdirs"]
  ref, got = _records(wd["one"]), _records(wd[scale])
  assert set(got) == set(ref)
  assert {k for k in ref if k[1] == "train/loss"} == {(2, "train/loss"),
                                                     (4, "train/loss")}
  diffs = {k: abs(got[k] - ref[k]) for k in ref}
  worst = max(diffs, key=diffs.get)
  print(f"{scale}: metrics max |diff| {diffs[worst]:.3g} ({worst})")
  for k in ref:
    assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-5), k

  p_ref, p_got = _params(runs["config"], wd["one"]), _params(runs["config"], wd[scale])
  d = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                   p_ref, p_got))
  print(f"{scale}: parameters max |diff| {max(d):.3g}")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               p_ref, p_got)
  assert not all(np.allclose(a, b) for a, b in zip(   # training moved them
      jax.tree.leaves(p_ref), jax.tree.leaves(build_lib.initial_state(
          build_lib.build(runs["config"]), placement_lib.Placement.create()).params)))

  if scale == "eight":
    return  # scored across devices and processes below; here trained only (time)
  if scale == "two":
    _api_loads_runs_of_several_devices_on_one(runs)
  s_ref, summary_ref = analyze_lib.load(wd["one"])
  s_got, summary_got = analyze_lib.load(wd[scale])
  assert list(s_got) == list(s_ref) == ["pixels", "conv1", "conv2", "conv3"]
  worst = max(float(np.max(np.abs(s_got[k] - s_ref[k]))) for k in s_ref)
  print(f"{scale}: scores max |diff| {worst:.3g}")
  for k in s_ref:
    assert s_got[k].shape == (20, 2)  # every test image once, padding dropped
    np.testing.assert_allclose(s_got[k], s_ref[k], rtol=1e-5, atol=1e-5)
  for part in ("test", "transformed_test"):
    assert summary_got[part]["accuracy"] == pytest.approx(
        summary_ref[part]["accuracy"], abs=1e-6)


def test_only_process_0_writes_and_logs(runs):
  (out0, err0), (out1, err1) = runs["outs"]["2 processes x 4"]
  assert "test accuracy" in out0 and "median invariance score" in out0
  # (Its stdout holds gloo's connection notices, whose lines threads may interleave.)
  assert "test accuracy" not in out1 and "invariance score" not in out1
  assert "train.py" in err0
  info = [line for line in err1.splitlines() if line.startswith("I") and "invjax" in
          line or line.startswith("I") and ("train.py" in line or "analyze.py" in line)]
  assert not info, info[:5]
  _records(runs["workdirs"]["two"])  # no (step, metric) twice


def test_each_device_gathers_and_augments_only_its_own_seeds(runs):
  """In the 8-device training program each device slices one seed image (32 images
  = 8 seeds x 4 copies; a row of 16 x 16 x 3 bytes) out of the resident training set,
  and devices exchange only sums (all-reduce: batch norm, the loss's moments,
  gradients): a seed's copies never leave its device."""
  (hlo,) = glob.glob(str(runs["hlo"] / "*jit_chunk*after_optimizations.txt"))
  text = open(hlo).read()
  ops = {op for op in ("all-gather", "all-to-all", "collective-permute",
                       "reduce-scatter", "all-reduce") if f" {op}(" in text
         or f" {op}-start(" in text}
  assert ops == {"all-reduce"}
  assert "u8[1,768]" in text and "u8[8,768]" not in text


@pytest.mark.parametrize("args,message", [
    (dict(coordinator_address="localhost:1234"), "missing: --num_processes"),
    (dict(num_processes=2, process_id=0), "missing: --coordinator_address"),
    (dict(coordinator_address="localhost:1", num_processes=2, process_id=2),
     "--process_id=2 is not in 0 .. --num_processes - 1 = 1"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0),
     "needs a port"),
])
def test_distributed_arguments_are_checked_before_joining(args, message, monkeypatch):
  for var in distributed.ENV.values():
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, "_on_cluster", lambda: None)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    distributed.initialize("auto", **args)


def test_one_process_needs_nothing(monkeypatch):
  for var in distributed.ENV.values():
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, "_on_cluster", lambda: None)
  assert distributed.initialize("auto") is False
  assert distributed.initialize("off", "localhost:1", 2, 0) is False
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES='two'"):
    distributed.initialize("auto")
  assert distributed.any_process(True) and not distributed.any_process(False)


def test_scoring_ignores_padding():
  """Scores of a batch padded to a larger size (padding marked invalid) equal those of
  the batch alone, and the metrics count only the real images."""
  from invjax import analysis  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(6, 4, 4, 3)).astype(np.float32)
  y = rng.integers(0, 3, 6).astype(np.int32)
  w = jnp.asarray(rng.normal(size=(48, 3)), jnp.float32)
  fn = lambda im: ({"pixels": im, "h": im.reshape(len(im), -1) @ w},
                   im.reshape(len(im), -1) @ w)
  metrics = lambda lg, lb, m: {"count": jnp.sum(m),
                               "correct": jnp.sum((jnp.argmax(lg, -1) == lb) * m)}
  key = jax.random.key(0)
  pad = lambda a: np.concatenate([a, np.zeros((2, *a.shape[1:]), a.dtype)])
  # Noise drawn per image (fold_in of its index), so that padding the batch does not
  # change the real images' draws.
  per_image = lambda k, im: im + 0.1 * jax.vmap(
      lambda i: jax.random.normal(jax.random.fold_in(k, i), im.shape[1:]))(
          jnp.arange(len(im)))
  plain, sums = analysis.score_dataset(fn, lambda: [(x[:4], y[:4]), (x[4:], y[4:])],
                                       key, 2, per_image, metrics_fn=metrics)
  padded, psums = analysis.score_dataset(
      fn, lambda: [analysis.Batch(x[:4], y[:4]),
                   analysis.Batch(pad(x[4:]), pad(y[4:]), np.arange(4) < 2)],
      key, 2, per_image, metrics_fn=metrics)
  for k in plain:
    assert padded[k].shape == (6, 2)
    np.testing.assert_allclose(padded[k], plain[k], rtol=1e-5, atol=1e-6)
  assert psums["clean"] == sums["clean"] and psums["clean"]["count"] == 6
  assert psums["transformed"] == sums["transformed"]


def test_a_workdir_the_processes_do_not_share_is_refused(tmp_path):
  """Two processes given directories that are not the same (as two hosts' local
  disks would be) both stop with the error, before anything is trained."""
  code = ("import sys; from invjax import distributed as d;"
          "d.initialize('on', sys.argv[1], 2, int(sys.argv[2]));"
          "d.check_shared_directory(sys.argv[3]); print('shared')")
  port = _free_port()
  def start(i, path):
    os.makedirs(path, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", code, f"localhost:{port}", str(i),
                             path], cwd=helpers.ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
  procs = [start(i, str(tmp_path / f"host{i}")) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode != 0
    assert "is not one directory shared by all processes: process(es) [1]" in err
  assert os.listdir(tmp_path / "host0") == []  # the marker is removed
  procs = [start(i, str(tmp_path / "same")) for i in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "shared" in out, err[-2000:]


def test_clusters_jax_can_read_are_recognised(monkeypatch):
  for var in ("SLURM_NTASKS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])  # no TPU chips
  assert distributed._on_cluster() is None
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed._on_cluster() is None  # one task: one process, nothing to join
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed._on_cluster() == "SLURM"
  monkeypatch.delenv("SLURM_JOB_ID")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
  assert distributed._on_cluster() == "Open MPI"


def _api_loads_runs_of_several_devices_on_one(runs):
  """invjax.api, on this process's one device, loads the runs trained on 8 devices
  and on 2 processes of 4: their activations match the one-device run's, and the
  two-process run's test images score as its own 2-process analysis scored them.
  The README's plain Orbax recipe restores the 8-device checkpoint without warnings.

  Called from test_any_scale_gives_the_same_run (not a test of its own: pytest-xdist
  could run it in another worker, which would train the module's runs again)."""
  from invjax import api  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 1
  wd = runs["workdirs"]
  one = api.load_run(wd["one"])
  x = one.data.x_test  # 20 images: batches of 16, the last padded
  ref = one.activations(x, batch_size=16)
  for scale in ("eight", "two"):
    run = api.load_run(wd[scale])
    assert run.step == 4
    got = run.activations(x, batch_size=16)
    for k in one.layers:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-3, atol=1e-4)
  scores = run.invariance_scores(x)
  saved, _ = analyze_lib.load(wd["two"])
  assert list(scores) == list(saved)
  for k in saved:
    np.testing.assert_allclose(scores[k], saved[k], rtol=1e-5, atol=1e-5)
  weights = helpers.run_orbax_recipe(wd["eight"])
  jax.tree.map(np.testing.assert_array_equal, weights,
               api.load_run(wd["eight"]).variables)


@pytest.mark.slow
def test_api_on_several_devices(runs, tmp_path):
  """The one-device run loaded on 4 host devices (in a subprocess): the same
  activations (batches of 6 split over 4 devices, padded) and scores."""
  from invjax import api  # pylint: disable=g-import-not-at-top
  one = api.load_run(runs["workdirs"]["one"])
  x = one.data.x_test
  out = tmp_path / "four.npz"
  code = ("import sys, jax, numpy as np; sys.path.insert(0, '.');"
          "from invjax import api; assert jax.device_count() == 4;"
          f"r = api.load_run({runs['workdirs']['one']!r}); x = r.data.x_test;"
          "a = r.activations(x, batch_size=6); s = r.invariance_scores(x);"
          f"np.savez({str(out)!r}, **{{'a/' + k: v for k, v in a.items()}},"
          " **{'s/' + k: v for k, v in s.items()})")
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=4")
  done = subprocess.run([sys.executable, "-c", code], cwd=helpers.ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  acts, scores = one.activations(x), one.invariance_scores(x)
  with np.load(out) as f:
    for k in one.layers:
      np.testing.assert_allclose(f[f"a/{k}"], acts[k], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(f[f"s/{k}"], scores[k], rtol=1e-5, atol=1e-5)
