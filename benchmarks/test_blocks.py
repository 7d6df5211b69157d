"""pytest-benchmark micro-benchmarks of the blocks, for comparing two runs.

    pytest benchmarks/test_blocks.py --benchmark-autosave            # run 1
    pytest benchmarks/test_blocks.py --benchmark-autosave            # run 2, after a change
    pytest-benchmark compare --group-by=group --columns=median,iqr   # side by side

One test per workload, shape, mode and provider, named ``test_block[<workload>-<shape>-
<mode>-<provider>]`` and grouped by ``<workload> <shape> <mode> <dtype> <layout>``, so a
group's rows are the providers of one measurement. pytest-benchmark times with the host
clock (the step then synchronizes the device); ``python -m benchmarks.run`` is the full
suite, with CUDA-event timing and every metric. Options: benchmarks/conftest.py.
"""

import pytest
import torch

from . import common, providers
from .run import resolve_device
from .suite import Config, Runner, Task
from .workloads import BLOCK_WORKLOADS, MODES, SIZES, Precision, cases, default_precision, default_size


def _settings(config):
    device = resolve_device(config.getoption("--bench-device"))
    size = config.getoption("--bench-size")
    size = default_size(device) if size == "auto" else SIZES[size]
    dtype = config.getoption("--bench-dtype") or default_precision(device)
    return device, size, Config(Precision(dtype), config.getoption("--bench-layout"))


def pytest_generate_tests(metafunc):
    if "task" not in metafunc.fixturenames:
        return
    _, size, config = _settings(metafunc.config)
    names = providers.expand(metafunc.config.getoption("--bench-providers").split(","))
    tasks = [Task(config, case, mode, p) for w in BLOCK_WORKLOADS for case in cases(w, size)
             for mode in MODES for p in names]
    metafunc.parametrize(
        "task", tasks, ids=[f"{t.case.workload}-{t.case.shape}-{t.mode}-{t.provider}" for t in tasks]
    )


@pytest.fixture(scope="module")
def runner(request):
    device, _, _ = _settings(request.config)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runner(device, env={})


def test_block(benchmark, runner, task):
    device = runner.device
    reason = providers.unavailable(task.provider, device, task.config.precision.activation_dtype)
    if reason:
        pytest.skip(reason)
    step = runner.step(task)
    step()  # compilation, cuDNN autotuning, allocator warm-up
    benchmark.group = f"{task.case.workload} {task.case.shape} {task.mode} {task.config.precision.name} " \
                      f"{task.config.layout}"
    benchmark.extra_info.update(batch=task.case.batch, device=str(device), dtype=task.config.precision.name,
                                layout=task.config.layout)

    def timed():
        step()
        common.sync(device)

    benchmark(timed)
