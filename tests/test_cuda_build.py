"""What can be proven about the CUDA backend without a GPU.

- The CUDA sources stay torch-free (the build-time rule of DESIGN.md section 4).
- An extension built with CUDA registers a CUDA kernel for every op, and the ``cuda``
  backend reports itself available.
- The GPU check script parses, and rejects an unknown phase before it touches anything;
  against a stand-in GPU machine (stub nvidia-smi and python), it keeps to TOTAL_BUDGET,
  logs to its results directory, and a TERM stops the running phase's processes too.
- The kernels' own source, compiled for the CPU against a CUDA stand-in
  (``tests/cuda_emulation``), computes every op correctly under AddressSanitizer and
  UBSan: index math, tails, layouts, the misaligned-pointer fallback (every operand's
  alignment, one misaligned at a time), the dual op's branches with parameters of their
  own, the backward's ReLU mask as the forward's bit for bit, the two-level reductions
  and the workspace sizes; which launches are programmatic dependents (sm_90
  devices running kernels compiled for sm_90) and that every thread of every kernel waits
  for the kernels before it before anything else. Timing, the memory model and the real
  compiler's code generation are left to the GPU tests (tests/test_cuda_ops.py).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import resnet_fused
from resnet_fused import _extension, backends

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = ROOT / "csrc" / "cuda"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"


def _extension_has_device_code() -> bool:
    """Whether resnet_fused._C carries CUDA device code (an ELF .nv_fatbin section)."""
    from resnet_fused import _C

    return b".nv_fatbin" in Path(_C.__file__).read_bytes()


def test_cuda_sources_are_torch_free():
    """nvcc must never parse torch or pybind11 headers: they cost a minute per file."""
    forbidden = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11|Python\.h)')
    kernel_files = list(CUDA_SOURCES.glob("*.cu")) + list(CUDA_SOURCES.glob("*.h"))
    assert kernel_files
    for path in kernel_files:
        includes = [line for line in path.read_text().splitlines() if forbidden.search(line)]
        assert not includes, f"{path.name} includes {includes}"


def test_cuda_kernels_are_registered_when_built_with_cuda():
    if not _extension.LOADED:
        pytest.skip(f"resnet_fused._C is not loaded: {_extension.load_error}")
    if not _extension_has_device_code():
        pytest.skip("resnet_fused._C was built without CUDA kernels (CPU-only torch, no nvcc, or RESNET_FUSED_CUDA=0)")
    for name in resnet_fused.ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{name}", "CUDA"), name
    assert backends.get("cuda").unavailable is None
    assert "cuda" in resnet_fused.available_backends("cuda")


def _emulated_kernel_source() -> str:
    """bn_act_kernels.cu with each `kernel<<<grid, block, shared, stream>>>(args)` launch
    rewritten to `::emulation::launch(kernel, grid, block, shared, stream)(args)`, and each
    `__shared__ T name;` (or `name[N]`) followed by `::emulation::poison(&name, sizeof(name));` (NaN bytes
    once per block: a read of a slot no thread of the block wrote fails the checks)."""
    source = (CUDA_SOURCES / "bn_act_kernels.cu").read_text()
    launch = re.compile(r"(\b[A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>", re.S)
    emulated, count = launch.subn(r"::emulation::launch(\1, \2)", source)
    assert count == source.count("<<<") > 0, "a kernel launch the rewrite does not understand"
    shared = re.compile(r"(__shared__[^;]*?\b(\w+)(?:\[[^\]]*\])?);")  # a name, or an array
    emulated, count = shared.subn(r"\1; ::emulation::poison(&\2, sizeof(\2));", emulated)
    assert count == source.count("__shared__") > 0, "a __shared__ declaration the rewrite does not understand"
    return emulated


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the CUDA emulation is x86-64 only")
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cuda_kernels_compute_every_op_under_cpu_emulation(tmp_path):
    (tmp_path / "bn_act_kernels_emulated.cpp").write_text(_emulated_kernel_source())
    binary = tmp_path / "check_kernels"
    compile_cmd = [
        "g++", "-std=c++20", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
        "-ffp-contract=off", f"-I{tmp_path}", f"-I{EMULATION / 'include'}", f"-I{CUDA_SOURCES}",
        str(EMULATION / "check_kernels.cpp"), "-o", str(binary),
    ]
    built = subprocess.run(compile_cmd, capture_output=True, text=True)
    if built.returncode != 0 and "c++20" in built.stderr:
        pytest.skip(f"g++ without C++20: {built.stderr[:200]}")
    assert built.returncode == 0, built.stderr[-4000:]
    for order in ("forward", "reverse"):  # threads between barriers in either order: races show in one
        env = {"ASAN_OPTIONS": "detect_leaks=0", "EMULATION_THREAD_ORDER": order}
        run = subprocess.run([binary], capture_output=True, text=True, env=env, timeout=600)
        report = run.stdout + run.stderr
        lines = "\n".join(line for line in report.splitlines() if not line.startswith("ok "))[-6000:]
        assert run.returncode == 0, f"thread order {order}:\n{lines}"
        summary = re.search(r"(\d+) emulated launches \((\d+) programmatic\), 0 barrier errors, "
                            r"0 dependency errors, 0 failed checks", report)
        assert summary, lines
        launches, programmatic = map(int, summary.groups())
        assert 0 < programmatic < launches, summary.group(0)  # sm_90 launches early, the rest in order


def test_gpu_check_script_parses_and_names_a_bad_phase(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    bad = subprocess.run(["bash", str(script), "--out", str(tmp_path / "out"), "--only", "tests,bogus"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown phase bogus in --only" in bad.stderr, bad.stderr
    assert not (tmp_path / "out").exists()
    for name in ("TOTAL_BUDGET", "TESTS_BUDGET", "KERNELS_BUDGET", "SUITE_BUDGET", "PROFILE_CAP"):
        bad = subprocess.run(["bash", str(script), "--out", str(tmp_path / "out")], env={**os.environ, name: "7m"},
                             capture_output=True, text=True)
        assert bad.returncode == 2 and f"{name}=7m: expected a whole number of seconds" in bad.stderr, bad.stderr
        assert not (tmp_path / "out").exists()
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--only PHASES" in shown and "TESTS_BUDGET" in shown and "set -uo" not in shown


# A stand-in GPU machine for scripts/gpu_check.sh: every python call is logged, and a test
# run sleeps for STUB_TEST_S seconds (its pid in pytest.pid), the benchmarks for STUB_BENCH_S.
# With STUB_FAILS (test ids separated by "|"), a test run fails those, recording them in
# pytest's cache as pytest does, unless RESNET_FUSED_PDL=0; each test run's arguments are
# logged to pytest_calls.log, separated by "|".
STUB_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/calls.log"
case "$1" in
  -) cat > /dev/null; echo "python 3.12, torch stub, NVIDIA H200: sm_90" ;;
  -c) case "$2" in
        *get_device_capability*) echo 9.0 ;;
        *"import triton"*|*"import xdist"*|*pytest_timeout*) exit 1 ;;
        *json.load*) exec python3 "$@" ;;  # gpu_check reading pytest's cache
      esac ;;
  setup.py) ;;
  -m) [[ "$2" == pytest ]] || exit 0
      echo $$ > "$STUB_DIR/pytest.pid"
      (IFS="|"; echo "${*:3}") >> "$STUB_DIR/pytest_calls.log"
      [[ -n "${STUB_FAILS:-}" ]] || exec sleep "$STUB_TEST_S"
      if [[ "${RESNET_FUSED_PDL:-}" == 0 ]]; then echo "=== 1 passed, 1 skipped in 1.00s ==="; exit 0; fi
      IFS="|" read -ra ids <<< "$STUB_FAILS"
      echo "ERROR    torch._inductor:utils.py:3 a captured log line"
      cache=$(printf '%s\n' "$@" | sed -n 's/^cache_dir=//p')
      if [[ -z "$cache" ]]; then echo "=== ${#ids[@]} failed in 1.00s ==="; exit 1; fi  # a rerun
      mkdir -p "$cache/v/cache"
      python3 -c 'import json, sys; json.dump(dict.fromkeys(sys.argv[2:], True), open(sys.argv[1], "w"))' \
        "$cache/v/cache/lastfailed" "${ids[@]}"
      for id in "${ids[@]}"; do echo "FAILED $id - AssertionError: stub"; done
      echo "=== ${#ids[@]} failed, 5 passed in 1.00s ==="; exit 1 ;;
  *) exec sleep "${STUB_BENCH_S:-0}" ;;
esac
"""


