# The two commands a new user runs: `make demo` (the main job on the bundled real model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU build) lies on this machine's disk; pointing pip there keeps it from fetching a CUDA build.
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup test bench clean-venv

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PIP_FIND) -r requirements.txt -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m minisafe.bench

clean-venv:
	rm -rf $(VENV)
