"""Shared fixtures: tiny randomly initialised models, seeded, on CPU."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = os.environ.get(
    "HF_TAUJP_DATA", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
