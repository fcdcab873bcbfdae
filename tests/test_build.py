"""invjax/build.py: a run built from its config and data, the data checked against the
config."""

import pytest

from invjax import build as build_lib
from tests import helpers


def test_data_of_another_shape_or_class_count_is_refused_naming_both(npz):
  c = helpers.tiny_config(npz, image_shape=(32, 32, 3), num_classes=10)
  with pytest.raises(ValueError) as e:
    build_lib.build(c)
  message = str(e.value)
  assert ("config.image_shape=(32, 32, 3) but toy.npz has images of shape (16, 16, 3); "
          "set --config.image_shape='(16, 16, 3)'") in message
  assert "config.num_classes=10 but toy.npz has 4 classes" in message
  c = helpers.tiny_config(npz, image_shape=(16, 16, 3), num_classes=4)
  assert build_lib.build(c).data.image_shape == (16, 16, 3)  # matching data are accepted


def _programs_by_walking(d, intervals, total):
  """Programs the loop dispatches, by walking it: from each stop, whole programs of d
  steps while they fit before the next stop, then 1-step programs up to it."""
  done, programs = 0, 0
  while done < total:
    stop = min([total] + [(done // every + 1) * every for every in intervals])
    size = d if done + d <= stop else 1
    done, programs = done + size, programs + 1
  return programs


def _dispatch_by_search(intervals, seeds, images, total):
  """The automatic choice by brute force: the most steps (up to 100, one pass at most)
  that land on every stop, if at least 10; else the fewest programs, then the most
  steps."""
  sizes = [d for d in range(1, 101) if d * seeds <= images]
  common = max(d for d in sizes if all(every % d == 0 for every in intervals))
  if common >= 10:
    return common
  return min(sizes, key=lambda d: (_programs_by_walking(d, intervals, total), -d))


@pytest.mark.parametrize("steps_per_epoch,epochs,log,eval_epochs,ckpt,images,expect", [
    (390, 350, 50, 1.0, 0, 50_000, 10),  # All-CNN-C's and WRN-28-10's configs
    (390, 350, 390, 10.0, 9750, 50_000, 78),  # the window's cadence
    (781, 30, 50, 1.0, 0, 50_000, 25),  # DenseNet-BC's: no common divisor above 1
    (390, 20, 7, 0.5, 0, 50_000, None),  # stops that share no divisor
    (40, 3, 40, 1.0, 0, 100, 5),  # one pass of 100 images is 6 steps of 16 seeds
])
def test_automatic_steps_per_dispatch(steps_per_epoch, epochs, log, eval_epochs, ckpt,
                                      images, expect):
  c = helpers.tiny_config("unused", log_every_steps=log, eval_every_epochs=eval_epochs,
                          checkpoint_every_steps=ckpt, batch_size=128, invariance_copies=8)
  assert c.steps_per_dispatch == 0  # the default: automatic
  total = steps_per_epoch * epochs
  intervals = (ckpt or steps_per_epoch, round(eval_epochs * steps_per_epoch), log)
  got = build_lib.dispatch_steps(c, steps_per_epoch, images, total, platform="gpu")
  assert got == _dispatch_by_search(intervals, 128 // 8, images, total)
  assert expect is None or got == expect
  assert build_lib._programs(got, intervals, total) == _programs_by_walking(
      got, intervals, total)
  assert build_lib.dispatch_steps(c, steps_per_epoch, images, total, platform="cpu") == 1
  c.steps_per_dispatch = 3  # a value set is kept
  assert build_lib.dispatch_steps(c, steps_per_epoch, images, total, platform="tpu") == 3


def test_the_run_carries_its_resolved_steps_per_dispatch(npz):
  run = build_lib.build(helpers.tiny_config(npz))
  assert run.steps_per_dispatch == 1  # automatic, on this CPU
  run = build_lib.build(helpers.tiny_config(npz, steps_per_dispatch=2))
  assert run.steps_per_dispatch == 2
