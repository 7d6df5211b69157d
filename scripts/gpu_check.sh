#!/usr/bin/env bash
# The GPU check: from a bare checkout on a GPU machine (torch with CUDA already
# installed, no network), build the extension, report the kernels' resources, run every
# CUDA-marked test, and benchmark the kernels and the blocks.
#
#   scripts/gpu_check.sh [--out DIR] [--only PHASES]   # or RESNET_FUSED_RESULTS=DIR ...
#
# PHASES, comma-separated (default all): ptxas, tests, kernels, suite, profile; the build always
# runs (incremental when build/ is there), e.g. a rerun after a fix: --only tests.
# PYTEST_ARGS replaces the test selection "tests" (e.g. PYTEST_ARGS="tests/test_cuda_ops.py -k graph").
#
# Writes to DIR (default results/local/gpu-check-<UTC time>): gpu_check.log (this script's
# own output), build.log, ptxas.txt,
# pytest.log, margins.tsv and margins.txt (each comparison's worst error as a fraction of its
# tolerance, and their summary by test, dtype and quantity: scripts/margins.py), the kernel benchmark's kernels_cuda_nhwc.{json,txt}, bench.log and the
# auto_order.json it implies (scripts/auto_order.py; after the suite, with its blocks' times
# too, when both run into one DIR), a brief NCHW run of it
# (kernels_cuda_nchw.{json,txt}, bench_nchw.log), a brief one of the CUDA kernels launched
# in order (RESNET_FUSED_PDL=0: in-order/, bench_in_order.log, and in_order_diff.txt
# against the default run), triton_precompile.log, the
# block suite's suite.log and results/ (its published table and chart), profile.log (where
# a ResNet-50 training step's host and device time go, and its wall time replayed from one
# CUDA graph, benchmarks/step_profile.py --graph) and
# host_overhead.log (a block's host time, benchmarks/host_overhead.py). Stops at once if
# the build fails; otherwise runs every phase. Where tests fail, it reruns them (at most 40,
# 60 s each, leaving the kernel benchmark at least 60 s) with RESNET_FUSED_PDL=0, then with
# RESNET_FUSED_TRITON_REPLAY=0 (pytest_RESNET_FUSED_*_off.log), and prints how each rerun
# ended. Exit status: 0 all
# passed, 1 a test or measurement failed, 3 none failed but TOTAL_BUDGET cut something short
# (the last line names what).
#
# Time: TOTAL_BUDGET (default 420 s) counts from the start, the build (about 50 s on 16
# cores) included. The phases run in order of importance (tests, kernels, suite, profile);
# each has its own cap, and each cap, benchmark budget and the Triton precompile shrink to
# what TOTAL_BUDGET leaves (the main kernel run's before the brief NCHW and in-order ones);
# a phase or run left under 15 s is skipped, a brief run left under 10 s too. A capped or skipped one
# says so and keeps what it wrote. A TERM or INT to the script or its process group (an
# outer `timeout`, Ctrl-C) stops the running phase too, which runs in a process group of
# its own (timeout's), and leaves the log complete.
# Reruns of failed tests take up to 2 x 70 s of what the phases after the tests have.
# Measured on an H200 (2026-11-27, third run): build 48 s (the resource report alongside),
# tests 94 s, kernels phase 121 s (with two brief runs since dropped, about 45 s), profile
# 69 s, the suite its budget plus a few seconds; the in-order run (budget 20 s) joined the
# kernels phase since, unmeasured. Prints each phase's wall time, the suite's table and the
# step profile's totals; the kernel summary comes last.
#
# Environment: PYTHON (default python3), MAX_JOBS (default: all cores),
# TORCH_CUDA_ARCH_LIST (default: the GPU's own, e.g. 9.0 on an H100), TOTAL_BUDGET (s,
# default 420), TESTS_BUDGET (s, default 150), KERNELS_BUDGET (s, default 100: the third
# run measured 67 cases in 50 s and left layer2.128 fp32 out; the target stages have 80),
# KERNELS_SHAPES (the main kernel run's shapes, default layer1,layer2: the target stages;
# "all" for every stage), SUITE_BUDGET (s, default 90), PROFILE_CAP (s, default 60).
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

