# PanelForge: `make demo` runs the end-to-end pipeline on the embedded default,
# `make test` runs the whole suite, `make test-fast` the fast loop (docs/testing.md). Both create .venv (pip) when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Ray with token authentication; Ray started in-process makes its own token (tasks/ray_jobs.py)
export RAY_AUTH_MODE := token
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180

.PHONY: venv demo test test-fast clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the CPU wheel on disk (an unpinned torch pulls a CUDA build of several GB)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/panelforge demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --ignore=tests/flows

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
