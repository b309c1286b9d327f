# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs nmrestore, runs the main job on the built-in images
#   make test   installs the dev extras, checks the import layers and runs the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of PyTorch lies on this machine's disk; any looser torch request would pull a
# multi-GB CUDA build, so it is pinned before anything else is installed.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test install install-dev lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/nmrestore demo --out runs/demo

test: install-dev
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check .

bench: install-dev
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) runs build *.egg-info
