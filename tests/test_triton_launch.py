"""How the Triton backend launches its kernels: recorded once through Triton, then replayed
(``resnet_fused.triton._runtime.Launch``).

Runs on the CPU: the stand-in driver (benchmarks/triton_stand_in.py) compiles each kernel
for sm_90 and records what every launch hands the compiled kernel's launcher. A replay
must hand it exactly what Triton's own launch path did, and a launch that Triton could
specialize differently (another address alignment, integer, dtype or configuration) must
go through Triton again. On a GPU the CUDA tests run the replay for real.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.autotuner import Autotuner  # noqa: E402

from resnet_fused.triton import _runtime, batch_stats, compile_report  # noqa: E402

pytestmark = [
    pytest.mark.skipif(_runtime.INTERPRET, reason="the interpreter launches no compiled kernel"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in driver runs without a GPU only"),
]

from benchmarks.triton_stand_in import LAUNCHES, jit_functions, stand_in_driver  # noqa: E402

SHAPE = (3, 40, 6, 5)  # C: a multiple of 8 (16-byte rows in channels_last), H*W = 30: not one


@pytest.fixture
def stand_in():
    with stand_in_driver(prefer=1):  # not the first configuration: the replay must keep the chosen one
        yield


@pytest.fixture
def through_triton(monkeypatch):
    """The launches that went through Triton, in order."""
    calls = []
    original = _runtime.Launch.through_triton

    def counted(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(_runtime.Launch, "through_triton", counted)
    return calls


def same_launch(a, b) -> bool:
    """Same kernel, grid, stream, compiled function and arguments (tensors: the same objects)."""
    return (
        (a.kernel, a.grid, a.stream) == (b.kernel, b.grid, b.stream)
        and a.function is b.function
        and len(a.args) == len(b.args)
        and all(x is y if isinstance(x, torch.Tensor) else type(x) is type(y) and x == y for x, y in zip(a.args, b.args))
    )


@pytest.fixture
def racing_autotuner(monkeypatch):
    """After each autotuned launch, another thread's launch (of another key) changes the
    autotuner's ``best_config``: a replay must keep the configuration its kernel ran with."""
    run = Autotuner.run

    def run_then_race(self, *args, **kwargs):
        compiled = run(self, *args, **kwargs)
        self.best_config = self.configs[0]
        return compiled

    monkeypatch.setattr(Autotuner, "run", run_then_race)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_replay_launches_what_triton_would(dtype, stand_in, through_triton, racing_autotuner):
    """Each kernel launched once with some tensors, then with fresh ones of the same key (a
    replay), then those again through Triton: the replay hands the launcher what Triton does."""
    first, again = (list(compile_report.representative_launches(dtype, SHAPE)) for _ in range(2))
    kernels = {f for f in jit_functions() if (getattr(f, "fn", f)).__name__.endswith("_kernel")}
    assert {launch.kernel for _, launch in first} == kernels
    for (variant, recording), (_, launch) in zip(first, again):
        LAUNCHES.clear()
        through_triton.clear()
        _runtime.forget_launches()  # variants may share a launch (the backward reduction's in eval)
        recording()
        launch()
        assert through_triton == [recording], f"{variant}: the second launch went through Triton again"
        with _runtime.replaying(False):
            launch()
        assert len(LAUNCHES) == 3, variant
        _, replayed, by_triton = LAUNCHES
        assert same_launch(replayed, by_triton), f"{variant} {replayed.kernel}:\n{replayed}\n{by_triton}"


def test_a_replay_launches_on_the_current_device_and_stream(stand_in, through_triton):
    launch = _stats_launches(torch.empty(SHAPE, memory_format=torch.channels_last))[0]
    launch()
    driver = triton.runtime.driver.active
    driver.stream = 7
    launch()  # replayed
    assert len(through_triton) == 1 and LAUNCHES[-1].stream == 7
    driver.device = 1  # another device: its own compiled kernel and partition
    launch()
    assert len(through_triton) == 2 and LAUNCHES[-1].stream == 7


def _stats_launches(x: torch.Tensor):
    per_channel = [torch.empty(x.shape[1]) for _ in range(4)]
    return batch_stats.launches(x, True, *per_channel, 0.1, 1e-5)


