"""Where the Triton kernels run, how they are launched, and their launch configurations.

Triton kernels run on CUDA tensors. With ``TRITON_INTERPRET=1`` set before Triton is
imported, Triton replaces every kernel by a NumPy interpreter that runs on CPU tensors
(float16 and float32 only: NumPy has no bfloat16); CI tests the kernels that way. The
interpreter executes each program separately, about a millisecond per program, so under
it every kernel gets one small configuration that still exercises loops and tails.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import threading
import warnings
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl
import triton.testing
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .. import backends

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
PIN_ENV = "RESNET_FUSED_TRITON_CONFIG"

DEVICE_TYPES = ("cpu",) if INTERPRET else ("cuda",)
DTYPES = (torch.float16, torch.float32) if INTERPRET else backends.GPU_DTYPES  # the interpreter: no bfloat16


def unavailable_reason() -> Optional[str]:
    """Why the kernels cannot run in this process, or None when they can."""
    if INTERPRET or torch.cuda.is_available():
        return None
    return (
        "no CUDA device (Triton kernels run on CUDA tensors, or on CPU tensors when "
        "TRITON_INTERPRET=1 is set before import)"
    )


def check_runnable(op: str, input: torch.Tensor) -> None:
    """Raises, naming the argument, if the kernels cannot run ``input``'s device or dtype."""
    if input.device.type not in DEVICE_TYPES:
        where = "CPU tensors under TRITON_INTERPRET=1" if INTERPRET else "CUDA tensors"
        raise RuntimeError(f"{op}(): the Triton kernels run on {where}, got `input` on {input.device}")
    if input.dtype not in DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        hint = " under TRITON_INTERPRET=1" if INTERPRET else "; use the reference backend"
        raise TypeError(f"{op}(): the Triton kernels run {names} `input`{hint}, got {input.dtype}")


# Tile row indices are int32 (64-bit only once multiplied into offsets): every row index
# a program forms, up to the rows plus two tiles of rows past them, must stay below 2^31.
MAX_ROWS = 2**31 - 2**15
_warned_rows: set[str] = set()


