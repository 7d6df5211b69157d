# The two commands of the README:
#   make bench   set up, build and run the benchmark (GPU if there is one, else CPU)
#   make test    set up, build and run the tests
#
# Both create .venv (seeing the packages of the Python that creates it, so a
# preinstalled torch is reused, also one in another virtual environment:
# scripts/make_venv.py), install torch and the test/bench dependencies if missing, and
# build resnet_fused._C in place against that torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS

.PHONY: setup build test bench clean FORCE

$(PY):
	$(PYTHON) scripts/make_venv.py $(VENV)

# torch is only installed if missing or older than 2.11 (a preinstalled one is kept).
DEPS := "torch>=2.11" torchvision numpy pytest ninja setuptools wheel scikit-learn tqdm matplotlib pytest-benchmark

setup: $(PY)
	$(PIP) install -q $(DEPS)

# What the build depends on besides its sources: torch (its version and CUDA), the build
# switches setup.py reads and where it would find nvcc (in auto mode). Rewritten only when that changes, so a new torch or switch
# rebuilds and an unchanged one does not.
BUILD_CONFIG := $(VENV)/.resnet_fused-build-config
$(BUILD_CONFIG): FORCE | setup
	@{ $(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || exit 1; \
	   for name in RESNET_FUSED_CUDA TORCH_CUDA_ARCH_LIST RESNET_FUSED_PTXAS_VERBOSE CUDA_HOME CUDA_PATH CC CXX; do \
	     printf '%s=%s\n' "$$name" "$$(printenv $$name)"; done; \
	   printf 'nvcc=%s\n' "$$(command -v nvcc)"; ls /usr/local/cuda/include/cuda_runtime_api.h 2>/dev/null; } > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

# The editable install compiles the extension anew each time (minutes): it reruns only when
# setup.py, a source or a source directory (a file removed) or the build configuration
# changed since the last one, or the module is missing or newer (built for another VENV).
BUILT := $(VENV)/.resnet_fused-built
$(BUILT): setup.py $(shell find csrc) $(BUILD_CONFIG) $(or $(wildcard resnet_fused/_C*.so),FORCE) | setup
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

test: build
	$(PY) -m pytest -q

# The suite picks the GPU when there is one, else the CPU at CPU sizes, and says which
# (docs/performance.md). Results go to results/local/; e.g. BENCH_ARGS="--budget 120".
BENCH_ARGS ?=
bench: build
	$(PY) -m benchmarks.run --device auto --budget 300 $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info resnet_fused/_C*.so $(BUILT) $(BUILD_CONFIG)

FORCE:
