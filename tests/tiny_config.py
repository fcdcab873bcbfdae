"""A tiny config for tests that run the command line (3-layer All-CNN, toy data).

  python -m invjax.main --config=tests/tiny_config.py:/path/to/toy.npz --workdir=DIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import helpers  # pylint: disable=g-import-not-at-top


def get_config(dataset="digits"):
  return helpers.tiny_config(dataset)