out="${RESNET_FUSED_RESULTS:-}"
only=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --only) only="$2"; shift 2 ;;
    --only=*) only="${1#--only=}"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$self"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (expected --out DIR, --only PHASES)" >&2; exit 2 ;;
  esac
done
only="${only:-ptxas,tests,kernels,suite,profile}"
for p in ${only//,/ }; do
  case "$p" in ptxas|tests|kernels|suite|profile) ;; *) echo "gpu_check: unknown phase $p in --only (expected ptxas, tests, kernels, suite, profile)" >&2; exit 2 ;; esac
done
want() { [[ ",$only," == *",$1,"* ]]; }
PYTHON="${PYTHON:-python3}"
TOTAL_BUDGET="${TOTAL_BUDGET:-420}"
TESTS_BUDGET="${TESTS_BUDGET:-150}"
KERNELS_BUDGET="${KERNELS_BUDGET:-100}"
SUITE_BUDGET="${SUITE_BUDGET:-90}"
PROFILE_CAP="${PROFILE_CAP:-60}"
RERUN_CAP=60  # each rerun of the failed tests with a launch switch off
RERUN_MOST=40  # failed tests rerun at most (the first by name)
KERNELS_FLOOR=60  # the reruns leave the kernel benchmark's main run at least this (run 3: 67 cases in 50 s)
KERNELS_RESERVE=45  # what the main kernel run leaves: its overrun (~10 s) and the brief runs after it
KERNELS_SHAPES="${KERNELS_SHAPES:-layer1,layer2}"
for name in TOTAL_BUDGET TESTS_BUDGET KERNELS_BUDGET SUITE_BUDGET PROFILE_CAP; do
  [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check: $name=${!name}: expected a whole number of seconds" >&2; exit 2; }
done
out="${out:-results/local/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# Everything this script prints also goes to gpu_check.log: a device's output tail is short.
# tee ignores TERM and INT, which an outer timeout or Ctrl-C sends the whole process group:
# it must outlive the script to write the script's last lines.
exec > >(trap '' TERM INT; exec tee -a "$out/gpu_check.log") 2>&1
tee_pid=$!
GRACE=30  # the benchmarks end near their budget by themselves; the cap is for a hang
KILL_AFTER=10  # a capped command that ignores TERM gets KILL this much later
MIN_RUN=15  # a phase or command TOTAL_BUDGET leaves less than this is skipped
MIN_BRIEF=10  # a brief benchmark run's budget below this measures next to nothing: skipped
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1  # a capped phase's log keeps its last lines
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
phase_start=$SECONDS
status=0

phase() {
  printf '\n=== %s (t=%ds)\n' "$1" $((SECONDS - start))
  phase_start=$SECONDS
}
took() { printf -- '--- %s: %ds\n' "$1" $((SECONDS - phase_start)); }

# Seconds TOTAL_BUDGET leaves for a command, its KILL_AFTER and a margin to report counted off.
time_left() { echo $((TOTAL_BUDGET - (SECONDS - start) - KILL_AFTER - 5)); }
# fit_budget BUDGET RESERVE: BUDGET, shrunk so that BUDGET + RESERVE fits in time_left (>= 1).
fit_budget() {
  local room=$(($(time_left) - $2))
  if (( room < $1 )); then echo $((room > 1 ? room : 1)); else echo "$1"; fi
}
cut=()  # what TOTAL_BUDGET skipped or cut short

# capped SECONDS LOG COMMAND...: runs COMMAND, its output to LOG, in its own process group
# (timeout's), stopped after SECONDS or when TOTAL_BUDGET runs out, whichever comes first;
# says so when it was. Skipped, and 0 returned, where TOTAL_BUDGET leaves under MIN_RUN (it is
# then listed in `cut`, not a failure). In the background, waited for: a TERM to this
# script then runs its trap at once.
phase_pid=""
capped() {
  local cap=$1 log=$2 left limit="its cap"
  shift 2
  left=$(time_left)
  if (( left < MIN_RUN )); then
    echo "gpu_check: SKIPPED, TOTAL_BUDGET=${TOTAL_BUDGET}s is spent: ${*:1:4}" | tee "$log"
    cut+=("$(basename "$log" .log) (skipped)")
    return 0
  fi
  (( cap > left )) && { cap=$left; limit="what TOTAL_BUDGET left"; }
  timeout --kill-after=$KILL_AFTER "$cap" "$@" >"$log" 2>&1 &
  phase_pid=$!
  wait "$phase_pid"
  local rc=$?
  phase_pid=""
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "gpu_check: STOPPED at ${limit}, ${cap}s (raise it through the environment)"
    [[ $limit == "its cap" ]] || cut+=("$(basename "$log" .log) (stopped)")
  fi
  return $rc
}

# pytest_ending LOG: pytest's last line in LOG ("3 failed, 40 passed in 9.12s"), or why there is none.
pytest_ending() {
  local line
  line=$(grep -E "^=+ .* in [0-9.]+s.* =+$" "$1" | tail -n 1 | sed -E 's/^=+ (.*) =+$/\1/')
  echo "${line:-no ending in the log (stopped or skipped)}"
}

# brief_fits NAME BUDGET: a brief run's fitted BUDGET is worth running (else says it is skipped).
brief_fits() {
  (( $2 >= MIN_BRIEF )) && return 0
  echo "gpu_check: SKIPPED $1, TOTAL_BUDGET=${TOTAL_BUDGET}s leaves it ${2}s"
  cut+=("$1 (skipped)")
  return 1
}

# phase_fits PHASE: PHASE is wanted, and TOTAL_BUDGET leaves time for it (else says it is skipped).
phase_fits() {
  want "$1" || return 1
  (( $(time_left) >= MIN_RUN )) && return 0
  echo "gpu_check: SKIPPED the $1 phase, TOTAL_BUDGET=${TOTAL_BUDGET}s is spent"
  cut+=("$1 (skipped)")
  return 1
}

# A TERM or INT stops what runs in the background, and the script.
stop() {
  trap - TERM INT
  echo "gpu_check: stopped by a signal at t=$((SECONDS - start))s; what each phase wrote is in $out"
  local pids=(${phase_pid:-} ${ptxas_pid:-} ${precompile_pid:-})
  if (( ${#pids[@]} )); then
    kill -TERM "${pids[@]}" 2>/dev/null  # fails for one that has ended: wait for the others all the same
    wait "${pids[@]}" 2>/dev/null
  fi
  exit 143
}
trap stop TERM INT
# The log's last lines are written before the script's caller reads (or archives) it.
trap 'exec >&- 2>&-; wait "$tee_pid" 2>/dev/null' EXIT

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
if want ptxas; then
  "$PYTHON" scripts/ptxas_report.py --arch "${arch//;/,}" >"$out/ptxas.txt" 2>&1 &
  ptxas_pid=$!
fi
# The Triton kernels the benchmarks autotune, compiled ahead on half the cores (the
# autotuner would compile them one by one): Triton needs no extension, only the GPU.
# Channels_last at every stage, and the brief NCHW run's bf16 target stages.
if (want kernels || want suite) && "$PYTHON" -c "import triton" 2>/dev/null; then
  precompile_jobs=$(( (MAX_JOBS + 1) / 2 ))
  timeout "$(fit_budget 240 0)" bash -c '"$0" scripts/triton_precompile.py --jobs "$1"; nhwc=$?
      "$0" scripts/triton_precompile.py --jobs "$1" --dtype bfloat16 --layout nchw \
        --shape 128x256x56x56 --shape 128x64x56x56 --shape 128x512x28x28 --shape 128x128x28x28 && exit $nhwc' \
    "$PYTHON" "$precompile_jobs" >"$out/triton_precompile.log" 2>&1 &
  precompile_pid=$!
fi
if ! RESNET_FUSED_CUDA=1 "$PYTHON" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"
  echo "gpu_check: BUILD FAILED (full log: $out/build.log)" >&2
  kill ${ptxas_pid:-} ${precompile_pid:-} 2>/dev/null
  exit 1
fi
"$PYTHON" -c 'import torch, resnet_fused
assert resnet_fused.backends.get("cuda").unavailable is None, resnet_fused.backends.get("cuda").unavailable
print("resnet_fused backends on cuda:", resnet_fused.available_backends("cuda"))' \
  || { echo "gpu_check: the built extension has no CUDA kernels" >&2; exit 1; }
took "build"

if want ptxas; then
  phase "kernel resources (ptxas -v)"
  wait "$ptxas_pid"
  ptxas_rc=$?
  ptxas_pid=""
  if [[ $ptxas_rc -eq 0 ]]; then
    tail -n 1 "$out/ptxas.txt"
  else
    grep -E "spills / local memory|failed|error" "$out/ptxas.txt" | head -20
    echo "gpu_check: ptxas report: spills, local memory or a compile error (full table: $out/ptxas.txt)"
    status=1
  fi
  took "ptxas report"
fi

if phase_fits tests; then
  phase "CUDA-marked tests (pytest -m cuda, cap ${TESTS_BUDGET}s)"
  # Verbose, so a capped run's log shows how far it got; parallel where pytest-xdist is
  # installed (8 processes share the GPU: the Triton tests are bound by compiling, one
  # configuration each; the tests of tens of GiB share one process, --dist loadgroup).
  # pytest's cache (what failed, for the reruns below) goes to DIR, not the checkout.
  pytest_args=(-m cuda -v -rfEs)
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then pytest_args+=(--timeout=120); fi
  xdist=()
  if "$PYTHON" -c "import xdist" 2>/dev/null; then xdist=(-n 8 --dist loadgroup); fi
  rm -rf "$out/margins.tsv" "$out/pytest_cache"
  capped "$TESTS_BUDGET" "$out/pytest.log" env RESNET_FUSED_MARGIN_LOG="$out/margins.tsv" \
    "$PYTHON" -m pytest "${pytest_args[@]}" "${xdist[@]}" --durations=15 -o cache_dir="$out/pytest_cache" \
    ${PYTEST_ARGS:-tests}
  tests_rc=$?
  grep -E "^(FAILED|ERROR) " "$out/pytest.log" | head -30
  pytest_ending "$out/pytest.log"
  if [[ -s "$out/margins.tsv" ]]; then
    "$PYTHON" scripts/margins.py "$out/margins.tsv" > "$out/margins.txt" && head -n 6 "$out/margins.txt"
  fi
  if [[ $tests_rc -ne 0 ]]; then
    echo "gpu_check: TESTS FAILED (rc=$tests_rc; full log: $out/pytest.log)"
    status=1
    # The failed tests again, once with each launch switch off: a failure that passes
    # without the early launches or without the Triton replays points at that mechanism,
    # not at the kernels, and saves the device call that would tell them apart. Which
    # failed: pytest's own record (none where the run was stopped: pytest wrote nothing).
    mapfile -t failed < <("$PYTHON" -c 'import json, sys; print(*sorted(json.load(open(sys.argv[1]))), sep="\n")' \
      "$out/pytest_cache/v/cache/lastfailed" 2>/dev/null | head -n "$RERUN_MOST")
    rerun_xdist=()
    (( ${#failed[@]} > 8 )) && rerun_xdist=("${xdist[@]}")  # 8 processes' start-up pays for many tests only
    rerun_reserve=0  # what the reruns leave: the kernel benchmark's floor and reserve, and a KILL's wait
    want kernels && rerun_reserve=$((KERNELS_FLOOR + KERNELS_RESERVE + KILL_AFTER))
    for switch in RESNET_FUSED_PDL=0 RESNET_FUSED_TRITON_REPLAY=0; do
      (( ${#failed[@]} )) || break
      log="$out/pytest_${switch%=*}_off.log"
      rerun_cap=$(fit_budget "$RERUN_CAP" "$rerun_reserve")
      if (( rerun_cap < MIN_RUN )); then
        echo "gpu_check: SKIPPED the failed tests again with $switch: the kernel benchmark keeps ${KERNELS_FLOOR}s"
        cut+=("rerun with $switch (skipped)")
        continue
      fi
      capped "$rerun_cap" "$log" env "$switch" "$PYTHON" -m pytest "${pytest_args[@]}" "${rerun_xdist[@]}" \
        -p no:cacheprovider "${failed[@]}"
      echo "gpu_check: the ${#failed[@]} failed tests again with $switch: $(pytest_ending "$log") ($log)"
    done
  fi
  took "tests"
fi

if phase_fits kernels; then
  phase "Triton kernels compiled ahead (scripts/triton_precompile.py)"
  if [[ -n "${precompile_pid:-}" ]]; then
    wait "$precompile_pid" || echo "gpu_check: the Triton precompile failed (the autotuner compiles instead; $out/triton_precompile.log)"
    tail -n 1 "$out/triton_precompile.log"
    precompile_pid=""
  fi
  took "precompile (waited for)"

  # The main run first: it keeps KERNELS_BUDGET unless TOTAL_BUDGET leaves less than that and
  # KERNELS_RESERVE; the brief runs after it (~66 s together, both) take what is left.
  budget=$(fit_budget "$KERNELS_BUDGET" "$KERNELS_RESERVE")
  phase "kernel benchmark (N=128, channels_last, $KERNELS_SHAPES, bf16 and fp32, budget ${budget}s)"
  shapes=()
  [[ "$KERNELS_SHAPES" != all ]] && shapes=(--shapes "$KERNELS_SHAPES")
  capped $((budget + GRACE)) "$out/bench.log" "$PYTHON" benchmarks/kernels.py --device cuda --dtype bf16,fp32 "${shapes[@]}" \
    --budget-s "$budget" --out "$out"
  bench_rc=$?
  took "benchmark"
  sed -n '/^summary (/,$p' "$out/bench.log"
  if [[ $bench_rc -ne 0 ]]; then
    if grep -q "^summary (" "$out/bench.log"; then
      grep -E "FAILED" "$out/bench.log" | head -20
    elif [[ -s "$out/kernels_cuda_nhwc.txt" ]]; then
      echo "summary of the shapes measured before it stopped:"
      sed -n '/^op .* largest /,$p' "$out/kernels_cuda_nhwc.txt"
    else
      tail -n 20 "$out/bench.log"
    fi
    echo "gpu_check: BENCHMARK FAILED or incomplete (rc=$bench_rc; full log: $out/bench.log)"
    status=1
  fi
  # NCHW, the other layout, in brief: the statistics, the forward and its backward at the target
  # stages (kernels_cuda_nchw.*).
  brief_budget=$(fit_budget 30 $((GRACE - 10)))
  if brief_fits bench_nchw "$brief_budget"; then
    capped 50 "$out/bench_nchw.log" "$PYTHON" benchmarks/kernels.py --device cuda --dtype bf16 --layout nchw --ops batch_stats,bn_relu,bn_relu_backward \
      --shapes layer1,layer2 --budget-s "$brief_budget" --out "$out" \
      || { echo "gpu_check: NCHW BENCHMARK FAILED ($out/bench_nchw.log)"; status=1; }
  fi
  # The CUDA kernels launched in order, against the programmatic dependent launches of the
  # run above (docs/performance.md, "CUDA kernels launched as programmatic dependents").
  brief_budget=$(fit_budget 20 20)
  if brief_fits bench_in_order "$brief_budget"; then
    capped 40 "$out/bench_in_order.log" env RESNET_FUSED_PDL=0 "$PYTHON" benchmarks/kernels.py --device cuda --dtype bf16 --backends cuda \
      --ops batch_stats,train_bn_relu,bn_relu_backward --shapes layer1,layer2 --budget-s "$brief_budget" \
      --out "$out/in-order" \
      || { echo "gpu_check: IN-ORDER BENCHMARK FAILED ($out/bench_in_order.log)"; status=1; }
  fi
  if [[ -s "$out/in-order/kernels_cuda_nhwc.json" && -s "$out/kernels_cuda_nhwc.json" ]]; then
    "$PYTHON" benchmarks/kernel_diff.py "$out/in-order/kernels_cuda_nhwc.json" "$out/kernels_cuda_nhwc.json" \
      --backends cuda,eager --dtype bfloat16 >"$out/in_order_diff.txt" 2>&1 \
      && sed -n '/^geometric mean/,$p' "$out/in_order_diff.txt" | grep -v "not compared"
  fi
  # auto's backend order as this run measured it (copy it to resnet_fused/ to adopt it)
  if [[ -s "$out/kernels_cuda_nhwc.json" ]]; then
    "$PYTHON" scripts/auto_order.py "$out/kernels_cuda_nhwc.json" --out "$out/auto_order.json" \
      || echo "gpu_check: no auto order from this run"
  fi
fi

if phase_fits suite; then
  if [[ -n "${precompile_pid:-}" ]]; then
    wait "$precompile_pid"
    precompile_pid=""
  fi
  budget=$(fit_budget "$SUITE_BUDGET" "$GRACE")
  phase "block benchmark suite (benchmarks.run, budget ${budget}s)"
  # The kernels were measured above: the suite runs the blocks and the whole model.
  capped $((budget + GRACE)) "$out/suite.log" "$PYTHON" -m benchmarks.run --device cuda --budget "$budget" \
    --workloads bottleneck,basicblock,resnet50 --publish "$out/results"
  suite_rc=$?
  took "suite"
  tail -n 40 "$out/suite.log"
  if [[ $suite_rc -ne 0 ]]; then
    echo "gpu_check: BLOCK SUITE FAILED or incomplete (rc=$suite_rc; full log: $out/suite.log)"
    status=1
  fi
  # auto's order again, the blocks' times by the clock (host included) beside the kernels'
  suite_json="$(ls -t "$out"/results/*/results.json 2>/dev/null | head -n 1)"
  if [[ -s "$out/kernels_cuda_nhwc.json" && -n "$suite_json" ]]; then
    "$PYTHON" scripts/auto_order.py "$out/kernels_cuda_nhwc.json" --blocks "$suite_json" \
      --out "$out/auto_order.json" \
      || echo "gpu_check: no auto order with the blocks; auto_order.json has the kernels' measure alone (no blocks_*)"
  elif [[ -n "$suite_json" ]]; then
    echo "gpu_check: no kernels_cuda_nhwc.json in $out: for auto's order, run" \
      "scripts/auto_order.py <a kernels run's kernels_cuda_nhwc.json> --blocks $suite_json"
  fi
fi

if phase_fits profile; then
  phase "ResNet-50 training step, host and device (benchmarks/step_profile.py, cap ${PROFILE_CAP}s)"
  capped "$PROFILE_CAP" "$out/profile.log" "$PYTHON" benchmarks/step_profile.py --device cuda --providers eager,fused-cuda,fused-triton \
    --steps 2 --graph || { echo "gpu_check: STEP PROFILE FAILED ($out/profile.log)"; status=1; }
  grep -E "^[a-z-]+: wall|^  kernels|^  in one CUDA graph" "$out/profile.log"
  # A block's host time: the CUDA backend also with Python autograd Functions (what the C++ ones
  # save), the Triton backend also with every launch through Triton (what the replay saves).
  capped 45 "$out/host_overhead.log" "$PYTHON" benchmarks/host_overhead.py --device cuda --backends cuda,triton --calls 100 \
    || { echo "gpu_check: HOST OVERHEAD FAILED ($out/host_overhead.log)"; status=1; }
  grep -E "train step|train forward" "$out/host_overhead.log"
  took "profile"
fi

# The issue's "short table last": the kernels' summary closes the log (and the device's output tail).
if want kernels && grep -q "^summary (" "$out/bench.log" 2>/dev/null; then
  printf '\n=== kernel summary (printed above; repeated to come last)\n'
  sed -n '/^summary (/,$p' "$out/bench.log"
fi

verdict=$([[ $status -eq 0 ]] && echo OK || echo FAILURES)
if (( ${#cut[@]} )); then
  listed=$(printf '%s, ' "${cut[@]}")
  verdict+="; cut by TOTAL_BUDGET=${TOTAL_BUDGET}s: ${listed%, }"
  [[ $status -eq 0 ]] && status=3
fi
printf '\n=== done in %ds: %s (results in %s)\n' $((SECONDS - start)) "$verdict" "$out"
exit $status