def _stand_in_gpu_machine(tmp_path: Path) -> dict:
    stub = tmp_path / "stub"
    stub.mkdir()
    for name, text in [("python", STUB_PYTHON), ("nvidia-smi", "#!/bin/sh\necho 'NVIDIA H200, 580.0'\n"),
                       ("nvcc", "#!/bin/sh\necho 'Build cuda_13.0'\n")]:
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    return dict(os.environ, PATH=f"{stub}:{os.environ['PATH']}", PYTHON=str(stub / "python"), STUB_DIR=str(stub),
                TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="2")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


NEEDS_TIMEOUT = pytest.mark.skipif(platform.system() != "Linux" or shutil.which("timeout") is None,
                                   reason="needs Linux and coreutils timeout")


@NEEDS_TIMEOUT
def test_gpu_check_script_keeps_to_its_total_budget(tmp_path):
    """A test run that would take 300 s is stopped where TOTAL_BUDGET leaves no room for more;
    the kernels phase after it is skipped; both say so, and the last line lists them; the
    log lands in the results directory."""
    env = _stand_in_gpu_machine(tmp_path)
    env.update(TOTAL_BUDGET="45", STUB_TEST_S="300")
    out = tmp_path / "out"
    started = time.monotonic()
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out), "--only", "tests,kernels"],
                         env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert took < 45, f"{took:.0f} s:\n{run.stdout}"
    assert run.returncode == 1, run.stdout  # tests stopped short have not passed
    assert "gpu_check: STOPPED at what TOTAL_BUDGET left" in run.stdout, run.stdout
    assert "gpu_check: SKIPPED the kernels phase, TOTAL_BUDGET=45s is spent" in run.stdout, run.stdout
    assert "FAILURES; cut by TOTAL_BUDGET=45s: pytest (stopped), kernels (skipped)" in run.stdout, run.stdout
    assert "kernels.py" not in (tmp_path / "stub" / "calls.log").read_text()
    assert (out / "gpu_check.log").read_text() == run.stdout + run.stderr


