# Every install step the project needs lives here; CI and the README call these targets.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Transparent huge pages for malloc's large blocks: XLA:CPU allocates large temporaries every
# step and otherwise pays a page fault per 4 KiB of them (the at1 train step: 7.6 s -> 4.6 s
# on 2 cores, same peak RSS; see docs/performance.md). Launchers set the same.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: gpu-wheels bench-gpu setup demo test test-fast lint format bench bench-compare bench-scale clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[data,s3,dev,serve]'
# pytorch-fid's own Inception for the parity tests: its torchvision wheel is CUDA-linked and,
# in site-packages, breaks transformers' image processors; kept off sys.path, no deps.
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/fid-reference -c constraints.txt \
		torchvision pytorch-fid
# The C++ depthwise kernel for XLA:CPU (at1_jax/model/native), built now rather than on first
# use; without a compiler the model runs its XLA formulation, so a failed build is not fatal.
	$(BIN)/python -m at1_jax.model.native.build || echo "(continuing: depthwise 'auto' runs 'shift')"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m at1_demo

test: $(STAMP)
	bash scripts/install_browser.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# The JAX inner loop, about 2 minutes on 2 idle cores: no slow, multi-process, S3 or
# PyTorch-side tests (markers in pyproject.toml; `make test` runs them all).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not (slow or multiprocess or s3 or torch)" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The GPU suite (docs/performance.md): `make gpu-wheels` here, then on the GPU machine, from the
# checkout with .gpu_wheels carried along, `make bench-gpu OUT=dir` (no venv, no network there).
GPU_WHEELS := tyro==1.0.17 typeguard==4.6.1 docstring-parser==0.18.0 typing-extensions==4.16.0

gpu-wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 -d .gpu_wheels $(GPU_WHEELS)

bench-gpu:
	bash scripts/bench_gpu.sh $(or $(OUT),outputs/bench-gpu)

bench: $(STAMP)
	$(BIN)/python -m at1_jax.bench model --presets at1 --batch 32

# Side by side with the PyTorch reference step, alternating rounds (docs/performance.md);
# ARGS passes more flags, e.g. make bench-compare ARGS="--dtype float32 --rounds 3". The
# JAX side runs with the GLIBC_TUNABLES above, the PyTorch side with glibc's defaults.
bench-compare: $(STAMP)
	PYTHONPATH=. $(BIN)/python tools/bench_compare.py --presets at1,tld-tiny --batch 32 $(ARGS)

# 2 processes x 2 devices against 1 x 4 (launch/local.py, jax.distributed over gloo), the
# same step and global batch, both started once and timed in windows that take turns, for
# tld-tiny (configs/cpu.py's model) and at1; e.g. make bench-scale ARGS="--presets at1".
bench-scale: $(STAMP)
	PYTHONPATH=. $(BIN)/python tools/bench_scale.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
