# drifting_jax developer entry points. Every target creates .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)

.PHONY: venv test test-e2e test-all test-fast demo bench figures experiments curves miniature device-check-smoke clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

# The suite runs on CPU with 8 virtual devices (see tests/conftest.py). Whole files go to
# each worker (--dist loadfile): a module's fixtures (TPU compiles, trained workdirs) are
# then built once, not once per worker that gets one of its tests.
#
# Two tiers, both in CI (.ci/run): `make test`, every test but the whole-job ones
# (marked e2e), under 10 minutes on a 2-core machine; `make test-e2e`, the whole jobs:
# training runs and their processes, two processes on loopback, TPU compiles of whole
# steps through libtpu, the accelerator check's CPU smoke, the README's examples (about
# 16 minutes there: nearly all of it XLA and libtpu compiling; docs/benchmarks.md,
# "Test suite time"). `make test-all` runs both in one session.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --durations=15
test: $(STAMP)
	$(PYTEST) -m "not e2e" tests

test-e2e: $(STAMP)
	$(PYTEST) -m e2e tests

test-all: $(STAMP)
	$(PYTEST) tests

# The edit-run loop: everything but the tests marked `slow` or `e2e`, with a compilation cache
# kept between runs in .cache/ (every program, however small: most of the suite's
# time is XLA compiling toy-sized programs, and an edit changes few of them). A
# cached program is the program compiled: results are bit for bit the same. The
# first run after a clean clone or a jax upgrade fills it. `make test` stays cold.
TEST_FAST_CACHE := $(CURDIR)/.cache/jax-test-fast
test-fast: $(STAMP)
	JAX_COMPILATION_CACHE_DIR=$(TEST_FAST_CACHE) JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	  $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not e2e" tests

demo: $(STAMP)
	$(PY) -m drifting_jax.demo

# Benchmarks print ratios measured side by side; results in docs/benchmarks.md.
bench: $(STAMP)
	$(PY) -m drifting_jax.bench.losses
	$(PY) -m drifting_jax.bench.memory_bank
	$(PY) -m drifting_jax.bench.models
	$(PY) -m drifting_jax.bench.trainer

# Objective comparisons on MNIST-5k: the demo's width sweep, FHM's five objectives at
# widths 0.05-0.3 with 3 seeds, and Sinkhorn beside log-KDE Gauss# (resumable; about
# 8 hours on 2 CPU cores with two single-threaded workers).
experiments: $(STAMP)
	$(PY) -m scripts.experiments --preset all --workers 2

# Learning curves at FHM's Table 2 widths: the comparison's recipe trained 3,200 steps,
# evaluated at 400/800/1,600/3,200 (resumable; two processes, one thread each;
# docs/results.md, "Learning curves").
curves: $(STAMP)
	$(PY) -m scripts.learning_curves --prepare
	XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" $(PY) -m scripts.learning_curves --shard 0/2 & \
	XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" $(PY) -m scripts.learning_curves --shard 1/2; wait

# The release's recipe in miniature (MAE features, CFG, negatives) beside the demo's
# pixel recipe at equal training time, with a CFG sweep (resumable; docs/results.md).
miniature: $(STAMP)
	$(PY) -m scripts.release_miniature

# The accelerator check at toy sizes on the CPU (docs/benchmarks.md).
device-check-smoke: $(STAMP)
	bash launch/device_check.sh --cpu-smoke

figures: $(STAMP)
	$(PY) -m scripts.theory_figures

clean:
	rm -rf $(VENV) .pytest_cache .cache
