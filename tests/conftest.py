"""Shared fixtures: tiny randomly initialised models, seeded, on CPU."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the test models are tiny, and on a 2-core machine a second thread only adds
# synchronisation cost (35-85x slower steps when another process shares the cores).
torch.set_num_threads(1)

SHARED_DATA = os.environ.get(
    "HF_TAUJP_DATA", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A read-only Hub on 127.0.0.1 (tests/hub_server.py), one per test module."""
    from tests.hub_server import OlahMirror

    with OlahMirror(tmp_path_factory.mktemp("olah")) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
