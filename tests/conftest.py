"""Test settings shared by every test: offline, deterministic, single-threaded torch.

Tiny models run several times faster on one thread here, and results compared bit for bit
must come from the same thread count. Collect Activations' disk cache is off (a cap of 0,
whatever the shell says, and no cache folder of the user's) so that every test collects and
none depends on what an earlier one stored; ComfyUI servers started by tests inherit this
environment. The tests of the cache turn it on in a folder of their own (monkeypatch).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["ACT_COLLECTION_CACHE_GB"] = "0"
os.environ.pop("ACT_COLLECTION_CACHE_DIR", None)

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
