# Two commands set everything up on a fresh machine (Python 3.11, make, package registries):
#   make book   - build the whole book on the embedded default (synthetic cohort, stand-in encoders)
#   make test   - run the whole test suite (includes a smoke build of the book checked in Chromium)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: book test env browser bench clean help notebooks smoke

help:
	@echo "make book   build the book (HTML at _build/html/index.html)"
	@echo "make test   run the test suite"
	@echo "make bench  run the benchmarks in benchmarks/"
	@echo "make notebooks  regenerate notebooks/*.ipynb (committed, for Binder/Colab) from notebooks/*.py"
	@echo "make smoke  a small build for checking, in _smoke/ (never replaces the book)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[book,dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (cxrcore)" >/dev/null
	@touch $(STAMP)

env: $(STAMP)

# Debian's Chromium for the rendered-book test; installed when we are root (CI), otherwise a hint.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: install Debian's chromium (sudo apt-get install chromium) to run the rendered-book test"; fi; }

book: $(STAMP)
	$(PY) book/build.py

# The .ipynb beside each notebooks/*.py is generated (jupytext, no outputs, an install cell
# first) and committed so that Binder and Colab open a file that exists; a test checks they agree.
notebooks: $(STAMP)
	$(PY) book/build.py --sync-notebooks

smoke: $(STAMP)
	$(PY) book/build.py --smoke --out _smoke

test: $(STAMP) browser
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f --quick || exit 1; done

clean:
	rm -rf _build _smoke book/_generated
