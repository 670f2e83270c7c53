"""Shared fixtures: tiny randomly initialised models, seeded, on CPU."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: the test models are tiny, and on a 2-core machine a second thread only adds
# synchronisation cost (35-85x slower steps when another process shares the cores).
torch.set_num_threads(1)

# The developers' data kit (real MNIST / Fashion-MNIST, the Jigsaw subset, ...): $HF_TAUJP_DATA, else ../shared/data
# beside the checkout. A fresh clone has none: the tests that read it are marked `shared_data` and skip then
# (`python -m pytest tests -m shared_data` runs just them); every other test builds its own data.
SHARED_DATA = os.environ.get(
    "HF_TAUJP_DATA", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shared_data(*folders): reads these folders of the data kit ($HF_TAUJP_DATA or ../shared/data); "
        "skipped when one is absent")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("shared_data"):
        missing = [f for f in mark.args if not os.path.isdir(os.path.join(SHARED_DATA, f))]
        if missing or not os.path.isdir(SHARED_DATA):
            pytest.skip(f"data kit folder(s) {', '.join(missing) or '.'} not in {SHARED_DATA} (set HF_TAUJP_DATA)")


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
