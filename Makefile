# make run  : create the venv if needed, then run the main job
# make test : create the venv if needed, then run the test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# inference-perf needs Python >= 3.12; pyenv machines keep it outside the default PATH.
PYTHON312 ?= $(shell command -v python3.12 2>/dev/null && python3.12 -c 'print()' >/dev/null 2>&1 && echo python3.12 || ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
SHARED ?= ../shared

.PHONY: run test venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
	  if [ -z "$(PYTHON312)" ]; then echo "error: python3.12 not found; install Python 3.12 (e.g. 'pyenv install 3.12') or set PYTHON312=/path/to/python3.12" >&2; exit 1; fi; \
	  echo "creating $(VENV) with $(PYTHON312)"; "$(PYTHON312)" -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

run: venv
	$(VENV)/bin/rooflab fit --steps $(SHARED)/data/real/steps/h100_step_records.parquet --evaluate

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/featurize_fit.py

clean:
	rm -rf $(VENV) build *.egg-info
