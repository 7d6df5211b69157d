"""Every Triton kernel, with every autotune configuration, compiled for sm_90 without a GPU.

    python scripts/triton_report.py

For each compiled kernel: registers per thread, local memory per thread (spills or
stack: what Triton's ``CompiledKernel.n_spills`` reports once loaded on a GPU; read
here from the cubin with cuobjdump, the same number), shared memory, the warps an SM
holds at once (from those three and the program's warps) and, for the
elementwise kernels, the stores narrower than one 128-bit vector in the machine code
(0: every activation store is an STG.E.128) and, in the Triton IR, the 32-bit products of
a kernel argument that become an address offset or are widened to 64 bits only after
the multiplication (0: no such product can wrap past 2^31). The argument
sets are those the ops launch (:func:`representative_calls`: ``batch_stats.launches``,
``bn_act.forward_launches``, ``bn_act.backward_launches``) for ResNet-50's layer1 BN3 at
batch 128 (256 channels, 56x56) in both layouts, on uninitialized CPU tensors (only their
dtype, shape and alignment matter).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterator, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _reduce, _runtime, batch_stats, bn_act
from ._runtime import Call, Launch

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = (torch.bfloat16, torch.float32)
SHAPE = (128, 256, 56, 56)
_TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass(frozen=True)
class KernelResources:
    kernel: str
    variant: str  # dtype, layout, epilogue
    config: str  # the tile constexprs, warps, stages
    registers: int
    local_bytes: int  # per thread; > 0: spills (or a stack array)
    shared_bytes: int
    narrow_stores: Optional[int] = None  # elementwise kernels: stores narrower than 128 bits
    warps: int = 4  # per program
    waits_first: Optional[bool] = None  # launched early: griddepcontrol.wait before any global access
    narrow_products: int = 0  # 32-bit products of an argument used as offsets (_narrow_address_products)

    @property
    def resident_warps(self) -> int:
        """Warps of this kernel an sm_90 SM holds at once (its programs' warps)."""
        return resident_warps(self.registers, self.warps, self.shared_bytes)


# sm_90's limits per SM, which decide how many programs of a kernel stay resident (CUDA
# programming guide, compute capability 9.0): registers go to warps in units of 256,
# and the runtime reserves 1 KiB of shared memory per block.
SM90_REGISTERS, SM90_REGISTER_UNIT = 65536, 256
SM90_SHARED_BYTES, SM90_SHARED_RESERVED = 228 * 1024, 1024
SM90_MAX_WARPS, SM90_MAX_BLOCKS = 64, 32


def resident_warps(registers: int, warps: int, shared_bytes: int) -> int:
    """Warps an sm_90 SM keeps resident of a kernel whose programs have ``warps`` warps,
    ``registers`` per thread and ``shared_bytes`` of shared memory. The reductions are
    partitioned for 16 (one wave): fewer means a second wave."""
    per_warp = -(-registers * 32 // SM90_REGISTER_UNIT) * SM90_REGISTER_UNIT
    programs = min(
        SM90_REGISTERS // per_warp // warps,
        SM90_SHARED_BYTES // (shared_bytes + SM90_SHARED_RESERVED),
        SM90_MAX_WARPS // warps,
        SM90_MAX_BLOCKS,
    )
    return programs * warps


LAYOUTS = {"nhwc": torch.channels_last, "nchw": torch.contiguous_format}


def representative_calls(
    dtype: torch.dtype, shape: tuple[int, int, int, int] = SHAPE, layouts: tuple[str, ...] = tuple(LAYOUTS)
) -> Iterator[tuple[str, Call]]:
    """(variant, (build, static, operands)) for every launch plan an op runs at ``shape``
    (default: layer1's at batch 128), in each layout, as ``_runtime.launch`` takes them.
    The tensors are uninitialized CPU tensors: only their dtype, shape and alignment
    matter, and their memory is never touched."""
    for layout in layouts:
        memory_format = LAYOUTS[layout]
        channels_last = memory_format == torch.channels_last

        def activation():
            return torch.empty(shape, dtype=dtype, memory_format=memory_format)

        x, y, grad = activation(), activation(), activation()
        channels = shape[1]
        part = _reduce.partition(x, channels_last)
        view = bn_act._Elementwise.of(x, channels_last)

        def per_channel():
            return torch.empty(channels)

        def arrays():  # weight, bias, mean, invstd
            return per_channel(), per_channel(), per_channel(), per_channel()

        cpu = torch.device("cpu")
        stats = (x, batch_stats.empty_partials(part, cpu), *arrays(), 0.1, 0.9, 1e-5)
        yield f"{_TYPE_NAMES[dtype]} {layout}", (batch_stats.launches, (part,), stats)
        for epilogue, name in ((bn_act.RELU, "relu"), (bn_act.ADD_RELU, "add_relu"), (bn_act.DUAL_ADD_RELU, "dual")):
            variant = f"{_TYPE_NAMES[dtype]} {layout} {name}"
            dual = epilogue.value == bn_act.DUAL_ADD_RELU.value
            other = None if epilogue.value == bn_act.RELU.value else y
            main, down = arrays(), arrays() if dual else (None,) * 4
            forward = (x, *main, other, *down, torch.empty_like(x))
            yield variant, (bn_act.forward_launches, (epilogue.value, view), forward)
            scratch = bn_act.empty_backward_scratch(part, epilogue.value, cpu)
            grads = (torch.empty_like(x), per_channel(), per_channel(), None if other is None else torch.empty_like(x),
                     *((per_channel(), per_channel()) if dual else (None, None)))
            for training in (True, False):
                backward = (grad, x, *main, other, *down, *scratch, *grads)
                yield variant + ("" if training else " eval"), (
                    bn_act.backward_launches, (epilogue.value, training, part, view), backward
                )


def representative_launches(
    dtype: torch.dtype, shape: tuple[int, int, int, int] = SHAPE, layouts: tuple[str, ...] = tuple(LAYOUTS)
) -> Iterator[tuple[str, Launch]]:
    """(variant, launch) for every kernel an op launches at ``shape``: the launches of
    :func:`representative_calls`."""
    for variant, (build, static, operands) in representative_calls(dtype, shape, layouts):
        for launch in build(*static, *operands):
            yield variant, launch


def _source(fn: triton.JITFunction, args: dict) -> ASTSource:
    """The source the JIT would compile for ``args``: pointer and integer arguments that
    are multiples of 16 specialized as such, integers equal to 1 as constants."""
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = args[param.name]
        if param.is_constexpr or (type(value) is int and value == 1):
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
            continue
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPE_NAMES[value.dtype]
            divisible = value.data_ptr() % 16 == 0
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        elif isinstance(value, float):
            signature[param.name] = "fp32"
            divisible = False
        else:
            raise TypeError(f"{fn.__name__}: cannot specialize argument {param.name}={value!r}")
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def _cuobjdump() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found (neither bundled with Triton nor on PATH)")
    return found


# The streaming kernels whose every store is an activation vector: at the report's shape
# (256 channels, 56x56: runs of 16-byte multiples) each must be one 128-bit STG.E.128.
ELEMENTWISE_KERNELS = ("_bn_act_forward_kernel", "_bn_act_backward_elementwise_kernel")


def _cuobjdump_of(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), *flags, f.name], check=True, capture_output=True, text=True).stdout


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) per thread of the one kernel in ``cubin``."""
    usage = _cuobjdump_of(cubin, "--dump-resource-usage")
    match = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{usage}")
    return int(match.group(1)), int(match.group(2))


_GLOBAL_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:ld|st|cp\.async|atom|red|prefetch)\.(?:\w+\.)*global\b",
                            re.M)


def _waits_first(ptx: str) -> bool:
    """Whether the kernel's PTX waits for its stream predecessor (griddepcontrol.wait)
    before its first global memory access."""
    wait = ptx.find("griddepcontrol.wait")
    first = _GLOBAL_ACCESS.search(ptx)
    return wait >= 0 and (first is None or wait < first.start())


# Triton IR (TTIR) operations: `%name = op operands : types`; the kernel's arguments in its
# `tt.func` signature. Operations that only shape a value (a scalar splat into a tile, a
# broadcast) pass a 32-bit product on unchanged.
_TTIR_OPERATION = re.compile(r"^\s*(%[\w.]+) = ([\w.]+) (.*)$", re.M)
_TTIR_VALUE = re.compile(r"%[\w.]+")
_TTIR_I32 = re.compile(r"(?:\b|x)i32\b")  # i32, tensor<64x16xi32>
_TTIR_SHAPE_OPS = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape")


def _narrow_address_products(ttir: str) -> int:
    """32-bit products with a kernel argument as a factor, scalar or spread over a tile
    (``C * 2``, ``BLOCK_R * row_stride``, ``tl.arange(0, 16) * stride``), that reach a
    pointer's offset (``tt.addptr``) or a widening to 64 bits (``arith.extsi``) through
    shaping operations alone. Such a product wraps once the argument is large (a row
    stride of 2^25 channels times 64 rows) before the address is 64-bit: it must be formed
    in 64 bits (``tl.cast(arg, tl.int64) * k``), or as pointer steps that each widen their
    own offset (``ptr + C + C``). A product that an addition follows first
    is not counted: row and plane indices are such sums (bounded by ``_runtime.MAX_ROWS``,
    then widened), and so would be a wrapping ``row * C + lane``."""
    signature = re.search(r"tt\.func\b[^(]*\((.*?)\)\s*attributes", ttir, re.S)
    if signature is None:
        raise ValueError("no tt.func signature in the Triton IR: its format changed")
    arguments = set(re.findall(r"(%\w+):", signature.group(1)))
    products, found = set(), 0
    for result, operation, rest in _TTIR_OPERATION.findall(ttir):
        operands_part, _, types = rest.rpartition(" : ")
        operands = _TTIR_VALUE.findall(operands_part)
        if operation == "arith.muli" and _TTIR_I32.search(types) and arguments.intersection(operands):
            products.add(result)
        elif operation in _TTIR_SHAPE_OPS and operands and operands[0] in products:
            products.add(result)
        elif operation in _TTIR_SHAPE_OPS and operands and operands[0] in arguments:
            arguments.add(result)  # an argument spread over a tile
        elif operation == "arith.extsi" and operands and operands[0] in products:
            found += 1
        elif operation == "tt.addptr" and len(operands) > 1 and operands[1] in products:
            found += 1
    return found


def _narrow_stores(cubin: bytes) -> int:
    """Global stores in ``cubin``'s machine code narrower than 128 bits."""
    return sum(".128" not in s for s in re.findall(r"\bSTG\.E(?:\.[A-Z0-9_]+)*", _cuobjdump_of(cubin, "-sass")))


