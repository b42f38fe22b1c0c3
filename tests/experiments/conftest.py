"""Make the repository root importable so that `experiments` (not an installed package)
imports under plain `pytest` as it does under `python -m pytest`."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