def _kernel_benchmark_runs(tmp_path: Path, **variables: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """scripts/gpu_check.sh --only tests,kernels on the stand-in machine with ``variables``:
    the finished run and the kernel benchmark's command lines, in order."""
    env = _stand_in_gpu_machine(tmp_path)
    env.update(variables)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "out"),
                          "--only", "tests,kernels"], env=env, capture_output=True, text=True, timeout=120)
    calls = (tmp_path / "stub" / "calls.log").read_text().splitlines()
    return run, [line for line in calls if line.startswith("benchmarks/kernels.py")]


@NEEDS_TIMEOUT
def test_gpu_check_script_gives_the_main_kernel_run_its_budget_first(tmp_path):
    """Where TOTAL_BUDGET leaves room for the main kernel run's budget and a little more,
    the main run keeps its budget and the brief NCHW and in-order runs after it take what
    is left (a reserve of 120 s for them once cut the main run to its minimum here)."""
    run, runs = _kernel_benchmark_runs(tmp_path, TOTAL_BUDGET="110", KERNELS_BUDGET="40", STUB_TEST_S="0")
    budgets = [int(line.split("--budget-s ")[1].split()[0]) for line in runs]
    assert budgets == [40, 30, 20], f"{runs}\n{run.stdout}"
    assert "--layout nchw" in runs[1] and "--out" in runs[2] and "in-order" in runs[2], runs


@NEEDS_TIMEOUT
def test_gpu_check_script_skips_a_brief_run_left_a_few_seconds(tmp_path):
    """A brief run TOTAL_BUDGET leaves under 10 s is skipped and listed, not run with a
    budget of a few seconds (whose JSON and diff would say next to nothing)."""
    run, runs = _kernel_benchmark_runs(tmp_path, TOTAL_BUDGET="62", KERNELS_BUDGET="5", STUB_TEST_S="0",
                                       STUB_BENCH_S="10")
    assert len(runs) == 2 and "--layout nchw" in runs[1], f"{runs}\n{run.stdout}"
    assert "gpu_check: SKIPPED bench_in_order" in run.stdout, run.stdout
    assert run.returncode == 3 and "cut by TOTAL_BUDGET=62s: bench_in_order (skipped)" in run.stdout, run.stdout


