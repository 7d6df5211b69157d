import os

import pytest
import torch

# CI sets this: there every test but the `cuda`-marked ones must run. A skip elsewhere
# (Triton missing, _C built without CUDA kernels, no g++ for the CUDA emulation) would
# silently drop what CI checks of the GPU code, so it fails instead.
ONLY_GPU_SKIPS = os.environ.get("RESNET_FUSED_ONLY_GPU_SKIPS") == "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: without one they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _fail_skip(report, where: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"skipped {where}, where RESNET_FUSED_ONLY_GPU_SKIPS=1 allows only `cuda` tests to: "
                       f"{report.longrepr}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if ONLY_GPU_SKIPS and report.skipped and "cuda" not in item.keywords and not hasattr(report, "wasxfail"):
        _fail_skip(report, "a test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if ONLY_GPU_SKIPS and report.skipped:  # a module's importorskip
        _fail_skip(report, "a whole module")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def releases_gpu_memory():
    """For tests of tens of GiB: the caching allocator hands their blocks back after them,
    so the other test processes sharing the GPU (pytest-xdist) can have the memory."""
    yield
    torch.cuda.empty_cache()
