import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: without one they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def releases_gpu_memory():
    """For tests of tens of GiB: the caching allocator hands their blocks back after them,
    so the other test processes sharing the GPU (pytest-xdist) can have the memory."""
    yield
    torch.cuda.empty_cache()