def _configs(launch: Launch, early: bool) -> Iterator[tuple[triton.JITFunction, dict, dict]]:
    """(function, arguments, compile options) per configuration the launch may run, as a
    programmatic dependent launch or not (``early``: ``_runtime.early_launch``)."""
    kernel = launch.kernel
    early_args, early_options = _runtime.early_launch_arguments(early)
    if isinstance(kernel, triton.runtime.Autotuner):
        for config in kernel.configs:
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages, **early_options)
            if config.maxnreg is not None:
                options["maxnreg"] = config.maxnreg
            yield kernel.fn, {**launch.args, **config.kwargs, **early_args}, options
    else:
        args = {**launch.args, **early_args}
        options = {k: args.pop(k) for k in ("num_warps", "num_stages") if k in args} | early_options
        yield kernel, args, options


def _describe(fn: triton.JITFunction, args: dict, options: dict) -> str:
    tuned = ("TILE", "BLOCK", "STAGES", "CHUNKS")
    shown = [f"{p.name}={args[p.name]}" for p in fn.params if p.is_constexpr and p.name.startswith(tuned)]
    return " ".join(shown + [f"{k}={v}" for k, v in options.items() if k != "launch_pdl"])


def _kernel_key(source: ASTSource, options: dict) -> tuple:
    """What makes two compilations one kernel: the specialized source and the options."""
    return source.hash(), tuple(sorted(options.items()))


