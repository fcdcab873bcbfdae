"""Shared test set-up: small data made here, nothing downloaded."""

import os

# Keep TensorFlow (used only by tfds tests) quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
