"""Options of the pytest-benchmark micro-benchmarks (benchmarks/test_blocks.py)."""

from .providers import DEFAULT


def pytest_addoption(parser):
    group = parser.getgroup("resnet_fused benchmarks")
    group.addoption("--bench-device", default="auto", choices=("auto", "cuda", "cpu"))
    group.addoption("--bench-size", default="auto", choices=("auto", "gpu", "cpu", "tiny"),
                    help="size preset of benchmarks/workloads.py (auto: by device)")
    group.addoption("--bench-dtype", default=None, choices=("bf16", "fp32"),
                    help="default bf16 on a GPU, fp32 on the CPU")
    group.addoption("--bench-layout", default="channels_last", choices=("channels_last", "nchw"))
    group.addoption("--bench-providers", default=",".join(DEFAULT),
                    help="comma-separated provider names ('fused': every backend)")
