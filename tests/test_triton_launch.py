"""How the Triton backend launches its kernels: an op call's launches recorded once through
Triton as a plan, then replayed (``resnet_fused.triton._runtime.launch``).

Runs on the CPU: the stand-in driver (benchmarks/triton_stand_in.py) compiles each kernel
for sm_90 and records what every launch hands the compiled kernel's launcher. A replay
must hand it exactly what Triton's own launch path does for the same operands, and a call
that Triton could specialize differently (another address alignment, dtype, shape,
variant or configuration) must go through Triton again. On a GPU the CUDA tests run the
replay for real.
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from resnet_fused.triton import _reduce, _runtime, batch_stats, bn_act, compile_report  # noqa: E402

pytestmark = [
    pytest.mark.skipif(_runtime.INTERPRET, reason="the interpreter launches no compiled kernel"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in driver runs without a GPU only"),
]

from benchmarks.triton_stand_in import LAUNCHES, STAND_IN_DRIVER_VERSION, jit_functions, stand_in_driver  # noqa: E402

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

    def counted(self, pinned):
        calls.append(self)
        return original(self, pinned)

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
    """Each op's launches recorded with some operands, replayed with fresh ones of the same
    key, then launched with those through Triton: the replay hands the launchers what
    Triton does, launch by launch, each operand where it belongs."""
    first, again = (list(compile_report.representative_calls(dtype, SHAPE)) for _ in range(2))
    kernels = {f for f in jit_functions() if (getattr(f, "fn", f)).__name__.endswith("_kernel")}
    assert {launch.kernel for _, (build, static, operands) in first for launch in build(*static, *operands)} == kernels
    for (variant, recording), (_, call) in zip(first, again):
        LAUNCHES.clear()
        through_triton.clear()
        _runtime.forget_plans()
        _runtime.launch(*recording)
        launches = len(through_triton)
        assert launches == len(LAUNCHES) > 0
        _runtime.launch(*call)
        assert len(through_triton) == launches, f"{variant}: the second call went through Triton again"
        with _runtime.replaying(False):
            _runtime.launch(*call)
        assert len(LAUNCHES) == 3 * launches, variant
        replayed, by_triton = list(LAUNCHES)[launches:2 * launches], list(LAUNCHES)[2 * launches:]
        for a, b in zip(replayed, by_triton):
            assert same_launch(a, b), f"{variant} {a.kernel}:\n{a}\n{b}"


def _stats_call(x: torch.Tensor, running: bool = True) -> _runtime.Call:
    part = _reduce.partition(x, x.is_contiguous(memory_format=torch.channels_last))
    per_channel = [torch.empty(x.shape[1]) for _ in range(4 if running else 2)] + [None] * (0 if running else 2)
    return batch_stats.launches, (part,), (x, batch_stats.empty_partials(part, x.device), *per_channel, 0.1, 0.9, 1e-5)


def test_a_replay_launches_on_the_current_device_and_stream(stand_in, through_triton):
    call = _stats_call(torch.empty(SHAPE, memory_format=torch.channels_last))
    _runtime.launch(*call)
    driver = triton.runtime.driver.active
    driver.stream = 7
    _runtime.launch(*call)  # replayed
    assert len(through_triton) == 2 and [launch.stream for launch in list(LAUNCHES)[-2:]] == [7, 7]
    driver.device = 1  # another device: its own compiled kernels
    _runtime.launch(*call)
    assert len(through_triton) == 4 and LAUNCHES[-1].stream == 7


def test_a_replay_goes_through_the_runners_while_a_launch_hook_is_set(stand_in, through_triton, monkeypatch):
    """Without a launch hook a replay hands the launchers what Triton's runner would, with
    no launch metadata; with one set (a profiler's), each launch goes through the compiled
    kernel's runner, which builds the metadata the hook is called with."""
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel

    asked = []
    original = CompiledKernel.launch_metadata
    monkeypatch.setattr(CompiledKernel, "launch_metadata",
                        lambda self, *args: asked.append(self.name) or original(self, *args))
    call = _stats_call(torch.empty(SHAPE, memory_format=torch.channels_last))
    _runtime.launch(*call)
    asked.clear()
    _runtime.launch(*call)  # replayed: no hook, no metadata
    assert asked == [] and len(through_triton) == 2
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        _runtime.launch(*call)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(asked) == 2 and len(through_triton) == 2
    first, second = list(LAUNCHES)[-4:-2], list(LAUNCHES)[-2:]
    assert all(same_launch(a, b) for a, b in zip(first, second))


def test_a_call_triton_may_specialize_differently_goes_through_triton(stand_in, through_triton):
    x = torch.empty(SHAPE, memory_format=torch.channels_last)
    call = _stats_call(x)
    _runtime.launch(*call)
    aligned = LAUNCHES[-2]  # the partials kernel
    _runtime.launch(*call)  # replayed
    assert len(through_triton) == 2

    # The same shape 4 bytes off a 16-byte boundary: Triton drops the pointer's divisibility.
    storage = torch.empty(x.numel() + 1)
    shifted = storage[1:].view(SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[1]).permute(0, 3, 1, 2)
    assert shifted.is_contiguous(memory_format=torch.channels_last) and shifted.data_ptr() % 16 == 4
    _runtime.launch(*_stats_call(shifted))
    assert len(through_triton) == 4
    assert LAUNCHES[-2].function is not aligned.function, "the unaligned call reused the aligned specialization"

    # Another shape (another partition), another dtype, an absent optional operand: new keys.
    _runtime.launch(*_stats_call(torch.empty((SHAPE[0] + 1,) + SHAPE[1:], memory_format=torch.channels_last)))
    assert len(through_triton) == 6
    _runtime.launch(*_stats_call(torch.empty(SHAPE, dtype=torch.float16, memory_format=torch.channels_last)))
    assert len(through_triton) == 8
    _runtime.launch(*_stats_call(x, running=False))
    assert len(through_triton) == 10

    # A pinned configuration is a key of its own, and its constants reach the launcher.
    with _runtime.pinned_config(0):
        _runtime.launch(*call)
        assert len(through_triton) == 12
        pinned = LAUNCHES[-2]
        _runtime.launch(*call)
    assert len(through_triton) == 12 and same_launch(pinned, LAUNCHES[-2])
    kernel = batch_stats._batch_stats_partials_kernel
    tile = kernel.arg_names.index("TILE")
    assert (pinned.args[tile], aligned.args[tile]) == (kernel.configs[0].kwargs["TILE"], kernel.configs[1].kwargs["TILE"])


def test_every_op_variant_has_a_plan_of_its_own(stand_in, through_triton):
    """The backward in training and in eval, and each epilogue, are separate plans: their
    static values differ, so none replays another's launches."""
    calls = [call for _, call in compile_report.representative_calls(torch.float32, SHAPE, ("nhwc",))]
    for call in calls:
        _runtime.launch(*call)
    assert len(through_triton) == sum(len(build(*static, *operands)) for build, static, operands in calls)
    assert len(_runtime._plans) == len(calls)


def test_a_builder_must_take_its_tensors_from_the_operands(stand_in):
    """A builder that puts a tensor of its own into a launch would have a replay pass that
    tensor again: recording such a plan fails."""
    x = torch.empty(SHAPE, memory_format=torch.channels_last)
    build, static, operands = _stats_call(x)
    captured = operands[1]

    def careless(part, x, partials, *rest):
        return build(part, x, captured, *rest)

    with pytest.raises(RuntimeError, match="passes part_ptr a tensor or value that is not an operand"):
        _runtime.launch(careless, static, operands)

    def reading(part, x, *rest):  # sizes something from an operand
        return build(part, x, *rest) if x.dim() == 4 else []

    with pytest.raises(RuntimeError, match="launches reads an operand"):
        _runtime.launch(functools.wraps(build)(reading), static, operands)


@triton.jit
def _fill_kernel(out_ptr, other_ptr, value, SCALE: tl.constexpr, PDL: tl.constexpr):
    _runtime.await_stream_predecessor(PDL)
    tl.store(out_ptr, value * SCALE)


def _fill(out, other, value, scale):
    return [_runtime.Launch(_fill_kernel, lambda meta: (1,), dict(out_ptr=out, other_ptr=other, value=value,
                                                                   SCALE=scale))]


def test_a_builder_that_moves_an_operand_or_compiles_a_float_in_is_refused(stand_in):
    """An operand where the markers did not put it (a builder branching on what it gets),
    and a float operand passed to a constexpr (compiled in, but keyed only by type): a
    replay would pass the wrong tensor, or keep the recording call's value."""
    a, b = torch.empty(4), torch.empty(4)

    def swapping(out, other, value, scale):  # swaps its tensors when given markers
        return _fill(other, out, value, scale) if isinstance(out, _runtime.Operand) else _fill(out, other, value, scale)

    with pytest.raises(RuntimeError, match="put operand 1 elsewhere with markers"):
        _runtime.launch(swapping, (), (a, b, 1.5, 2.0))
    with pytest.raises(RuntimeError, match="passes a float operand to SCALE, a constexpr"):
        _runtime.launch(_fill, (), (a, b, 1.5, 2.0))
    _runtime.launch(_fill, (), (a, b, 1.5, 2))  # an integer constexpr is keyed by value: fine


@pytest.mark.parametrize(
    "allowed, driver, early",
    [(True, STAND_IN_DRIVER_VERSION, True), (False, STAND_IN_DRIVER_VERSION, False),
     (True, 12020, False), (True, 12030, True)],
    ids=["default", "RESNET_FUSED_PDL=0", "driver-12.2", "driver-12.3"],
)
def test_kernels_launch_early_on_sm90_unless_told_not_to(stand_in, monkeypatch, allowed, driver, early):
    """On the stand-in's sm_90 every launch is a programmatic dependent one, compiled with
    PDL (its first statement waits for the kernel before it); with RESNET_FUSED_PDL=0, or a
    driver older than CUDA 12.3 (whose graph capture has no programmatic edges), none is,
    and the kernels are compiled without the wait."""
    pdl = batch_stats._batch_stats_finalize_kernel.arg_names.index("PDL")
    monkeypatch.setattr(_runtime, "_EARLY_LAUNCH_ENABLED_BY_ENV", allowed)
    # undone before the stand-in (set up first) puts back the real one
    monkeypatch.setattr(_runtime, "_cuda_driver_version", lambda: driver)
    _runtime.forget_plans()
    LAUNCHES.clear()
    for _, call in compile_report.representative_calls(torch.float32, SHAPE, ("nhwc",)):
        _runtime.launch(*call)  # through Triton
        _runtime.launch(*call)  # replayed
    assert len(LAUNCHES) > 2 and {launch.early for launch in LAUNCHES} == {early}
    finalize = [launch for launch in LAUNCHES if launch.kernel == "_batch_stats_finalize_kernel"]
    assert finalize and all(launch.args[pdl] is early for launch in finalize)


class _FakeLibcuda:
    def __init__(self, version: int, status: int = 0) -> None:
        self.version, self.status = version, status

    def cuDriverGetVersion(self, out) -> int:  # noqa: N802 (the driver API's name)
        out._obj.value = self.version
        return self.status


@pytest.mark.parametrize(
    "library, expected",
    [(_FakeLibcuda(12020), 12020), (_FakeLibcuda(13000), 13000), (_FakeLibcuda(13000, status=3), 0), (None, 0)],
    ids=["12.2", "13.0", "driver-error", "no-libcuda"],
)
def test_the_driver_version_is_read_from_libcuda(monkeypatch, library, expected):
    """What early launch checks: cuDriverGetVersion's answer, and 0 (launch in order) where
    it fails or there is no libcuda."""

    def load(name):
        assert name == "libcuda.so.1"
        if library is None:
            raise OSError(f"{name}: cannot open shared object file")
        return library

    monkeypatch.setattr(_runtime.ctypes, "CDLL", load)
    _runtime._cuda_driver_version.cache_clear()
    try:
        assert _runtime._cuda_driver_version() == expected
    finally:
        _runtime._cuda_driver_version.cache_clear()


def test_the_record_starts_over_past_its_limit(stand_in, monkeypatch):
    monkeypatch.setattr(_runtime, "_PLAN_LIMIT", 2)
    _runtime.forget_plans()
    for n in range(1, 4):  # three shapes, three keys
        _runtime.launch(*_stats_call(torch.empty((n,) + SHAPE[1:], memory_format=torch.channels_last)))
    assert len(_runtime._plans) == 1


def test_an_integer_operand_is_keyed_by_value(stand_in, through_triton):
    """Triton specializes an integer on its value (1 becomes a constant, multiples of 16
    and 64-bit ones their own kernels): an integer momentum of 1, then of 0, is two
    plans, where a float momentum of 1.0, then 0.0, is one."""
    build, static, operands = _stats_call(torch.empty(SHAPE, memory_format=torch.channels_last))
    for momentum in (1, 0, 1.0, 0.0):
        _runtime.launch(build, static, operands[:-3] + (momentum, 1 - momentum, 1e-5))
    assert len(through_triton) == 2 * 3
    assert LAUNCHES[-1].args[batch_stats._batch_stats_finalize_kernel.arg_names.index("momentum")] == 0.0


def test_tuned_configs_say_what_the_autotuner_chose(stand_in):
    """The record the benchmarks keep: per kernel and key, the configuration it runs with
    (the stand-in's autotuner picks the second)."""
    _runtime.forget_plans()
    x = torch.empty(SHAPE, dtype=torch.float16, memory_format=torch.channels_last)
    build, static, operands = _stats_call(x)
    build(*static, *operands)[0].through_triton(None)
    entries = _runtime.tuned_configs()["_batch_stats_partials_kernel"]
    assert all(e["key_args"] == ["lanes", "CHANNELS_LAST", "BLOCK_L"] for e in entries)
    (chosen,) = [e for e in entries if e["key"][:2] == [SHAPE[1], True] and "torch.float16" in e["key"]]
    second = batch_stats._batch_stats_partials_kernel.configs[1]
    assert chosen["config"] == {**second.all_kwargs()} and chosen["config"]["TILE"] == second.kwargs["TILE"]
    assert chosen["config"]["num_warps"] == second.num_warps
    json.dumps(_runtime.tuned_configs())  # written into the benchmarks' JSON as it is


def test_without_replay_every_launch_goes_through_triton(stand_in, through_triton):
    call = _stats_call(torch.empty(SHAPE, memory_format=torch.channels_last))
    with _runtime.replaying(False):
        for _ in range(3):
            _runtime.launch(*call)
    assert len(through_triton) == 6
    _runtime.launch(*call)
    _runtime.launch(*call)
    assert len(through_triton) == 8


def test_an_op_replays_its_plan_with_each_calls_tensors(stand_in, through_triton):
    """Through the op itself: the second call with fresh tensors replays, and hands the
    launcher that call's input and outputs."""
    C = SHAPE[1]
    arrays = [torch.rand(C) + 0.5 for _ in range(4)]
    for call in range(2):
        x = torch.randn(SHAPE).to(memory_format=torch.channels_last)
        out = bn_act.bn_relu(x, *arrays, True)
        (launch,) = [launch for launch in LAUNCHES if launch.args[0] is x]
        assert launch.args[bn_act._bn_act_forward_kernel.arg_names.index("out_ptr")] is out
    assert len(through_triton) == 1


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


def test_a_plan_is_recorded_with_the_configuration_of_its_key(stand_in, monkeypatch):
    """Another thread may pin a configuration (pinned_config) while a call records its plan:
    the plan must still run what its key says (here: the autotuner's choice, not the pin),
    or every later unpinned call of the key would replay the pinned configuration."""
    call = _stats_call(torch.empty(SHAPE, memory_format=torch.channels_last))
    _runtime.forget_plans()
    _runtime.launch(*call)
    chosen = LAUNCHES[-2]  # the partials kernel, the autotuner's (the stand-in's second) configuration
    original = _runtime.Launch.through_triton

    def pinned_meanwhile(self, pinned):
        monkeypatch.setattr(_runtime, "_pinned", 0)  # another thread enters pinned_config(0)
        return original(self, pinned)

    _runtime.forget_plans()
    with monkeypatch.context() as m:
        m.setattr(_runtime.Launch, "through_triton", pinned_meanwhile)
        _runtime.launch(*call)
    monkeypatch.setattr(_runtime, "_pinned", None)  # ... and leaves it
    _runtime.launch(*call)  # replayed
    assert same_launch(LAUNCHES[-2], chosen)


@pytest.mark.parametrize("channels", [1, 3, 64, 2048, 300_000])
def test_row_indices_at_the_row_limit_stay_below_2_31(channels):
    """The margin under 2^31 that ``MAX_ROWS`` keeps: past the rows, a program forms row
    indices up to two tiles of rows on (a tile of one lane per row is TILE rows), and a
    reduction chunk range's unclamped end (``row_begin + covered * rows_per_chunk``, at most
    ``row_chunks * rows_per_chunk``) up to fewer than MAX_CHUNKS on, in every configuration
    and partition of an input at the limit."""
    tuning = _runtime.TUNING
    most_tile_rows = max(config.kwargs["TILE"] for config in tuning.elementwise + tuning.reduce)
    assert _runtime.MAX_ROWS + 2 * most_tile_rows < 2**31
    for channels_last, shape in ((True, (_runtime.MAX_ROWS, channels, 1, 1)),  # N*H*W rows
                                 (False, (_runtime.MAX_ROWS // channels, channels, 1, 1))):  # N*C planes
        for sms in (1, 132, 1000):
            part = _reduce._partition(shape, channels_last, sms)
            assert part.row_chunks * part.rows_per_chunk < part.rows + _reduce.MAX_CHUNKS < 2**31, (shape, sms)


@pytest.mark.parametrize("replay", [True, False], ids=["recorded", "through_triton"])
def test_a_first_call_failing_in_graph_capture_says_to_warm_up(stand_in, monkeypatch, replay):
    """A new key goes through Triton, whose autotuner synchronizes: inside CUDA graph capture
    that fails, and the error says to call the op once before capture. Outside capture the
    error is Triton's own, unchanged."""
    def synchronizing(self, pinned):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(_runtime.Launch, "through_triton", synchronizing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _runtime.forget_plans()
    call = _stats_call(torch.empty(SHAPE, memory_format=torch.channels_last))
    with _runtime.replaying(replay):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with pytest.raises(RuntimeError, match=r"call each op once before capture.*operation not permitted") as raised:
            _runtime.launch(*call)
        assert isinstance(raised.value.__cause__, RuntimeError)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        with pytest.raises(RuntimeError, match=r"^CUDA error: operation not permitted when stream is capturing$"):
            _runtime.launch(*call)


def test_launches_through_triton_go_one_thread_at_a_time():
    """Triton's autotuner keeps a call's arguments on the shared kernel object, and its
    interpreter the grid position in one global builder: two threads' launches through
    Triton never overlap (replays take no lock)."""
    import threading
    import time

    inside, overlaps = [], []

    class Slow:  # a launch whose trip through Triton takes a while
        def through_triton(self, pinned):
            inside.append(threading.get_ident())
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            time.sleep(0.01)
            inside.remove(threading.get_ident())

    threads = [threading.Thread(target=_runtime.run, args=([Slow(), Slow()],)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not overlaps and not inside