@NEEDS_TIMEOUT
def test_gpu_check_script_reruns_failed_tests_with_each_launch_switch_off(tmp_path):
    """Failed tests run again, just those (pytest's record of them, whole: a captured log
    line that starts with ERROR is not a test, an id may hold a space), once with the early
    launches off and once with every Triton launch through Triton, and the script says how
    each rerun ended: which mechanism a failure needs is known from one device call."""
    env = _stand_in_gpu_machine(tmp_path)
    failing = ["tests/test_cuda_ops.py::test_a[bfloat16 nhwc]", "tests/test_triton_ops.py::test_b"]
    env.update(STUB_FAILS="|".join(failing))
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out), "--only", "tests"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "gpu_check: TESTS FAILED" in run.stdout, run.stdout
    assert "\n2 failed, 5 passed in 1.00s\n" in run.stdout, run.stdout
    assert (f"the 2 failed tests again with RESNET_FUSED_PDL=0: 1 passed, 1 skipped in 1.00s "
            f"({out}/pytest_RESNET_FUSED_PDL_off.log)") in run.stdout, run.stdout
    assert (f"the 2 failed tests again with RESNET_FUSED_TRITON_REPLAY=0: 2 failed in 1.00s "
            f"({out}/pytest_RESNET_FUSED_TRITON_REPLAY_off.log)") in run.stdout, run.stdout
    runs = [line.split("|") for line in (tmp_path / "stub" / "pytest_calls.log").read_text().splitlines()]
    assert len(runs) == 3 and runs[0][-1] == "tests" and f"cache_dir={out}/pytest_cache" in runs[0], runs
    assert all(rerun[-2:] == sorted(failing) and "no:cacheprovider" in rerun for rerun in runs[1:]), runs


@NEEDS_TIMEOUT
def test_gpu_check_script_reruns_failed_tests_only_where_the_kernel_benchmark_keeps_its_floor(tmp_path):
    """The reruns are diagnostics, the kernel benchmark the issue's measurement: a rerun that
    would leave the main kernel run less than its floor (60 s, and the 45 s the brief runs
    and its overrun need) is skipped and listed, and the main run keeps at least the floor."""
    run, runs = _kernel_benchmark_runs(tmp_path, TOTAL_BUDGET="130", STUB_TEST_S="0",
                                       STUB_FAILS="tests/test_cuda_ops.py::test_a")
    assert run.returncode == 1 and "gpu_check: TESTS FAILED" in run.stdout, run.stdout
    for switch in ("RESNET_FUSED_PDL=0", "RESNET_FUSED_TRITON_REPLAY=0"):
        assert f"gpu_check: SKIPPED the failed tests again with {switch}: the kernel benchmark keeps 60s" in run.stdout
        assert f"rerun with {switch} (skipped)" in run.stdout.splitlines()[-1], run.stdout
    assert len((tmp_path / "stub" / "pytest_calls.log").read_text().splitlines()) == 1  # the first run only
    assert int(runs[0].split("--budget-s ")[1].split()[0]) >= 60, f"{runs}\n{run.stdout}"


def test_gpu_check_script_says_when_a_test_run_left_no_ending(tmp_path):
    """A test run stopped by its cap prints no ending line: the script says so instead of a blank."""
    log = tmp_path / "pytest.log"
    log.write_text("tests/test_a.py::test_b PASSED\n")
    script = ROOT / "scripts" / "gpu_check.sh"
    function = re.search(r"^pytest_ending\(\) \{.*?^\}$", script.read_text(), re.S | re.M).group(0)
    said = subprocess.run(["bash", "-c", f"{function}\npytest_ending {log}"], capture_output=True, text=True, check=True)
    assert said.stdout == "no ending in the log (stopped or skipped)\n", said.stdout


@NEEDS_TIMEOUT
def test_gpu_check_script_stops_its_phase_on_a_term(tmp_path):
    """An outer `timeout` (or Ctrl-C) signals the script's whole process group; the phase it
    runs, in timeout's own group, must stop too, not write on while the caller archives the
    results, and the log must keep the script's last line."""
    env = _stand_in_gpu_machine(tmp_path)
    env.update(STUB_TEST_S="300")
    pid_file = tmp_path / "stub" / "pytest.pid"
    out = tmp_path / "out"
    script = subprocess.Popen(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(out), "--only", "tests"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    tests_pid = None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline and script.poll() is None:
            time.sleep(0.05)
        assert pid_file.exists(), "no test run started"
        tests_pid = int(pid_file.read_text())
        assert _alive(tests_pid)
        os.killpg(script.pid, signal.SIGTERM)  # what `timeout` does to the command it runs
        output = script.communicate(timeout=30)[0]
        assert script.returncode == 143, output
        assert "gpu_check: stopped by a signal" in output, output
        assert not _alive(tests_pid), output
        assert (out / "gpu_check.log").read_text().rstrip().endswith(f"what each phase wrote is in {out}")
    finally:
        for pid in (script.pid, tests_pid):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
