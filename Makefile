# In Search of the Engram: set up, build the book, run the tests. Everything goes into the local .venv
# (Python) and node_modules (the scripts the book serves itself).
#
#   make book    set up, then build the book into _build/html (notebooks run once, then come from the cache)
#   make test    set up, then unit tests + every notebook under nbval + the book build with -W
#   make student write the student notebooks to notebooks/student/
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

.PHONY: setup book test unit notebooks book-test student clean

setup: $(VENV)/.installed _assets/.vendored

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

book: setup
	$(VENV)/bin/jupyter-book build . -W --keep-going

# Unit tests and notebooks run together, two at a time with one thread each (as in CI); nbval's runs fill the
# book's execution cache (notebooks/conftest.py), so the book build that follows executes no notebook again.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -n $(JOBS) --dist loadfile -rfEs
	ENGRAM_EXPECT_CACHED=1 $(PY) -m pytest tests/test_book.py --book -rfEs

unit: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n $(JOBS) --dist loadfile -rfEs

notebooks: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest notebooks --nbval-lax --nbval-current-env -n $(JOBS) --dist loadfile -rfEs

book-test: setup
	$(PY) -m pytest tests/test_book.py --book -rfEs

student: setup
	$(PY) scripts/make_student.py

clean:
	rm -rf _build/html _build/jupyter_execute _assets notebooks/student

# Linters: ruff over the library, tests, notebooks and scripts; mypy on the library (config in pyproject.toml).
.PHONY: lint
lint: setup
	$(VENV)/bin/ruff check engram_helpers tests notebooks scripts benchmarks
	$(VENV)/bin/mypy
