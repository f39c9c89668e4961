"""Test-wide settings: offline, deterministic, CPU, few threads (CI has 2 cores)."""

import os
import sys
from pathlib import Path

# The suite must never reach the Hugging Face Hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny ops: extra threads only add contention