def beyond_row_limit(op: str, input: torch.Tensor) -> bool:
    """Whether ``input`` (N, C, H, W) has more rows than the kernels index, in either layout
    (N*H*W pixels, N*C planes); warns once per op when it has."""
    n, c, h, w = input.shape
    if n * max(c, h * w) <= MAX_ROWS:
        return False
    if op not in _warned_rows:
        _warned_rows.add(op)
        warnings.warn(
            f"resnet_fused: {op} on the Triton backend runs the plain-PyTorch reference for an input "
            f"of shape {list(input.shape)}: the kernels index at most {MAX_ROWS} rows (N*H*W and N*C)",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def float32_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-channel array as the kernels read it, float32 and contiguous: ``t`` itself when
    it already is (``Tensor.to`` and ``contiguous`` cost about a microsecond each even when
    they have nothing to do), else a converted copy."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


_NO_GUARD = contextlib.nullcontext()  # reusable and reentrant: one for every call


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s device current: Triton launches on the current device and stream.
    Nothing to do where it already is (the common case): ``torch.cuda.device`` of a
    ``torch.device`` costs ~1.2 us to construct (2-core AMD EPYC), of an index ~0.2."""
    if not t.is_cuda:
        return _NO_GUARD
    index = t.get_device()
    return _NO_GUARD if index == torch.cuda.current_device() else torch.cuda.device(index)


# ---------------------------------------------------------------- early launch
#
# On sm_90 and later every kernel is launched as a programmatic dependent of the kernel
# before it in the stream (Triton's `launch_pdl` option): the driver may schedule its
# programs while that kernel still runs, so an op's next kernel is resident when the one
# before ends instead of being launched then. Every kernel's first statement,
# `await_stream_predecessor(PDL)`, makes it exact: it waits until the kernels before it
# have completed and their writes are visible, then lets the next kernel be scheduled
# (docs/cuda_kernels.md, "Launches": the CUDA backend does the same).

PDL_ENV = "RESNET_FUSED_PDL"  # 0: every kernel launched in order (both GPU backends)
_EARLY_LAUNCH_ENABLED_BY_ENV = os.environ.get(PDL_ENV, "").strip() != "0"


@triton.jit
def await_stream_predecessor(PDL: tl.constexpr):
    """A kernel's first statement: with ``PDL``, griddepcontrol.wait (the kernels before it
    in the stream have completed, their writes visible), then
    griddepcontrol.launch_dependents (the stream's next kernel may be scheduled)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def early_launch_enabled_by_env() -> bool:
    """False where ``RESNET_FUSED_PDL=0`` (read at import)."""
    return _EARLY_LAUNCH_ENABLED_BY_ENV


# A driver records early launches in stream capture as programmatic graph edges from CUDA
# 12.3 on: below, torch.cuda.graph would fail (the CUDA backend asks the same).
EARLY_LAUNCH_MIN_DRIVER = 12030


@functools.cache
def _cuda_driver_version() -> int:
    """The CUDA driver's version (12030 for 12.3), or 0 where libcuda cannot be asked."""
    try:
        version = ctypes.c_int(0)
        status = ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
    except (OSError, AttributeError):  # no libcuda (another OS: launched in order, safe)
        return 0
    return version.value if status == 0 else 0


def early_launch() -> bool:
    """Whether kernels launched now, on the current device, are programmatic dependents:
    a CUDA device of sm_90 or later (its code has griddepcontrol) and a CUDA 12.3+ driver,
    not the interpreter."""
    if INTERPRET or not early_launch_enabled_by_env():
        return False
    target = triton.runtime.driver.active.get_current_target()
    return (
        target.backend == "cuda"
        and isinstance(target.arch, int)
        and target.arch >= 90
        and _cuda_driver_version() >= EARLY_LAUNCH_MIN_DRIVER
    )


def early_launch_arguments(early: bool) -> tuple[dict, dict]:
    """(kernel arguments, launch options) of every launch: the kernels' ``PDL`` and Triton's
    ``launch_pdl``."""
    return {"PDL": early}, {"launch_pdl": early}


# ---------------------------------------------------------------- launching
#
# Triton's own launch path (the autotuner's key, the JIT's argument binding and
# specialization, its cache lookup) costs 25-90 us of host time per launch (2-core Xeon,
# Triton 3.6), more than most of these kernels run on an H200, and an op launches one to
# three; building each launch's arguments by name and keying it would cost ~10 us more.
# So an op call goes through Triton once per *plan key*, and later calls of the
# key replay the plan it recorded. An op hands `launch` a builder, the values the
# builder's launches follow from (`static`: variant, partition, tiling; hashable) and the
# call's *operands* (tensors, floats, None for an absent optional tensor). The key is the
# builder, `static`, the pinned configuration, the current device, and each operand as
# Triton may specialize on it (tensors by dtype and address modulo 16, as
# compile_report._source mirrors; floats by type; anything else by value). The plan
# keeps, per launch, the compiled kernel Triton returned, bound to the grid of then, and
# its argument list in the order of the kernel's compiled signature, with the
# configuration's constants as that kernel was compiled with them and holes where the
# operands go. A replay fills the holes and calls the kernels: no launch objects, no
# argument dictionaries, one key. While no launch hook is set (a profiler's), it calls
# each kernel's launcher itself, as Triton's runner would then, with the stream read once
# per call rather than once per launch (`_direct_replay`).

_PLAN_LIMIT = 1024  # plans kept; past it, the record starts over
REPLAY_ENV = "RESNET_FUSED_TRITON_REPLAY"  # 0: every launch through Triton


@dataclasses.dataclass(frozen=True)
class Operand:
    """Stands for an op call's ``index``-th operand in the launches its builder makes
    while a plan is recorded: the builder only places operands, never reads them."""

    index: int


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel (autotuned or not), its grid and its arguments by name.

    ``grid`` must be a function of the arguments that are not operands and of the
    configuration's constants: a plan replays the grid of the launch it recorded. The ops'
    builders make these; ``compile_report`` compiles the very same argument sets for sm_90
    without a GPU.
    """

    kernel: Any  # triton.runtime.Autotuner or JITFunction
    grid: Callable[[dict], tuple[int, ...]]
    args: dict[str, Any]

    def through_triton(self, pinned: Optional[int]) -> Optional["_Compiled"]:
        """Launches through Triton (autotuning a new key, compiling a new specialization),
        with the ``pinned`` configuration (None: the autotuner's); returns the kernel it
        ran, or None where Triton returned no compiled kernel."""
        config = _config_at(self.kernel, pinned)
        arguments, options = early_launch_arguments(early_launch())
        if config is None:
            compiled = self.kernel[self.grid](**self.args, **arguments, **options)
        else:
            compiled = self.kernel.fn[self.grid](**self.args, **config.all_kwargs(), **arguments, **options)
        source = getattr(compiled, "src", None)
        signature, constants = getattr(source, "signature", None), getattr(source, "constants", None)
        if INTERPRET or not isinstance(signature, dict) or not isinstance(constants, dict):
            return None
        # The constants not among the launch's arguments (the configuration's TILE, STAGES;
        # PDL) as this kernel was compiled with them:
        # not the autotuner's `best_config`, which a launch on another thread may have changed.
        names = source.fn.arg_names  # the JITFunction compiled
        set_by_config = {names[k[0]]: v for k, v in constants.items() if names[k[0]] not in self.args}
        grid = tuple(self.grid({**self.args, **set_by_config}))
        return _Compiled(compiled, grid + (1,) * (3 - len(grid)), tuple(signature), tuple(signature.values()),
                         set_by_config)


@dataclasses.dataclass(frozen=True)
class _Compiled:
    """A compiled kernel, its grid, and what its launcher takes."""

    kernel: Any  # Triton's CompiledKernel: its launcher, function and packed metadata (`_direct_replay`)
    grid: tuple[int, int, int]
    params: tuple[str, ...]  # the launcher's parameters in order (Triton's compiled signature)
    kinds: tuple[str, ...]  # their types as compiled: "*bf16", "i32", "fp32", "constexpr" (compiled in), ...
    constants: dict[str, Any]  # compiled-in values not among the launch's arguments: the config's TILE, STAGES; PDL

    @property
    def runner(self) -> Callable[..., None]:
        """CompiledKernel[grid]: launches on the current device and stream, with the launch hooks."""
        return self.kernel[self.grid]


@dataclasses.dataclass(frozen=True)
class _Step:
    """One launch of a plan: ``runner`` takes ``arguments``, the operands put in at ``holes``
    ((position in the arguments, operand index) pairs)."""

    runner: Callable[..., None]
    arguments: tuple
    holes: tuple[tuple[int, int], ...]

    def __call__(self, operands: tuple) -> None:
        args = list(self.arguments)
        for position, index in self.holes:
            args[position] = operands[index]
        self.runner(*args)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """An op call's launches: ``steps`` through each compiled kernel's runner, and
    ``direct`` (where it could be made) the same launches as one function that hands each
    launcher what the runner would, given the call's operands and stream, for when no
    launch hook is set (``_direct_replay``)."""

    # The steps' runners keep the compiled kernels alive, and with them the function handles
    # ``direct`` calls (Triton 3.8 unloads a collected kernel's module).
    steps: tuple[_Step, ...]
    direct: Optional[Callable[[tuple, int], None]]


try:
    from triton import knobs as _KNOBS
except ImportError:  # a Triton without knobs (before 3.4): every launch through its runner
    _KNOBS = None


def _launch_hooks_idle() -> bool:
    """Whether no launch hook is set: Triton's ``knobs.runtime.launch_enter_hook`` and
    ``launch_exit_hook`` (3.6-3.8: ``HookChain`` objects, idle while their ``calls`` are
    empty, or None). Then a runner's launch metadata and hooks do nothing. False where
    Triton has no knobs: its runners launch."""
    if _KNOBS is None:
        return False
    runtime = _KNOBS.runtime
    return all(hook is None or not getattr(hook, "calls", True)
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def _direct_replay(kernels: list[_Compiled], steps: list[_Step]) -> Optional[Callable[[tuple, int], None]]:
    """One function launching every step as ``CompiledKernel.__getitem__``'s runner does
    with no launch hook set: ``kernel.run(*grid, stream, kernel.function,
    kernel.packed_metadata, None, None, None, *arguments)`` (Triton 3.6-3.8), its holes
    filled from the operands ``o``; None where a compiled kernel lacks those attributes."""
    prepared = []
    for compiled, step in zip(kernels, steps, strict=True):
        kernel = compiled.kernel
        try:
            launcher = (kernel.run, kernel.function, kernel.packed_metadata)
        except AttributeError:
            return None
        prepared.append((*compiled.grid, *launcher, step.arguments, step.holes))
    prepared = tuple(prepared)

    def replay(o: tuple, stream: int) -> None:
        for x, y, z, run, function, packed, arguments, holes in prepared:
            args = list(arguments)
            for position, index in holes:
                args[position] = o[index]
            run(x, y, z, stream, function, packed, None, None, None, *args)

    return replay


_plans: dict[tuple, _Plan] = {}
_replaying = os.environ.get(REPLAY_ENV, "1").strip() != "0"


@contextlib.contextmanager
def replaying(enabled: bool):
    """Inside, op calls replay their plans (True) or launch everything through Triton
    (False); the default comes from ``RESNET_FUSED_TRITON_REPLAY``."""
    global _replaying
    previous, _replaying = _replaying, enabled
    try:
        yield
    finally:
        _replaying = previous


def forget_plans() -> None:
    """Drops every recorded plan: the next call of each key goes through Triton."""
    _plans.clear()


Call = tuple[Callable[..., list[Launch]], tuple, tuple]  # what `launch` takes: (build, static, operands)


def run(launches: list[Launch]) -> None:
    """Every launch through Triton, in order."""
    pinned = _pinned
    with _through_triton():
        for one in launches:
            one.through_triton(pinned)


# Triton's autotuner keeps a call's arguments on the kernel object every thread shares
# (triton-lang/triton#11494), and its interpreter the grid position in one global builder:
# launches through Triton go one thread at a time. Replays (plain calls) take no lock.
_TRITON_LOCK = threading.RLock()


@contextlib.contextmanager
def _through_triton():
    """Launches through Triton: one thread at a time, and a failure while the stream is
    being captured into a CUDA graph says what most likely caused it. A new key's
    autotuning times its candidates and synchronizes, which capture forbids
    (torch.cuda.graph's warm-up avoids it)."""
    with _TRITON_LOCK:
        try:
            yield
        except Exception as error:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "resnet_fused (triton backend): a launch through Triton failed inside CUDA graph capture, most "
                    "likely an op's first call at this shape, dtype and layout (autotuning synchronizes, which "
                    "capture forbids); call each op once before capture, as torch.cuda.graph's warm-up does "
                    f"({type(error).__name__}: {error})"
                ) from error
            raise


def launch(build: Callable[..., list[Launch]], static: tuple, operands: tuple) -> None:
    """Runs the launches ``build(*static, *operands)`` makes, on the current device and
    stream: through Triton the first time for the key ("launching" comment above), replayed
    after."""
    if INTERPRET or not _replaying:  # the interpreter has no compiled kernel to replay
        run(build(*static, *operands))
        return
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    pinned = _pinned  # read once: the key and the recording must agree while another thread pins
    key = (build, static, pinned, device, *[
        None if o is None else (o.dtype, o.data_ptr() % 16) if isinstance(o, torch.Tensor)
        else float if type(o) is float else o  # an integer by value: Triton specializes 1, multiples of 16, i64
        for o in operands
    ])  # fmt: skip
    plan = _plans.get(key)
    if plan is None:
        plan = _record(build, static, operands, pinned)
        if plan is not None:
            if len(_plans) >= _PLAN_LIMIT:
                _plans.clear()
            _plans[key] = plan
        return
    if plan.direct is not None and _launch_hooks_idle():
        # The stream once per call: no hook, nothing else runs between the launches.
        plan.direct(operands, driver.get_current_stream(device))
        return
    for step in plan.steps:
        step(operands)


def _record(build: Callable[..., list[Launch]], static: tuple, operands: tuple,
            pinned: Optional[int]) -> Optional[_Plan]:
    """Launches ``build``'s launches through Triton with the ``pinned`` configuration;
    returns them as a plan, or None where Triton returned no compiled kernel for one of them."""
    launches = build(*static, *operands)
    with _through_triton():
        compiled = [one.through_triton(pinned) for one in launches]
    if any(c is None for c in compiled):
        return None
    # The same launches with a marker for each operand: where the operands go.
    try:
        templates = build(*static, *[None if o is None else Operand(i) for i, o in enumerate(operands)])
    except (AttributeError, TypeError) as error:
        raise _builder_error(build, f"reads an operand ({error})") from error
    steps = []
    for recorded, template, kernel in zip(launches, templates, compiled, strict=True):
        arguments, holes = [], []
        for position, name in enumerate(kernel.params):
            value = template.args[name] if name in template.args else kernel.constants[name]
            if isinstance(value, Operand):
                operand = operands[value.index]
                if recorded.args[name] is not operand:
                    raise _builder_error(build, f"put operand {value.index} elsewhere with markers ({name})")
                if kernel.kinds[position] == "constexpr" and type(operand) is float:
                    # compiled in, and a float is keyed by type: a replay would keep this call's value
                    raise _builder_error(build, f"passes a float operand to {name}, a constexpr")
                holes.append((position, value.index))
                value = None
            elif isinstance(recorded.args.get(name), torch.Tensor) or recorded.args.get(name, value) != value:
                raise _builder_error(build, f"passes {name} a tensor or value that is not an operand")
            arguments.append(value)
        steps.append(_Step(kernel.runner, tuple(arguments), tuple(holes)))
    return _Plan(tuple(steps), _direct_replay(compiled, steps))


def _builder_error(build: Callable, what: str) -> RuntimeError:
    """A builder broke its contract (it only places operands); a replay would go wrong."""
    return RuntimeError(f"{build.__name__} {what}: a launch builder may only place its operands")


# ---------------------------------------------------------------- pinned configurations
#
# Autotuning compiles and times every configuration on the first call for each key, and
# tests meet a new key at nearly every shape: a GPU test run would spend minutes in it.
# Pinning runs every autotuned kernel with one configuration of its list instead; the
# tests pin one after another to check each (tests/test_triton_ops.py).


def _pin_from_env() -> Optional[int]:
    value = os.environ.get(PIN_ENV, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):  # str.isdigit alone takes "²", which int() refuses
        raise ValueError(f"{PIN_ENV}={value!r}: expected the index of an autotune configuration (0, 1, ...)")
    return int(value)


_pinned: Optional[int] = _pin_from_env()


def pinned_index() -> Optional[int]:
    """The pinned configuration index; None while the autotuner chooses."""
    return _pinned


def pinned_config_of(kernel: Any) -> Optional[triton.Config]:
    """The configuration ``kernel`` runs with while pinned; None: autotune (or not autotuned)."""
    return _config_at(kernel, _pinned)


def _config_at(kernel: Any, index: Optional[int]) -> Optional[triton.Config]:
    """``kernel``'s ``index``-th configuration; None where ``index`` is None or it is not autotuned."""
    if index is None or not isinstance(kernel, triton.runtime.Autotuner):
        return None
    if index >= len(kernel.configs):
        raise ValueError(
            f"Triton configuration {index} is pinned ({PIN_ENV} or pinned_config), but "
            f"{kernel.fn.__name__} has {len(kernel.configs)} configurations"
        )
    return kernel.configs[index]


@contextlib.contextmanager
def pinned_config(index: Optional[int]):
    """Runs every autotuned kernel with its ``index``-th configuration, without autotuning
    (None: autotune). The default comes from ``RESNET_FUSED_TRITON_CONFIG``."""
    global _pinned
    if index is not None and index < 0:
        raise ValueError(f"pinned_config: index must be >= 0 or None, got {index}")
    previous, _pinned = _pinned, index
    try:
        yield
    finally:
        _pinned = previous


# ---------------------------------------------------------------- launch configurations


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch configurations of one execution mode (GPU or interpreter).

    A tile is ``TILE`` elements: ``TILE // BLOCK_L`` rows of ``BLOCK_L`` contiguous lanes
    (channels in channels_last, H*W positions in NCHW). ``BLOCK_L`` follows from the shape
    (``lane_block``); the autotuner picks ``TILE``, the warps per program and, for the
    reductions, the pipeline depth ``STAGES`` and the chunks a program takes,
    ``CHUNKS_PER_PROGRAM`` (``_reduce``).
    """

    elementwise: list[triton.Config]  # forward, backward elementwise
    reduce: list[triton.Config]  # statistics partials, backward reduction
    max_lane_block: int  # elementwise: lanes per tile row at most
    reduce_channel_block: int  # channels_last reductions: channels per program at most
    reduce_lane_block: int  # NCHW reductions: H*W lanes per tile row at most
    reduce_chunks_per_sm: int  # the partition's chunks (a program takes one or more)
    nominal_sms: int  # programs without a device to ask (interpreter, compile report)
    min_rows_per_chunk: int
    min_lanes_per_chunk: int  # NCHW
    lane_granule: int  # NCHW chunk starts are multiples of it (16: keeps loads vectorizable)
    finalize_tile: int  # partials a finalize program holds (channels x chunks)

    @property
    def most_chunks_per_program(self) -> int:
        """The most chunks a reduction program takes, over the configurations."""
        return max(config.kwargs["CHUNKS_PER_PROGRAM"] for config in self.reduce)


def _configs(*tiles_and_warps: tuple[int, int]) -> list[triton.Config]:
    return [triton.Config({"TILE": tile}, num_warps=warps, num_stages=1) for tile, warps in tiles_and_warps]


def _reduce_configs(
    tiles: list[tuple[int, int, int]], stages: tuple[int, ...], max_registers: Optional[int] = None
) -> list[triton.Config]:
    """Each (TILE, warps, CHUNKS_PER_PROGRAM) with each ``STAGES``: the loop steps a
    reduction program keeps in flight through ``tl.range(..., num_stages=STAGES)`` (1: none
    ahead; n > 1: the loads of n - 1 steps ahead, copied to shared memory by cp.async).
    ``CHUNKS_PER_PROGRAM``: the partition's chunks a program takes where they span whole
    rows of lanes (``_reduce``). ``max_registers``: ptxas's cap per thread (``maxnreg``)."""
    return [
        triton.Config({"TILE": tile, "STAGES": n, "CHUNKS_PER_PROGRAM": chunks}, num_warps=warps, num_stages=1,
                      maxnreg=max_registers)
        for n in stages for tile, warps, chunks in tiles
    ]


if INTERPRET:
    TUNING = Tuning(
        elementwise=_configs((32, 1)),
        reduce=_reduce_configs([(16, 1, 2)], stages=(2,)),
        max_lane_block=8,
        reduce_channel_block=4,
        reduce_lane_block=4,
        reduce_chunks_per_sm=1,
        nominal_sms=4,
        min_rows_per_chunk=2,
        min_lanes_per_chunk=2,
        lane_granule=1,
        finalize_tile=16,
    )
else:
    # Elementwise: 2-8K elements per program (the anchors: 8-32 rows of 256 channels reach
    # the copy bandwidth on an H200). Reductions: 8 chunks per SM, 1-4K-element tiles, so
    # the partials stay few; without pipelining (STAGES=1) a program has one loop
    # step's loads in flight, 16-64 KB per SM; with STAGES=3 the next two steps' loads are
    # in flight too, into shared memory, at the price of shared-memory loads and two
    # barriers per step. The autotuner weighs the two. A program of W warps takes W / 2
    # chunks (where they span whole rows of lanes), so every configuration runs 16 warps
    # per SM in one wave: 16 warps of 128 registers fill an SM's 64K, so ptxas is held to
    # 128 (docs/performance.md, "Triton reductions held to 128 registers"; the compile
    # report shows no spill). No 4K tile on 4 warps: the dual backward needs up to 234.
    TUNING = Tuning(
        elementwise=_configs((2048, 4), (4096, 4), (4096, 8), (8192, 8)),
        reduce=_reduce_configs([(1024, 4, 2), (2048, 4, 2), (2048, 8, 4), (4096, 8, 4)], stages=(1, 3),
                               max_registers=128),
        max_lane_block=256,
        reduce_channel_block=64,
        reduce_lane_block=512,
        reduce_chunks_per_sm=8,
        nominal_sms=132,  # H100 SXM / H200
        min_rows_per_chunk=64,
        min_lanes_per_chunk=256,
        lane_granule=16,
        finalize_tile=2048,
    )


_AUTOTUNED: list[triton.runtime.Autotuner] = []  # every kernel autotune() made, for tuned_configs()


def autotune(configs: list[triton.Config], key: list[str]):
    """``triton.autotune`` timing each candidate for 25 ms after 5 ms of warm-up (Triton's
    default: 100 and 25). The kernels are memory-bound and take 10-500 us at the shapes
    that matter, so that is still 50-2500 runs per candidate, and a first call at a new
    shape costs a fifth of the default's time."""
    bench = functools.partial(triton.testing.do_bench, warmup=5, rep=25)

    def decorate(fn):
        tuner = triton.autotune(configs=configs, key=key, do_bench=bench)(fn)
        _AUTOTUNED.append(tuner)
        return tuner

    return decorate


def tuned_configs() -> dict[str, list[dict[str, Any]]]:
    """What the autotuner chose so far, per kernel: for each key it tuned, the key as
    Triton forms it (the values of the kernel's key arguments present, ``key_args``, then
    the dtypes of its tensor arguments) and the configuration's constants and launch
    options. Empty under the interpreter (one configuration: nothing to tune) and for
    launches with a pinned configuration, which bypass the autotuner. The benchmarks
    record it beside their times."""
    def plain(value):
        return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)

    return {
        tuner.base_fn.__name__: [
            {"key_args": list(tuner.keys), "key": [plain(k) for k in key],
             "config": {name: plain(value) for name, value in config.all_kwargs().items()}}
            for key, config in list(tuner.cache.items())  # a copy: another thread may tune meanwhile
        ]
        for tuner in _AUTOTUNED if tuner.cache
    }


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return TUNING.nominal_sms


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host (``triton.cdiv`` is a constexpr function: ~3 us a host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def lane_block(lanes: int, cap: int, channels_last: bool) -> int:
    """Lanes per tile row (``BLOCK_L``), at most ``cap``, for rows of ``lanes`` values.

    Rows that fit in one block take the next power of two: channels_last rows, and NCHW
    planes of up to ``cap`` values, are adjacent in memory, so padding costs idle lanes,
    not bandwidth. Longer NCHW planes are cut into blocks of 128 lanes or more (256-byte
    bfloat16 segments), the largest whose padding is within 1/16 of the least possible:
    H*W = 3136 -> 256 (padded to 3328), 784 -> 128 (896).
    """
    if channels_last or lanes <= cap:
        return min(next_power_of_2(lanes), cap)
    candidates = [1 << k for k in range(cap.bit_length()) if min(128, cap) <= 1 << k <= cap]
    padded = {b: cdiv(lanes, b) * b for b in candidates}
    least = min(padded.values())
    return max(b for b in candidates if padded[b] * 16 <= least * 17)
