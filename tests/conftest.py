"""Shared pytest setup: import the repo's packages from the checkout and keep CPU use small."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One thread: tests use tiny models, and multi-process tests share 2 cores (oversubscribed
# OpenMP threads spin and slow a tiny D+G step ~50x).
torch.set_num_threads(1)
