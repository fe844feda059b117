# The two commands of the README:  `make demo` (main job) and `make test` (test suite).
# Each sets itself up: a local virtual environment, the pinned CPU torch, triton, and the C++ extension.
# Every step is stamped, so a second run only redoes what changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
EXT_SOURCES := $(shell grep -v '^\s*\#' csrc/sources.txt) $(wildcard csrc/*.h csrc/*.cpp python/*.cpp)

.PHONY: setup build demo test test-fast bench clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	touch $@

# (the check is silent as a command: only its one-line verdict is printed)
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml csrc/sources.txt $(EXT_SOURCES)
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@$(PY) -c "import torch, deepforcing_kernels._C as c; print('C++ extension built:', c.version(), 'openmp' if c.has_openmp() else 'no openmp')" 2>/dev/null \
	  || echo "warning: C++ extension not built; the reference backend will be used"
	@touch $@

setup: $(VENV)/.built
build: setup

demo: setup
	$(PY) -m deepforcing_kernels demo
	$(PY) -m deepforcing_kernels generate --model tiny --prompt "a red fox" --frames 30 --out out/demo_fox.mp4 --force

# The suite runs on TEST_PROCS pytest-xdist workers (one per core of the 2-core CI machine); `--dist loadgroup`
# keeps the groups tests/conftest.py marks (a module's module-scoped fixtures, tests/distributed) on one worker.
# TEST_PROCS=0 runs it in this one process.
TEST_PROCS ?= 2
XDIST := -n $(TEST_PROCS) --dist loadgroup

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: setup
	DEEPFORCING_REQUIRE_CPP=1 $(PY) -m pytest tests $(XDIST) --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest tests $(XDIST) -m "not slow" -x -q

bench: setup
	$(PY) -m deepforcing_kernels bench

clean:
	rm -rf build $(VENV) *.egg-info deepforcing_kernels/_C*.so
