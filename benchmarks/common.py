"""Shared benchmark machinery: timers, ceilings measured in the same run, metadata, output.

Timing rules (see docs/performance.md): CUDA times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between repetitions, warm-up
first); CPU times are medians of ``time.perf_counter`` over repeated calls after a
warm-up. Ceilings (copy bandwidth, bf16 matmul throughput) are measured in the same
process, on the same device, so a percentage never mixes two runs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS_ENV = "RESNET_FUSED_RESULTS"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet_cpu_profiler() -> None:
    """Silences the profiler library's own log lines for a CPU run (unless the user set
    ``KINETO_LOG_LEVEL``): a CUDA build of torch on a machine without a GPU writes three per
    profiled region ("profiler_start", "profiler_stop", "gpuGetDeviceCount failed") in
    between the benchmarks' output. Read when the library first starts, so call before that."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def measure(fn: Callable[[], object], device: torch.device, *, budget_ms: float = 100.0) -> dict:
    """Median, 20th and 80th percentile run time of ``fn`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=max(budget_ms / 4, 5), rep=budget_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}
    for _ in range(2):  # warm-up: allocator, thread pool, caches
        fn()
    times = []
    deadline = time.perf_counter() + budget_ms / 1e3
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10)
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def cuda_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph after two warm-up calls, all on one side stream (the
    stream an eager backward's forward graph is built on, which autograd runs it on)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    return graph


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth (bytes read + written per second, GB/s) on a buffer far larger than L2."""
    if device.type == "cpu":
        nbytes = min(nbytes, 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device)["median_ms"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bf16_matmul_tflops(device: torch.device, n: int = 8192) -> Optional[float]:
    """Dense bf16 matmul throughput (TFLOP/s) on CUDA; None on the CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = measure(lambda: a @ b, device)["median_ms"]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _source_hash() -> str:
    """SHA-1 (10 digits) of the measured code: the package, kernels and benchmarks. Names the
    code where git cannot (a copied working tree whose .git is older or unreadable)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for folder in ("resnet_fused", "csrc", "benchmarks"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cpp", ".cu", ".h", ".json"):
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def environment(device: torch.device) -> dict:
    """What a result row must carry: the machine, the software, the code, the time."""
    env = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "source_sha1": _source_hash(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        # The package's switches set for this run (backend, Triton pin and replay, experiments).
        "resnet_fused_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RESNET_FUSED_")},
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            card=props.name,
            arch=f"sm_{props.major}{props.minor}",
            sms=props.multi_processor_count,
            l2_mib=props.L2_cache_size / 2**20,
            memory_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_driver(),
            early_launch=_early_launch(device),
        )
    else:  # the same fields on every device, so rows of CPU and GPU runs line up
        env.update(card=f"CPU: {env['cpu']} ({env['cpu_threads']} threads)", arch=None, sms=None, l2_mib=None,
                   cuda=None, cudnn=None, driver=None)
    return env


def _early_launch(device: torch.device) -> Optional[bool]:
    """Whether the GPU backends launch their kernels on ``device`` as programmatic dependents
    (one rule for both: sm_90 or later, a CUDA 12.3+ driver, RESNET_FUSED_PDL not 0); None
    without Triton, which asks it."""
    try:
        from resnet_fused.triton import _runtime
    except ImportError:
        return None
    with torch.cuda.device(device):
        return _runtime.early_launch()


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError):
        return None


def results_dir(option: Optional[str] = None) -> Path:
    """Where results go: the option, else $RESNET_FUSED_RESULTS, else results/local."""
    path = Path(option or os.environ.get(RESULTS_ENV) or "results/local")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, env: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
