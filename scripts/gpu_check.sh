#!/usr/bin/env bash
# The GPU check: from a bare checkout on a GPU machine (torch with CUDA already
# installed, no network), build the extension, report the kernels' resources, run every
# CUDA-marked test, and benchmark the kernels at the ResNet-50 stage shapes.
#
#   scripts/gpu_check.sh [--out DIR]        # or RESNET_FUSED_RESULTS=DIR scripts/gpu_check.sh
#
# Writes to DIR (default results/local/gpu-check-<UTC time>): build.log, ptxas.txt,
# pytest.log, the benchmark's kernels_cuda_nhwc.{json,txt} and bench.log. Stops at once
# if the build fails; otherwise runs everything and exits non-zero if any test or
# measurement failed. Prints each phase's wall time; the benchmark summary comes last.
# Then the block suite (benchmarks.run) publishes its table and chart under DIR/results.
# Environment: PYTHON (default python3), MAX_JOBS (default: all cores),
# TORCH_CUDA_ARCH_LIST (default: the GPU's own, e.g. 9.0 on an H100),
# SUITE_BUDGET (seconds for the block suite, default 120).
set -uo pipefail
cd "$(dirname "$0")/.."

out="${RESNET_FUSED_RESULTS:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (expected --out DIR)" >&2; exit 2 ;;
  esac
done
out="${out:-results/local/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
PYTHON="${PYTHON:-python3}"
SUITE_BUDGET="${SUITE_BUDGET:-120}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
phase_start=$SECONDS
status=0

phase() {
  printf '\n=== %s (t=%ds)\n' "$1" $((SECONDS - start))
  phase_start=$SECONDS
}
took() { printf -- '--- %s: %ds\n' "$1" $((SECONDS - phase_start)); }

phase "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader \
  || { echo "gpu_check: nvidia-smi failed: no GPU here?" >&2; exit 1; }
"$PYTHON" - <<'EOF' || { echo "gpu_check: torch cannot use the GPU" >&2; exit 1; }
import torch, sys
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
p = torch.cuda.get_device_properties(0)
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
EOF
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
nvcc_version="$(nvcc --version 2>/dev/null | tail -1)"
echo "nvcc: ${nvcc_version:-not on PATH}; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; MAX_JOBS=$MAX_JOBS; results: $out"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit: /'

phase "build (setup.py build_ext --inplace, RESNET_FUSED_CUDA=1)"
# The resource report compiles the .cu files on its own, alongside the build.
arch="${TORCH_CUDA_ARCH_LIST//./}"
arch="${arch//+PTX/}"
arch="${arch// /;}"
"$PYTHON" scripts/ptxas_report.py --arch "${arch//;/,}" >"$out/ptxas.txt" 2>&1 &
ptxas_pid=$!
if ! RESNET_FUSED_CUDA=1 "$PYTHON" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"
  echo "gpu_check: BUILD FAILED (full log: $out/build.log)" >&2
  kill "$ptxas_pid" 2>/dev/null
  exit 1
fi
"$PYTHON" -c 'import torch, resnet_fused
assert resnet_fused.backends.get("cuda").unavailable is None, resnet_fused.backends.get("cuda").unavailable
print("resnet_fused backends on cuda:", resnet_fused.available_backends("cuda"))' \
  || { echo "gpu_check: the built extension has no CUDA kernels" >&2; exit 1; }
took "build"

phase "kernel resources (ptxas -v)"
if wait "$ptxas_pid"; then
  tail -n 1 "$out/ptxas.txt"
else
  grep -E "spills / local memory|failed|error" "$out/ptxas.txt" | head -20
  echo "gpu_check: ptxas report: spills, local memory or a compile error (full table: $out/ptxas.txt)"
  status=1
fi
took "ptxas report"

phase "CUDA-marked tests (pytest -m cuda)"
"$PYTHON" -m pytest -m cuda -q -p no:cacheprovider -rfEs tests >"$out/pytest.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)" "$out/pytest.log" | head -30
tail -n 1 "$out/pytest.log"
if [[ $tests_rc -ne 0 ]]; then
  echo "gpu_check: TESTS FAILED (rc=$tests_rc; full log: $out/pytest.log)"
  status=1
fi
took "tests"

phase "kernel benchmark (N=128, channels_last, bf16 and fp32)"
"$PYTHON" benchmarks/kernels.py --device cuda --dtype bf16,fp32 --out "$out" >"$out/bench.log" 2>&1
bench_rc=$?
took "benchmark"
sed -n '/^summary (/,$p' "$out/bench.log"
if [[ $bench_rc -ne 0 ]]; then
  if grep -q "^summary (" "$out/bench.log"; then
    grep -E "FAILED" "$out/bench.log" | head -20
  else
    tail -n 20 "$out/bench.log"
  fi
  echo "gpu_check: BENCHMARK FAILED or incomplete (rc=$bench_rc; full log: $out/bench.log)"
  status=1
fi

phase "block benchmark suite (benchmarks.run, budget ${SUITE_BUDGET}s)"
"$PYTHON" -m benchmarks.run --device cuda --budget "$SUITE_BUDGET" --publish "$out/results" >"$out/suite.log" 2>&1
suite_rc=$?
took "suite"
tail -n 40 "$out/suite.log"
if [[ $suite_rc -ne 0 ]]; then
  echo "gpu_check: BLOCK SUITE FAILED or incomplete (rc=$suite_rc; full log: $out/suite.log)"
  status=1
fi

printf '\n=== done in %ds: %s (results in %s)\n' $((SECONDS - start)) "$([[ $status -eq 0 ]] && echo OK || echo FAILURES)" "$out"
exit $status