def test_a_launch_triton_may_specialize_differently_goes_through_triton(stand_in, through_triton):
    x = torch.empty(SHAPE, memory_format=torch.channels_last)
    partials_kernel = _stats_launches(x)[0]
    partials_kernel()
    aligned = LAUNCHES[-1]
    partials_kernel()  # replayed
    assert len(through_triton) == 1

    # The same shape 4 bytes off a 16-byte boundary: Triton drops the pointer's divisibility.
    storage = torch.empty(x.numel() + 1)
    shifted = storage[1:].view(SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[1]).permute(0, 3, 1, 2)
    assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16 == 4
    _stats_launches(shifted)[0]()
    assert len(through_triton) == 2
    assert LAUNCHES[-1].function is not aligned.function, "the unaligned launch reused the aligned specialization"

    # Another integer (more rows), another dtype: new keys.
    _stats_launches(torch.empty((SHAPE[0] + 1,) + SHAPE[1:], memory_format=torch.channels_last))[0]()
    assert len(through_triton) == 3
    _stats_launches(torch.empty(SHAPE, dtype=torch.float16, memory_format=torch.channels_last))[0]()
    assert len(through_triton) == 4

    # A pinned configuration is a key of its own, and its constants reach the launcher.
    with _runtime.pinned_config(0):
        partials_kernel()
        assert len(through_triton) == 5
        pinned = LAUNCHES[-1]
        partials_kernel()
    assert len(through_triton) == 5 and same_launch(pinned, LAUNCHES[-1])
    tile = partials_kernel.kernel.arg_names.index("TILE")
    configs = partials_kernel.kernel.configs
    assert (pinned.args[tile], aligned.args[tile]) == (configs[0].kwargs["TILE"], configs[1].kwargs["TILE"])


def test_tuned_configs_say_what_the_autotuner_chose(stand_in):
    """The record the benchmarks keep: per kernel and key, the configuration it runs with
    (the stand-in's autotuner picks the second)."""
    _runtime.forget_launches()
    x = torch.empty(SHAPE, dtype=torch.float16, memory_format=torch.channels_last)
    partials_kernel = _stats_launches(x)[0]
    partials_kernel()
    entries = _runtime.tuned_configs()["_batch_stats_partials_kernel"]
    assert all(e["key_args"] == ["lanes", "CHANNELS_LAST", "BLOCK_L"] for e in entries)
    (chosen,) = [e for e in entries if e["key"][:2] == [SHAPE[1], True] and "torch.float16" in e["key"]]
    second = partials_kernel.kernel.configs[1]
    assert chosen["config"] == {**second.all_kwargs()} and chosen["config"]["TILE"] == second.kwargs["TILE"]
    assert chosen["config"]["num_warps"] == second.num_warps
    json.dumps(_runtime.tuned_configs())  # written into the benchmarks' JSON as it is


def test_without_replay_every_launch_goes_through_triton(stand_in, through_triton):
    launch = _stats_launches(torch.empty(SHAPE, memory_format=torch.channels_last))[1]
    with _runtime.replaying(False):
        for _ in range(3):
            launch()
    assert len(through_triton) == 3
    launch()
    launch()
    assert len(through_triton) == 4


def test_inputs_beyond_the_row_limit_run_the_reference(stand_in, monkeypatch):
    """Tile row indices are int32: an input of more rows (N*H*W or N*C) than
    ``_runtime.MAX_ROWS`` runs the reference op, with one warning, and launches nothing."""
    monkeypatch.setattr(_runtime, "MAX_ROWS", 50)
    monkeypatch.setattr(_runtime, "_warned_rows", set())
    T, R = torch.ops.resnet_fused_triton, torch.ops.resnet_fused_reference
    C = 8
    w, b, mean, invstd = torch.rand(C) + 0.5, torch.randn(C), torch.randn(C), torch.rand(C) + 0.5
    for shape in ((2, C, 5, 6), (7, C, 2, 3)):  # 60 pixels; 56 planes
        x = torch.randn(shape).to(memory_format=torch.channels_last)
        LAUNCHES.clear()
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            got = T.bn_relu(x, w, b, mean, invstd, True)
            again = T.bn_relu(x, w, b, mean, invstd, True)
        said = [m for m in warned if "runs the plain-PyTorch reference" in str(m.message)]
        assert len(said) == (1 if shape[0] == 2 else 0) and len(LAUNCHES) == 0  # once per op
        want = R.bn_relu(x, w, b, mean, invstd, True)
        assert torch.equal(got, want) and torch.equal(again, want) and got.stride() == want.stride()
    T.bn_relu(torch.empty((2, C, 5, 5), memory_format=torch.channels_last), w, b, mean, invstd, True)  # 50 rows
    assert len(LAUNCHES) == 1
