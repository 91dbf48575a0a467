# In Search of the Engram: set up, build the book, run the tests. Everything goes into the local .venv
# (Python) and node_modules (the scripts the book serves itself).
#
#   make book    set up, run the notebooks in parallel (one thread each) into the execution cache, then build
#                the book into _build/html (unchanged notebooks come from the cache and are not run again)
#   make test    set up, then unit tests + every notebook under nbval + the student versions end to end (exercises
#                undone) + the book build with -W
#   make student write the student notebooks to notebooks/student/
#   make stamp   write course.toml (repository URL, released ref) into the notebooks, _config.yml and docs
#   make rehearsal-full  before a release: every notebook to the end in a Colab-like environment
#   make student-check   the student versions end to end, exercises undone (alone; make test runs them too)
#   make switch-check    the method notebooks with the second offline model at small sizes (tests marked switch;
#                        a CI job of its own)
#
# Variables: PYTHON (interpreter that creates .venv), JOBS (parallel notebook runs), TORCH_INDEX.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := book

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= 2
TORCH_VERSION := 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup browser book test unit notebooks book-test student stamp rehearsal-full clean

setup: $(VENV)/.installed _assets/.vendored

# Chromium for the offline render check: Debian's package where this machine allows it (root + apt-get);
# elsewhere a notice. Under CI=true the check then fails instead of skipping.
browser:
	if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "note: no chromium, and it cannot be installed here: the offline render check will be skipped"; \
	  fi; \
	fi

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, CPU build: from the PyTorch CPU index where it answers, else the default index / local wheels
	if ! $(PY) -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
	  if $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
	    $(PY) -m pip install "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX); \
	  else \
	    $(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	  fi; \
	fi
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	touch $@

_assets/.vendored: node_modules/.installed scripts/vendor_assets.py $(VENV)/.installed
	$(PY) scripts/vendor_assets.py
	touch $@

# The notebooks first run under nbval in parallel with one thread each (as in `make test`), which stores each in
# the execution cache (notebooks/conftest.py); notebooks whose cache entry is current are skipped. The book build
# then executes nothing. A failing notebook fails here, with nbval's report.
book: setup
	stale=$$($(PY) scripts/stale_notebooks.py); \
	if [ -n "$$stale" ]; then \
	  OMP_NUM_THREADS=1 $(PY) -m pytest $$stale --nbval-lax --nbval-current-env -n $(JOBS) --dist loadfile --no-loadscope-reorder -q -p no:cacheprovider; \
	fi
	$(VENV)/bin/jupyter-book build . -W --keep-going

# Unit tests, notebooks and the student versions end to end run together, two at a time with one thread each (as
# in CI); -m "not switch" selects them (tests/conftest.py skips whole-notebook runs unless -m is given) and leaves
# the second-model runs to switch-check. nbval's runs fill the book's execution cache (notebooks/conftest.py), so
# the book build that follows executes no notebook again.
test: setup browser lint
	$(PY) scripts/stamp.py --check
	OMP_NUM_THREADS=1 $(PY) -m pytest tests notebooks -m "not switch" --nbval-lax --nbval-current-env --nbval-cell-timeout=3000 -n $(JOBS) --dist loadfile --no-loadscope-reorder --durations=25 -rfEs
	ENGRAM_EXPECT_CACHED=1 $(PY) -m pytest tests/test_book.py --book -rfEs

unit: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n $(JOBS) --dist loadfile -rfEs

notebooks: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=3000 -n $(JOBS) --dist loadfile --no-loadscope-reorder --durations=25 -rfEs

book-test: setup
	$(PY) -m pytest tests/test_book.py --book -rfEs

student: setup
	$(PY) scripts/make_student.py

stamp: setup
	$(PY) scripts/stamp.py

# Every notebook to the end in the Colab rehearsal environment (tests/test_colab_rehearsal.py); long.
rehearsal-full: setup
	ENGRAM_REHEARSAL_FULL=1 OMP_NUM_THREADS=1 $(PY) -m pytest tests/test_colab_rehearsal.py -rfEs -k full

# Whole-notebook runs at reduced sizes (ENGRAM_SMALL_RUN=1). student-check: the student versions end to end with
# their exercises undone (tests/test_student_run.py; also part of `make test`): about 8 min of one thread on the
# machine of 2026-12-06 (forgetting 117 s, causal tracing 110, rome 90, consolidation 82, grafting 61, toy memory 9).
# switch-check: each method notebook with MODEL_NAME = SECOND_MODEL (tests/test_model_switch.py): about 8.5 min of
# one thread, 16 on the older machine of 2026-11-29; CI runs it as a job of its own beside `make test`
# (.github/workflows/course.yml), which keeps `make test` nearer its time budget.
.PHONY: student-check
student-check: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/test_student_run.py -m student_run -n $(JOBS) --dist load -rfEs --durations=0

.PHONY: switch-check
switch-check: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/test_model_switch.py -m switch -n $(JOBS) --dist load -rfEs --durations=0

clean:
	rm -rf _build/html _build/jupyter_execute _assets notebooks/student

# The larger consolidation sweep (sequential ROME vs one MEMIT batch, at 1, 10 and 30 facts: the dataset has 95 known
# test facts with distinct subjects): about 30 min with one thread (benchmarks/README.md); writes
# benchmarks/results/consolidation_sweep.json, which the consolidation notebook reads; then adds to it each of the
# largest count's facts edited alone, the baseline for the accumulated edits (a few minutes).
SWEEP_COUNTS ?= 1 10 30
SWEEP_THREADS ?= 1
.PHONY: consolidation-sweep
consolidation-sweep: setup
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/consolidation_sweep.py --counts $(SWEEP_COUNTS) --threads $(SWEEP_THREADS)
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/consolidation_sweep.py --isolated --threads $(SWEEP_THREADS)

# Linters: ruff over the library, tests, notebooks and scripts; mypy on the library (config in pyproject.toml).
.PHONY: lint
lint: setup
	$(VENV)/bin/ruff check conftest.py _ext engram_helpers tests notebooks scripts benchmarks
	$(VENV)/bin/mypy