def compile_all(dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[KernelResources]:
    """Compiles every kernel and configuration for ``TARGET``; one row per distinct kernel."""
    rows, seen = [], set()
    for dtype in dtypes:
        for variant, launch in representative_launches(dtype):
            for fn, args, options in _configs(launch, _runtime.early_launch_enabled_by_env()):  # TARGET: sm_90
                source = _source(fn, args)
                key = _kernel_key(source, options)
                if key in seen:
                    continue
                seen.add(key)
                compiled = triton.compile(source, target=TARGET, options=options)
                cubin = compiled.asm["cubin"]
                registers, local_bytes = _resources(cubin)
                rows.append(KernelResources(
                    fn.__name__, variant, _describe(fn, args, options), registers, local_bytes,
                    compiled.metadata.shared,
                    _narrow_stores(cubin) if fn.__name__ in ELEMENTWISE_KERNELS else None,
                    compiled.metadata.num_warps,
                    _waits_first(compiled.asm["ptx"]) if options.get("launch_pdl") else None,
                    _narrow_address_products(compiled.asm["ttir"]),
                ))
    return rows


def format_table(rows: list[KernelResources]) -> str:
    header = ("kernel", "variant", "config", "regs", "local B", "shared B", "warps/SM", "narrow st", "waits first",
              "i32 products")
    table = [header] + [
        (r.kernel, r.variant, r.config, str(r.registers), str(r.local_bytes), str(r.shared_bytes),
         str(r.resident_warps), "-" if r.narrow_stores is None else str(r.narrow_stores),
         "-" if r.waits_first is None else "yes" if r.waits_first else "NO", str(r.narrow_products))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


# ---------------------------------------------------------------- warming the cache on a GPU machine
#
# Autotuning compiles every configuration of a kernel serially, on the first call of each
# key: about 300 compiles for the kernel benchmark's shapes. precompile() compiles them
# ahead, in parallel processes, through the JIT's own warm-up path (so each binary lands
# in Triton's on-disk cache under the very key a launch looks up; a triton.compile of
# _source(), as above, does not reproduce that key). It needs the GPU's driver, not the
# extension: the GPU check runs it while nvcc builds.

Spec = tuple[str, tuple[int, int, int, int], str]  # dtype name, shape, layout


def _compilations(spec: Spec) -> list[tuple[triton.JITFunction, dict, dict]]:
    dtype, shape, layout = spec
    # The current GPU's; without one (planning in a test), TARGET's.
    early = _runtime.early_launch() if torch.cuda.is_available() else _runtime.early_launch_enabled_by_env()
    return [c for _, launch in representative_launches(getattr(torch, dtype), shape, (layout,))
            for c in _configs(launch, early)]


def _warm(tasks: list[tuple[Spec, int]]) -> int:
    """Compiles the ``index``-th compilation of each ``(spec, index)``; returns how many."""
    by_spec: dict[Spec, list] = {}
    for spec, index in tasks:
        fn, args, options = by_spec.setdefault(spec, _compilations(spec))[index]
        fn.warmup(grid=(1,), **args, **options)
    return len(tasks)


def distinct_compilations(specs: list[Spec]) -> list[tuple[Spec, int]]:
    """(spec, index) of each distinct kernel specialization the specs launch: shapes that
    differ only in sizes Triton does not specialize on share their kernels."""
    tasks, seen = [], set()
    for spec in specs:
        for index, (fn, args, options) in enumerate(_compilations(spec)):
            key = _kernel_key(_source(fn, args), options)
            if key not in seen:
                seen.add(key)
                tasks.append((spec, index))
    return tasks


def precompile(specs: list[Spec], jobs: int) -> int:
    """Compiles every kernel and configuration the ops launch at each (dtype, shape, layout)
    for the current GPU, in ``jobs`` processes; returns the number of distinct kernels."""
    import concurrent.futures
    import multiprocessing

    tasks = distinct_compilations(specs)
    jobs = max(1, min(jobs, len(tasks)))
    shares = [tasks[i::jobs] for i in range(jobs)]
    context = multiprocessing.get_context("spawn")  # CUDA and fork do not mix
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return sum(pool.map(_warm, shares))
